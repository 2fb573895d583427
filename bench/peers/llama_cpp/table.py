#!/usr/bin/env python3
"""One markdown table from a zmoe bench capsule and llama-bench JSON files (stdlib only).

    python3 bench/peers/llama_cpp/table.py --zmoe zmoe.json --llama llama-q4_0.json llama-q8_0.json \
        [--env env.txt] [--json table.json]

Rows: zmoe first, then llama.cpp per (quant, flash attention[, depth]). Columns: prefill and
decode tok/s, and zmoe / llama.cpp for both (> 1: zmoe is faster).

With --json, the same comparison is also written as one JSON object (kind "zmoe-peer-run"):
the GPU and driver, both engines' commits, the model shape, zmoe's prefill and decode tok/s,
and per llama.cpp configuration (quant, flash attention, depth) its prefill and decode tok/s
and the zmoe / llama.cpp ratios — the machine-readable history kept in bench/peers/results/.

Statistics: zmoe reports the median of its timed runs (after its warm-up). llama-bench runs
its own warm-up, then -r repetitions; when its JSON carries per-repetition samples
(`samples_ts`) the first repetition is dropped as well and the rest averaged, otherwise its
`avg_ts` is used.
"""

import argparse
import json
import re
import statistics
import sys


def die(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        die(f"{path}: {e.strerror}")
    except json.JSONDecodeError as e:
        die(f"{path}: not valid JSON ({e})")


def tok_s(entry):
    """llama-bench throughput of one test: mean of samples after the first, else avg_ts."""
    samples = entry.get("samples_ts") or []
    if len(samples) >= 2:
        return statistics.fmean(samples[1:]), len(samples) - 1
    if "avg_ts" not in entry:
        die("llama-bench entry without avg_ts or samples_ts")
    return float(entry["avg_ts"]), len(samples) or 1


def llama_quant(entry):
    m = re.search(r"\b(I?Q\d+_[0-9A-Z_]+|MXFP4|BF16|F16|F32)\b", entry.get("model_type", ""))
    if m:
        return m.group(1).lower()
    m = re.search(r"(q\d+_[0-9a-z_]+|bf16|f16|f32)\.gguf$", entry.get("model_filename", ""), re.I)
    return m.group(1).lower() if m else "?"


def fa_label(v):
    if isinstance(v, bool):
        return "on" if v else "off"
    return {0: "off", 1: "on", -1: "auto"}.get(int(v), str(v))


def bits_from_format(fmt):
    """Bits per weight of a zmoe storage format name (affine4g64 → 4 + 2·16/64)."""
    m = re.fullmatch(r"affine(\d+)g(\d+)", fmt or "")
    if m:
        return int(m.group(1)) + 32 / int(m.group(2))
    return {"bf16": 16.0, "f16": 16.0, "f32": 32.0, "mxfp4": 4.25}.get(fmt)


def llama_rows(paths):
    """{(quant, fa, depth): {"pp": (tok/s, n, n_prompt), "tg": (...), "bpw": .., "entry": ..}}"""
    rows = {}
    for path in paths:
        data = load_json(path)
        if not isinstance(data, list) or not data:
            die(f"{path}: expected a non-empty JSON list (llama-bench -o json)")
        for e in data:
            key = (llama_quant(e), fa_label(e.get("flash_attn", 0)), int(e.get("n_depth", 0)))
            row = rows.setdefault(key, {"entry": e})
            if e.get("model_n_params"):
                row["bpw"] = 8.0 * e["model_size"] / e["model_n_params"]
            ts, n = tok_s(e)
            if e.get("n_prompt", 0) > 0 and e.get("n_gen", 0) == 0:
                row["pp"] = (ts, n, e["n_prompt"])
            elif e.get("n_gen", 0) > 0 and e.get("n_prompt", 0) == 0:
                row["tg"] = (ts, n, e["n_gen"])
    return rows


def fmt(x, nd=1):
    return "—" if x is None else f"{x:,.{nd}f}"


def ratio(z, l):
    return "—" if z is None or not l else f"{z / l:.2f}×"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zmoe", required=True, help="zmoe bench --json capsule")
    ap.add_argument("--llama", nargs="+", required=True, help="llama-bench -o json outputs")
    ap.add_argument("--env", help="env.txt written by run.sh (GPU, versions, commands)")
    ap.add_argument("--json", help="also write the comparison as JSON to this file")
    a = ap.parse_args()

    z = load_json(a.zmoe)
    try:
        zp, zd = z["prefill_tok_s"]["median"], z["decode_tok_s"]["median"]
        zfmt = z["model"]["quant"].get("experts") or next(iter(z["model"]["quant"].values()), "?")
    except (KeyError, TypeError, StopIteration):
        die(f"{a.zmoe}: not a zmoe bench capsule (no prefill_tok_s / decode_tok_s / model.quant)")
    rows = llama_rows(a.llama)
    any_depth = any(k[2] for k in rows)

    env = {}
    if a.env:
        try:
            with open(a.env) as f:
                env = dict(line.rstrip("\n").split(": ", 1) for line in f if ": " in line)
        except OSError as e:
            die(f"{a.env}: {e.strerror}")
        for k in ("gpu", "zmoe", "zmoe env", "llama.cpp", "family"):
            if k in env:
                print(f"- {k}: {env[k]}")
    m = z["model"]
    print(
        f"- model: {m['family']}, {m['num_layers']} layers, H {m['hidden_size']}, "
        f"{m['num_experts']} experts top-{m['top_k']}, vocab {m['vocab_size']} (synthetic weights)"
    )
    s = z.get("settings", {})
    print(
        f"- zmoe: backend {z.get('backend', '?')}, prompt {s.get('prompt_tokens', '?')} + "
        f"{s.get('gen_tokens', '?')} generated, median of {s.get('runs', '?')} runs"
    )
    print()
    head = ["engine", "weights", "bits/weight", "flash attn"]
    if any_depth:
        head.append("depth")
    head += ["prefill tok/s", "decode tok/s", "zmoe / llama.cpp prefill", "zmoe / llama.cpp decode"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join(["---"] * 4 + (["--:"] if any_depth else []) + ["--:"] * 4) + "|")
    zb = bits_from_format(zfmt)
    zrow = ["zmoe", zfmt, fmt(zb, 2), "—"] + (["—"] if any_depth else []) + [fmt(zp), fmt(zd), "—", "—"]
    print("| " + " | ".join(zrow) + " |")
    for (quant, fa, depth), r in sorted(rows.items()):
        pp = r.get("pp", (None, 0, 0))[0]
        tg = r.get("tg", (None, 0, 0))[0]
        cells = ["llama.cpp", quant.upper(), fmt(r.get("bpw"), 2), fa]
        if any_depth:
            cells.append(str(depth))
        cells += [fmt(pp), fmt(tg), ratio(zp, pp), ratio(zd, tg)]
        print("| " + " | ".join(cells) + " |")
    e = next(iter(rows.values()))["entry"] if rows else {}
    reps = {r.get("tg", (0, 0))[1] for r in rows.values()} | {r.get("pp", (0, 0))[1] for r in rows.values()}
    pp_n = {r["pp"][2] for r in rows.values() if "pp" in r}
    tg_n = {r["tg"][2] for r in rows.values() if "tg" in r}
    print()
    print(
        f"llama.cpp {e.get('build_commit', '?')} on {e.get('gpu_info') or e.get('cpu_info', '?')}, "
        f"-ngl {e.get('n_gpu_layers', '?')}: "
        f"prefill = pp{'/'.join(map(str, sorted(pp_n)))}, decode = tg{'/'.join(map(str, sorted(tg_n)))} "
        f"(from an empty context unless a depth is shown), mean of {'/'.join(map(str, sorted(reps)))} "
        f"repetitions after dropping the first. zmoe decode follows its {s.get('prompt_tokens', '?')}-token prompt."
    )


    if a.json:
        write_json(a.json, env, z, zfmt, rows)


def write_json(path, env, z, zfmt, rows):
    """The comparison as one JSON object (see the module docstring)."""
    e = next(iter(rows.values()))["entry"] if rows else {}
    gpu = [x.strip() for x in env.get("gpu", "").split(",")]
    zp, zd = z["prefill_tok_s"]["median"], z["decode_tok_s"]["median"]
    zmoe_commit = re.search(r"commit (\S+?)\)", env.get("zmoe", ""))
    out = {
        "kind": "zmoe-peer-run",
        "version": 1,
        "date": env.get("date") or z.get("provenance", {}).get("timestamp_utc"),
        "gpu": gpu[0] if gpu and gpu[0] else (z.get("device") or {}).get("name"),
        "driver": gpu[1] if len(gpu) > 1 else (z.get("device") or {}).get("driver"),
        # env.txt's line is "family: F  preset: P  arch: A  model: DIR": the first word.
        "family": env["family"].split()[0] if env.get("family") else z["model"]["family"],
        "model": z["model"],
        "zmoe": {
            "version": env.get("zmoe"),
            "commit": zmoe_commit.group(1) if zmoe_commit else z.get("provenance", {}).get("git_commit"),
            "weights": zfmt,
            "backend": z.get("backend"),
            "plan": z.get("plan"),
            "prompt_tokens": z.get("settings", {}).get("prompt_tokens"),
            "prefill_tok_s": zp,
            "decode_tok_s": zd,
            "achieved_gb_s": z.get("achieved_gb_s"),
            "roofline_pct": z.get("roofline_pct"),
            # env.txt's "zmoe env: K=V K=V ..." (ZMOE_* switches set for the run); {} if none.
            "env": dict(kv.split("=", 1) for kv in env.get("zmoe env", "").split() if "=" in kv),
        },
        "llama_cpp": {
            "commit": e.get("build_commit") or env.get("llama.cpp"),
            "runs": [
                {
                    "quant": quant,
                    "flash_attn": fa,
                    "depth": depth,
                    "bits_per_weight": r.get("bpw"),
                    "prefill_tok_s": r.get("pp", (None,))[0],
                    "prompt_tokens": r.get("pp", (None, 0, None))[2],
                    "decode_tok_s": r.get("tg", (None,))[0],
                    "prefill_ratio": zp / r["pp"][0] if r.get("pp") and r["pp"][0] else None,
                    "decode_ratio": zd / r["tg"][0] if r.get("tg") and r["tg"][0] else None,
                }
                for (quant, fa, depth), r in sorted(rows.items())
            ],
        },
    }
    try:
        with open(path, "w") as f:
            json.dump(out, f, indent=2)
            f.write("\n")
    except OSError as err:
        die(f"{path}: {err.strerror}")


if __name__ == "__main__":
    main()
