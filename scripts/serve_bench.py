#!/usr/bin/env python3
"""Serving benchmark for `zmoe serve` (standard library only: runs on the GPU machine).

For each concurrency level C, C clients each stream one greedy completion of a fixed
pseudo-random prompt (EOS ignored, so every stream has the same length) at the same time,
and the script reports time to first token (TTFT), per-stream decode tok/s (tokens after the
first / time after the first) and aggregate decode tok/s (all tokens / wall time), median
over the streams. Every level first runs one warm-up request.

  zmoe serve --model DIR --backend cuda --port 8080 &          # --parallel N on backends with slots
  python3 scripts/serve_bench.py --url http://127.0.0.1:8080 --concurrency 1,4,16

Prints a table last; --json PATH (default $OUT/serve_bench.json when $OUT is set) writes
every stream's numbers.
"""

import argparse
import http.client
import json
import os
import statistics
import threading
import time
import urllib.parse


def stream_one(url, body, out):
    """Streams one completion; records (ttft, total, tokens) in out."""
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        out["error"] = f"HTTP {resp.status}: {resp.read()[:300]!r}"
        return
    first, tokens, usage = None, 0, None
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            out["error"] = chunk["error"]["message"]
            return
        if chunk.get("usage"):
            usage = chunk["usage"]
        if chunk["choices"] and chunk["choices"][0]["text"] and first is None:
            first = time.perf_counter() - t0
    total = time.perf_counter() - t0
    tokens = usage["completion_tokens"] if usage else 0
    out.update(ttft=first if first is not None else total, total=total, tokens=tokens,
               prompt_tokens=usage["prompt_tokens"] if usage else 0)


def level(url, model, c, prompt, gen):
    body = {"model": model, "prompt": prompt, "max_tokens": gen, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    results = [dict() for _ in range(c)]
    threads = [threading.Thread(target=stream_one, args=(url, body, r)) for r in results]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise SystemExit(f"concurrency {c}: {len(errors)} stream(s) failed: {errors[0]}")
    per = [(r["tokens"] - 1) / max(r["total"] - r["ttft"], 1e-9) for r in results]
    return {
        "concurrency": c,
        "streams": results,
        "wall_s": wall,
        "ttft_ms_median": 1000 * statistics.median(r["ttft"] for r in results),
        "ttft_ms_max": 1000 * max(r["ttft"] for r in results),
        "per_stream_tok_s_median": statistics.median(per),
        "aggregate_tok_s": sum(r["tokens"] for r in results) / wall,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated levels")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    u = urllib.parse.urlparse(a.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request("GET", "/v1/models")
    model = json.loads(conn.getresponse().read())["data"][0]["id"]
    prompt = [(i * 7919 + 11) % 1000 + 10 for i in range(a.prompt_tokens)]  # ids present in every vocabulary
    levels = [int(x) for x in a.concurrency.split(",")]
    level(a.url, model, 1, prompt, 8)  # warm-up
    rows = [level(a.url, model, c, prompt, a.gen_tokens) for c in levels]
    path = a.json or (os.path.join(os.environ["OUT"], "serve_bench.json") if os.environ.get("OUT") else None)
    if path:
        with open(path, "w") as f:
            json.dump({"url": a.url, "model": model, "prompt_tokens": a.prompt_tokens, "gen_tokens": a.gen_tokens,
                       "levels": rows}, f, indent=1)
    print(f"model {model}: prompt {a.prompt_tokens} tokens, {a.gen_tokens} generated per stream (greedy, EOS ignored)")
    print(f"{'streams':>8} {'TTFT med ms':>12} {'TTFT max ms':>12} {'per-stream tok/s':>17} {'aggregate tok/s':>16}")
    for r in rows:
        print(f"{r['concurrency']:>8} {r['ttft_ms_median']:>12.1f} {r['ttft_ms_max']:>12.1f} "
              f"{r['per_stream_tok_s_median']:>17.1f} {r['aggregate_tok_s']:>16.1f}")


if __name__ == "__main__":
    main()
