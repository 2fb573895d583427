#!/usr/bin/env bash
# GPU checks and benchmarks in one device call.
#
#   scripts/gpu_test.sh build        # here (no GPU needed): release binary + GPU test binary
#                                    # into scratch/gpu/ (ignored; carry it to the device)
#   scripts/gpu_test.sh base REV     # here: builds zmoe at git revision REV into
#                                    # scratch/gpu-base/ (for `run compare`)
#   scripts/gpu_test.sh run [bench|glm|lfm2|foundry|compare|prefill|serve|ncu|ncu-decode]  # on the GPU machine, from the repo root:
#                                    # runs every GPU test, prints a PASS/FAIL table; `bench`
#                                    # adds the qwen3-30b-a3b affine4 benchmark and one
#                                    # kernel-foundry campaign per op, `glm` the glm-4.7-flash
#                                    # affine4 benchmark, `lfm2` the lfm2-8b-a1b affine4
#                                    # benchmark (with and without conv_mixer), `foundry` only the campaigns
#                                    # (FOUNDRY_CASES=48 cases per op by default; FOUNDRY_OPS and
#                                    # FOUNDRY_ARGS narrow them to one question);
#                                    # `compare` times scratch/gpu-base/zmoe against
#                                    # scratch/gpu/zmoe with ZMOE_PDL=1 (pdl), with
#                                    # ZMOE_TC=0 (notc: prefill on the mat-vecs) and with
#                                    # the defaults (new: tensor cores on, PDL off), patched plan
#                                    # (COMPARE_VARIANTS picks among base pdl notc new, and
#                                    # codes: new with ZMOE_TC_CODES=1, prompt products on
#                                    # integer codes; base-X: the base binary with X's settings),
#                                    # alternating COMPARE_ROUNDS (2) times, 512-token prompt,
#                                    # on COMPARE_PRESETS (default qwen3-30b-a3b glm-4.7-flash)
#                                    # and validates the new binary on each; `prefill` profiles
#                                    # a 512-token chunk with and without tensor cores and
#                                    # times the first token at 512/4096/16384 tokens on
#                                    # PREFILL_PRESETS; `serve` runs
#                                    # zmoe serve --parallel 16 on qwen3-30b-a3b affine4 and
#                                    # scripts/serve_bench.py at 1, 4 and 16 concurrent streams;
#                                    # `ncu` profiles the prompt kernels with Nsight Compute,
#                                    # `ncu-decode` times every decode kernel with it and sets
#                                    # their sum against the graph step (NCU_PRESETS).
#                                    # GPU_TESTS=0 skips the tests, GPU_TESTS=a,b runs those;
#                                    # GPU_TEST_JOBS (4) of them run at a time; up to
#                                    # GPU_TEST_RERUNS (3) that failed run again alone.
#                                    # Full logs in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}
if [ "$mode" = build ]; then
    set -e
    cargo build --release
    exe=$(cargo test --release --no-run --test gpu --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m["target"]["name"]=="gpu" and m.get("executable"): print(m["executable"])')
    fexe=$(cargo test --release --no-run --test foundry_gpu --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m["target"]["name"]=="foundry_gpu" and m.get("executable"): print(m["executable"])')
    sexe=$(cargo test --release --no-run --test serve --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m["target"]["name"]=="serve" and m.get("executable"): print(m["executable"])')
    mkdir -p scratch/gpu
    cp target/release/zmoe scratch/gpu/zmoe
    cp "$exe" scratch/gpu/gpu-tests
    cp "$fexe" scratch/gpu/foundry-gpu-tests
    cp "$sexe" scratch/gpu/serve-tests
    # Symbols off: the binaries travel to the device machine (64 MiB with the tree).
    strip scratch/gpu/zmoe scratch/gpu/gpu-tests scratch/gpu/foundry-gpu-tests scratch/gpu/serve-tests
    if git diff --quiet HEAD -- src tests; then
        git rev-parse --short HEAD > scratch/gpu/COMMIT
    else
        echo "warning: uncommitted changes in src/ or tests/ are in these binaries"
        echo "$(git rev-parse --short HEAD)-dirty" > scratch/gpu/COMMIT
    fi
    ls -la scratch/gpu
    exit 0
fi

if [ "$mode" = base ]; then
    set -e
    rev=${2:?usage: scripts/gpu_test.sh base REV}
    wt=scratch/base-src
    rm -rf "$wt"
    mkdir -p "$wt" scratch/gpu-base
    git archive "$rev" | tar -x -C "$wt"
    # The dependencies are the same crates: reuse this checkout's compiled ones.
    CARGO_TARGET_DIR=$PWD/target/base cargo build --release --manifest-path "$wt/Cargo.toml"
    cp target/base/release/zmoe scratch/gpu-base/zmoe
    strip scratch/gpu-base/zmoe
    git rev-parse --short "$rev" > scratch/gpu-base/COMMIT
    rm -rf "$wt"
    exit 0
fi

OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
# Tensor-core prefill is on by default (compare's notc column and prefill's tc0 runs switch
# it off with ZMOE_TC=0).
export ZMOE_REPO=$PWD ZMOE_CACHE=${ZMOE_CACHE:-/tmp/zmoe-cache} ZMOE_BIN=$PWD/scratch/gpu/zmoe
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
# synth_preset PRESET DIR: the preset's affine4 model (gpt-oss: the MXFP4 release layout; seed 0)
# in DIR, synthesised once. GENERATED=1 writes only the recipe (`synth --generated`: the
# weights generated in memory at each load, no 17 GB on disk); every binary that loads it must
# know recipes (zmoe from 9bf8456 on: not a `compare` base older than that), and a mode that
# loads the model many times pays the generation each time (not yet measured on the device).
synth_preset() {
    local fam=qwen3_moe quant=affine4 gen=""
    case $1 in glm-4.7-flash) fam=glm4_moe_lite ;; lfm2-*) fam=lfm2_moe ;; gpt-oss-*) fam=gpt_oss quant=mxfp4 ;; esac
    [ "${GENERATED:-0}" = 1 ] && gen=--generated
    [ -f "$2/config.json" ] || scratch/gpu/zmoe synth --family $fam --preset "$1" --quant $quant \
        --seed 0 $gen --out "$2" 2>&1 | tail -2
}
declare -A result bin
tests=""
for b in gpu-tests foundry-gpu-tests serve-tests; do
    [ -x "scratch/gpu/$b" ] || continue
    for t in $(scratch/gpu/$b --list --ignored 2>/dev/null | sed -n 's/: test$//p'); do
        tests="$tests $t"
        bin[$t]=$b
    done
done
case "${GPU_TESTS:-all}" in
    all) ;;
    0) tests="" ;;
    *) tests=$(echo "$GPU_TESTS" | tr ',' ' ') ;;
esac
# One test: its log in $OUT/TEST.log, PASS or FAIL in $OUT/TEST.result. A hung kernel fails
# its test instead of the whole device call.
run_one() {
    # Each process's rayon pool gets its share of the cores (the CPU references are parallel).
    export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-$(( $(nproc) / ${GPU_TEST_JOBS:-4} > 0 ? $(nproc) / ${GPU_TEST_JOBS:-4} : 1 ))}
    timeout "${TEST_TIMEOUT:-240}" "scratch/gpu/$2" --ignored --exact "$1" --nocapture --test-threads 1 \
        >"$OUT/$1.log" 2>&1
    case $? in 0) echo PASS ;; 124) echo "FAIL (timed out)" ;; *) echo FAIL ;; esac >"$OUT/$1.result"
}
export -f run_one
export OUT TEST_TIMEOUT GPU_TEST_JOBS
# GPU_TEST_JOBS (4) tests at a time, each its own process on the one GPU: the suite is mostly
# CPU work (synthesising models, CPU references) on tiny models, 306 s one by one on the H100
# (2026-12-07). The slowest start first; the first test runs alone so the others find the
# kernel cache (ZMOE_CACHE) filled instead of compiling the module at once.
slow=" batch_invariant_on_gpu patched_plan_bitexact_on_gpu foundry_campaign_every_op_t0_correct model_logits_match_cpu "
first=""
queue=""
known=""
for t in $tests; do
    # A name in GPU_TESTS that no test binary lists is reported FAIL (no log), not run.
    if [ -z "${bin[$t]:-}" ]; then echo "  [$t] no such GPU test"; continue; fi
    known="$known $t"
    if [ -z "$first" ]; then first=$t; elif [[ "$slow" == *" $t "* ]]; then queue="$t $queue"; else queue="$queue $t"; fi
done
if [ -n "$first" ]; then
    run_one "$first" "${bin[$first]}"
    for t in $queue; do echo "$t ${bin[$t]}"; done | xargs -r -P "${GPU_TEST_JOBS:-4}" -n 2 bash -c 'run_one "$0" "$1"'
    # A test that failed beside others runs once more alone: its table row then says
    # "FAIL (PASS alone)" — still a failure (a race that load exposes), told apart from a
    # failure every time. The failing log is kept as TEST.parallel.log (and shown below).
    # Only when at most GPU_TEST_RERUNS (3) failed and not by timing out: a broken build or a
    # hang must not spend the device call on reruns before the table prints.
    failed=""
    for t in $queue; do [ "$(cat "$OUT/$t.result" 2>/dev/null)" = FAIL ] && failed="$failed $t"; done
    if [ "${GPU_TEST_JOBS:-4}" -gt 1 ] && [ "$(echo $failed | wc -w)" -le "${GPU_TEST_RERUNS:-3}" ]; then
        for t in $failed; do
            mv "$OUT/$t.log" "$OUT/$t.parallel.log"
            run_one "$t" "${bin[$t]}"
            [ "$(cat "$OUT/$t.result")" = PASS ] && echo "FAIL (PASS alone)" >"$OUT/$t.result"
        done
    fi
fi
for t in $tests; do
    result[$t]=$(cat "$OUT/$t.result" 2>/dev/null || echo FAIL)
    [[ " $known " == *" $t "* ]] || continue
    log=$OUT/$t.log
    [ -f "$OUT/$t.parallel.log" ] && log=$OUT/$t.parallel.log
    [ "${result[$t]}" = PASS ] || tail -25 "$log" | sed "s/^/  [$t FAIL] /"
    grep -E "rel err|disagreements|graph ==|bit-exact|differ from|profile:|foundry gpu:" "$log" | sed "s/^/  [$t] /" | tail -14
done
if [ "${2:-}" = bench ] || [ "${2:-}" = foundry ] || [ "$mode" = bench ]; then
    # Kernel foundry: one real campaign per op (templates x knobs on decode-centric shapes),
    # then its report (pairwise sign tests, winners per token bucket) and promotion.
    # FOUNDRY_OPS picks ops, FOUNDRY_ARGS adds `foundry run` flags, e.g. one question:
    # FOUNDRY_OPS=gather_qmm_swiglu FOUNDRY_ARGS="--templates t0_warp_row,t3_mma --max-tokens 1".
    for op in ${FOUNDRY_OPS:-moe_combine topk_gating gather_qmm_swiglu rmsnorm_residual}; do
        F="$OUT/foundry/$op"
        # shellcheck disable=SC2086 # FOUNDRY_ARGS is a list of flags
        scratch/gpu/zmoe foundry run --op "$op" --backend cuda --mode mix --cases "${FOUNDRY_CASES:-48}" \
            --seed 1 --warmup 5 --repeats 20 --out "$F" ${FOUNDRY_ARGS:-} 2>"$OUT/foundry-$op.log" | tail -3
        tail -3 "$OUT/foundry-$op.log"
        scratch/gpu/zmoe foundry report "$F" 2>&1 | tee "$F/report.txt"
        scratch/gpu/zmoe foundry promote "$F" --force 2>&1 | tee "$F/promote.txt"
    done
fi
if [ "${2:-}" = bench ] || [ "$mode" = bench ]; then
    M=/tmp/zmoe-q30b-a4
    synth_preset qwen3-30b-a3b "$M"
    # Reference plan: graph (with a per-step profile) and eager, side by side.
    for g in graph eager; do
        flag=""; prof="--profile"; [ $g = eager ] && flag="--eager" && prof=""
        scratch/gpu/zmoe bench --model "$M" --backend cuda --patterns none $flag --prompt-tokens 512 \
            --gen-tokens 128 --runs 3 --json "$OUT/bench-q30b-a4-$g.json" --force $prof 2>&1 |
            tee "$OUT/bench-$g.txt" | tail -45
    done
    # Patched plan: its per-step profile, then validate (reference vs patched in one run).
    scratch/gpu/zmoe bench --model "$M" --backend cuda --prompt-tokens 512 --gen-tokens 128 --runs 3 \
        --json "$OUT/bench-q30b-a4-patched.json" --force --profile 2>&1 | tee "$OUT/bench-patched.txt" | tail -32
    scratch/gpu/zmoe validate --model "$M" --backend cuda --max-tokens 200 --runs 3 \
        --capsule "$OUT/validate-q30b-a4.json" --force 2>&1 | tee "$OUT/validate.txt" | tail -16
    # The same comparison as a ledger entry (bench/matrix.jsonl keeps the history).
    scratch/gpu/zmoe matrix run --model "$M" --backend cuda --runs 3 --max-tokens 200 \
        --ledger "$OUT/matrix.jsonl" --notes "scripts/gpu_test.sh bench" 2>&1 | tail -6
fi
if [ "${2:-}" = glm ]; then
    M=/tmp/zmoe-glm47-a4
    synth_preset glm-4.7-flash "$M"
    # Reference and patched plans with per-step profiles; patched without the shared-expert
    # fusion (the seeds found fusing the shared expert cost speed); then validate + ledger.
    for v in "reference:--patterns none" "patched:" "no-shared:--exclude shared_expert"; do
        name=${v%%:*}; flags=${v#*:}
        scratch/gpu/zmoe bench --model "$M" --backend cuda $flags --prompt-tokens 512 --gen-tokens 128 \
            --runs 3 --json "$OUT/bench-glm47-$name.json" --force --profile 2>&1 |
            tee "$OUT/bench-glm-$name.txt" | tail -40
    done
    scratch/gpu/zmoe validate --model "$M" --backend cuda --max-tokens 200 --runs 3 \
        --capsule "$OUT/validate-glm47-a4.json" --force 2>&1 | tee "$OUT/validate-glm.txt" | tail -16
    scratch/gpu/zmoe matrix run --model "$M" --backend cuda --runs 3 --max-tokens 200 \
        --ledger "$OUT/matrix.jsonl" --notes "scripts/gpu_test.sh run glm" 2>&1 | tail -6
fi
if [ "${2:-}" = lfm2 ]; then
    M=/tmp/zmoe-lfm2-8b-a4
    synth_preset lfm2-8b-a1b "$M"
    # Reference, the family defaults, and the defaults + the opt-in conv_mixer (in_proj + short
    # conv in one decode kernel), each with a per-step profile; then validate both patched
    # plans (200 tokens, token-identical to the reference) and a ledger entry.
    all=moe_mlp,swiglu_mlp,qkv_proj,qk_norm_rope,residual_norm,conv_mixer
    for v in "reference:--patterns none" "patched:" "conv-mixer:--patterns $all"; do
        name=${v%%:*}; flags=${v#*:}
        scratch/gpu/zmoe bench --model "$M" --backend cuda $flags --prompt-tokens 512 --gen-tokens 128 \
            --runs 3 --json "$OUT/bench-lfm2-8b-$name.json" --force --profile 2>&1 |
            tee "$OUT/bench-lfm2-$name.txt" | tail -40
    done
    scratch/gpu/zmoe validate --model "$M" --backend cuda --max-tokens 200 --runs 3 \
        --capsule "$OUT/validate-lfm2-8b-a4.json" --force 2>&1 | tee "$OUT/validate-lfm2.txt" | tail -16
    scratch/gpu/zmoe validate --model "$M" --backend cuda --max-tokens 200 --runs 3 --patterns "$all" \
        --capsule "$OUT/validate-lfm2-8b-a4-conv-mixer.json" --force 2>&1 |
        tee "$OUT/validate-lfm2-conv-mixer.txt" | tail -16
    scratch/gpu/zmoe matrix run --model "$M" --backend cuda --runs 3 --max-tokens 200 \
        --ledger "$OUT/matrix.jsonl" --notes "scripts/gpu_test.sh run lfm2" 2>&1 | tail -6
fi
if [ "${2:-}" = compare ]; then
    # Old vs new binary, same GPU, same model files, alternating (ABAB) so drift hits both.
    echo "| preset | binary | run | prefill tok/s | decode tok/s | GB/s | % roofline |" > "$OUT/compare.md"
    echo "|---|---|---|---|---|---|---|" >> "$OUT/compare.md"
    for preset in ${COMPARE_PRESETS:-qwen3-30b-a3b glm-4.7-flash}; do
        M=/tmp/zmoe-$preset
        synth_preset "$preset" "$M"
        for i in $(seq "${COMPARE_ROUNDS:-2}"); do
            for b in ${COMPARE_VARIANTS:-base pdl notc new}; do
                # base-X: the base binary with variant X's settings.
                exe=scratch/gpu/zmoe; v=$b
                case $b in base*) exe=scratch/gpu-base/zmoe; v=${b#base}; v=${v#-} ;; esac
                pdl=0; [ "$v" = pdl ] && pdl=1
                tc=1; [ "$v" = notc ] && tc=0
                codes=0; [ "$v" = codes ] && codes=1
                j="$OUT/cmp-$preset-$b-$i.json"
                ZMOE_TC_CODES=$codes ZMOE_PDL=$pdl ZMOE_TC=$tc $exe bench --model "$M" --backend cuda --prompt-tokens 512 --gen-tokens 128 --runs 3 \
                    --json "$j" --force >"$OUT/cmp-$preset-$b-$i.txt" 2>&1 || echo "bench $b failed"
                python3 - "$j" "$preset" "$b" "$i" >> "$OUT/compare.md" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
pf, dc = r["prefill_tok_s"]["median"], r["decode_tok_s"]["median"]
print(f"| {sys.argv[2]} | {sys.argv[3]} | {sys.argv[4]} | {pf:.1f} | {dc:.1f} | {r['achieved_gb_s']:.0f} | {r['roofline_pct']:.1f} |")
PY
            done
        done
        scratch/gpu/zmoe validate --model "$M" --backend cuda --max-tokens 200 --runs 3 \
            --capsule "$OUT/validate-$preset.json" --force 2>&1 | tee "$OUT/validate-$preset.txt" | tail -12
    done
    cat "$OUT/compare.md"
fi
if [ "${2:-}" = prefill ]; then
    # Prefill on tensor cores (issue 19): per-step profile of a 512-token chunk with and
    # without tensor cores, then time to first token at 512 / 4096 / 16384 prompt tokens.
    for preset in ${PREFILL_PRESETS:-qwen3-30b-a3b glm-4.7-flash}; do
        M=/tmp/zmoe-$preset
        synth_preset "$preset" "$M"
        for tc in 1 0; do
            ZMOE_TC=$tc scratch/gpu/zmoe bench --model "$M" --backend cuda --prompt-tokens 512 --gen-tokens 16 \
                --runs 3 --profile --json "$OUT/prefill-$preset-tc$tc.json" --force 2>&1 |
                tee "$OUT/prefill-$preset-tc$tc.txt" | grep -A40 "first prompt chunk" | head -24
        done
        for n in 512 4096 16384; do
            scratch/gpu/zmoe bench --model "$M" --backend cuda --ctx $((n + 64)) --prompt-tokens $n --gen-tokens 4 \
                --runs 2 --warmup 1 --json "$OUT/ttft-$preset-$n.json" --force >"$OUT/ttft-$preset-$n.txt" 2>&1 ||
                tail -3 "$OUT/ttft-$preset-$n.txt"
            python3 - "$OUT/ttft-$preset-$n.json" "$preset" "$n" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
pf, t = r["prefill_tok_s"]["median"], r["ttft_ms"]["median"]
print(f"TTFT {sys.argv[2]} {sys.argv[3]} tokens: {t:.0f} ms (prefill {pf:.0f} tok/s)")
PY
        done
    done
fi
if [ "${2:-}" = ncu ]; then
    # Why a kernel is as fast as it is: Nsight Compute on the first prompt chunk of
    # NCU_PRESET (default qwen3-30b-a3b) — the tensor-core products and prompt attention
    # (NCU_KERNELS, a regex), NCU_COUNT launches (9: one layer's q, k, v, attention, o,
    # router, gate, up, down) — throughput against the limits, occupancy, the warps' stall
    # reasons, memory traffic. NCU_GEN=3 decodes two tokens after the prompt, so decode
    # kernels (e.g. NCU_KERNELS='moe_gate_up_swiglu|moe_down_combine_add') run too. Clocks
    # are not locked (the bench numbers are not either). NCU_GEN defaults to 2, the fewest
    # `bench` takes. Full report in $OUT/ncu.txt; NCU_SOURCE=1 adds the per-instruction
    # stall samples of the first launch ($OUT/ncu-source.csv).
    M=/tmp/zmoe-${NCU_PRESET:-qwen3-30b-a3b}
    synth_preset "${NCU_PRESET:-qwen3-30b-a3b}" "$M"
    ncu --clock-control none -k "regex:${NCU_KERNELS:-expert_gemm_tc|gemm_tc|attention_tc}" \
        --launch-count "${NCU_COUNT:-9}" --section SpeedOfLight --section Occupancy \
        --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis \
        scratch/gpu/zmoe bench --model "$M" --backend cuda --prompt-tokens 512 --gen-tokens "${NCU_GEN:-2}" --runs 1 \
        --warmup 0 >"$OUT/ncu.txt" 2>&1 || tail -5 "$OUT/ncu.txt"
    grep -E "^  [a-z_]+.*\(|Duration|DRAM Throughput|Memory Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per|Stall|Warp Cycles Per Issued" \
        "$OUT/ncu.txt" | head -120
    if [ "${NCU_SOURCE:-0}" = 1 ]; then
        # Where the warps wait, per SASS instruction: the first matching launch with PC
        # sampling (SourceCounters), its source page as CSV in $OUT/ncu-source.csv.
        ncu --clock-control none -k "regex:${NCU_KERNELS:-expert_gemm_tc}" --launch-count 1 \
            --section SourceCounters --section WarpStateStats -o "$OUT/ncu-source" -f \
            scratch/gpu/zmoe bench --model "$M" --backend cuda --prompt-tokens 512 --gen-tokens "${NCU_GEN:-2}" \
            --runs 1 --warmup 0 >"$OUT/ncu-source.log" 2>&1 || tail -3 "$OUT/ncu-source.log"
        ncu -i "$OUT/ncu-source.ncu-rep" --page source --csv --print-source sass >"$OUT/ncu-source.csv" 2>&1 ||
            tail -3 "$OUT/ncu-source.csv"
    fi
fi
if [ "${2:-}" = ncu-decode ]; then
    # How much of a decode step is kernels and how much lies between them (issue 16): Nsight
    # Compute times every kernel of a short eager run (a 1-token prompt, then decode steps:
    # all on the row kernels, as decode; caches left as they are), summed per kernel name per
    # forward pass, against the graph step of the same binary (1 / decode tok/s). Full CSV in
    # $OUT/ncu-decode-PRESET.csv.
    for preset in ${NCU_PRESETS:-glm-4.7-flash qwen3-30b-a3b}; do
        M=/tmp/zmoe-$preset
        synth_preset "$preset" "$M"
        ncu --clock-control none --cache-control none --csv --metrics gpu__time_duration.sum --print-units base \
            scratch/gpu/zmoe bench --model "$M" --backend cuda --eager --prompt-tokens 1 --gen-tokens 3 --runs 1 \
            --warmup 0 >"$OUT/ncu-decode-$preset.csv" 2>"$OUT/ncu-decode-$preset.log" || tail -5 "$OUT/ncu-decode-$preset.log"
        scratch/gpu/zmoe bench --model "$M" --backend cuda --prompt-tokens 1 --gen-tokens 128 --runs 3 \
            --json "$OUT/graph-$preset.json" --force >/dev/null 2>&1 || echo "bench $preset failed"
        echo "== $preset"
        python3 scripts/ncu_steps.py "$OUT/ncu-decode-$preset.csv" --bench "$OUT/graph-$preset.json"
    done
fi
if [ "${2:-}" = serve ]; then
    # Serving: qwen3-30b-a3b on 16 CUDA slots; TTFT, per-stream and aggregate decode tok/s.
    M=/tmp/zmoe-q30b-a4
    synth_preset qwen3-30b-a3b "$M"
    scratch/gpu/zmoe serve --model "$M" --backend cuda --parallel 16 --port 0 2>"$OUT/serve.log" &
    spid=$!
    addr=""
    for _ in $(seq 600); do
        addr=$(sed -n 's|.*listening on http://\([^ ]*\).*|\1|p' "$OUT/serve.log" | head -1)
        [ -n "$addr" ] || ! kill -0 $spid 2>/dev/null && break
        sleep 1
    done
    if [ -n "$addr" ]; then
        python3 scripts/serve_bench.py --url "http://$addr" --concurrency 1,4,16 --json "$OUT/serve_bench.json" |
            tee "$OUT/serve_bench.txt"
    else
        echo "zmoe serve did not start:"; tail -5 "$OUT/serve.log"
    fi
    kill $spid 2>/dev/null; wait $spid 2>/dev/null
    grep -E "^zmoe serve: listening" "$OUT/serve.log"
fi
echo
echo "| GPU test | result |"
echo "|---|---|"
fail=0
for t in $tests; do
    echo "| $t | ${result[$t]} |"
    [ "${result[$t]}" = PASS ] || fail=1
done
exit $fail
