#!/usr/bin/env python3
"""Kernel time per forward pass from an Nsight Compute CSV, against the graph step (stdlib only).

    python3 scripts/ncu_steps.py NCU.csv [--bench BENCH.json]

NCU.csv: stdout of `ncu --csv --metrics gpu__time_duration.sum --print-units base <zmoe ...>`
(the program's own output lines are skipped: only quoted CSV rows count). Every forward pass
starts with one `embed` launch, so passes = embed launches. Prints, per kernel name, launches
and µs per pass, and their sum; with --bench (a `zmoe bench --json` capsule of a graph run),
the graph step (1e6 / median decode tok/s) and what lies between the kernels: step − sum.
"""

import argparse
import collections
import csv
import json
import sys


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("--bench", help="zmoe bench --json capsule of the graph run")
    a = ap.parse_args()
    try:
        with open(a.csv) as f:
            rows = [line for line in f if line.startswith('"')]
    except OSError as e:
        sys.exit(f"error: {a.csv}: {e.strerror}")
    us = collections.defaultdict(float)
    launches = collections.Counter()
    for r in csv.DictReader(rows):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        name = r["Kernel Name"].split("(")[0]
        us[name] += float(r["Metric Value"].replace(",", "")) / 1e3  # ns -> µs
        launches[name] += 1
    passes = launches.get("embed", 0)
    if not passes:
        sys.exit(f"error: {a.csv}: no `embed` launches (not an ncu CSV of a zmoe run?)")
    total = sum(us.values()) / passes
    print(f"{passes} forward passes, {sum(launches.values()) / passes:.0f} kernels per pass")
    print(f"{'kernel':34} {'launches':>8} {'µs/pass':>9} {'%':>6}")
    for name, t in sorted(us.items(), key=lambda kv: -kv[1]):
        print(f"{name:34} {launches[name] / passes:8.0f} {t / passes:9.1f} {100 * t / passes / total:5.1f}%")
    print(f"{'kernels':34} {sum(launches.values()) / passes:8.0f} {total:9.1f}")
    if a.bench:
        try:
            with open(a.bench) as f:
                tps = json.load(f)["decode_tok_s"]["median"]
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
            sys.exit(f"error: {a.bench}: no decode_tok_s.median ({e})")
        step = 1e6 / tps
        gap = step - total
        print(f"graph step {step:.1f} µs ({tps:.1f} tok/s): between kernels {gap:.1f} µs "
              f"({100 * gap / step:.1f} %, {gap / (sum(launches.values()) / passes):.2f} µs per kernel)")


if __name__ == "__main__":
    main()
