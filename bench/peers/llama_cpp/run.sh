#!/usr/bin/env bash
# Device machine: zmoe vs llama.cpp on the same GPU and the same model shape, in one call.
#
#   bench/peers/llama_cpp/run.sh [--prepare-only] [FAMILY]   # FAMILY: table below (default qwen3_moe)
#   PRESET=glm-tiny bench/peers/llama_cpp/run.sh glm4_moe_lite  # another zmoe preset of the family
#
# --prepare-only: build llama-bench if needed and synthesise the model, nothing else (the
# first of two device calls when the build and the benchmark would not fit one command).
#
# Steps: synthesise the family's preset with zmoe (its format in the table: MLX affine 4-bit, or
# gpt-oss's MXFP4 release layout; seed 0; or reuse $MODEL),
# `zmoe bench` it on CUDA, then for each GGUF quant: `zmoe export gguf` the same weights
# (re-quantized), `llama-bench` it (flash attention off and on), delete the GGUF (disk: the
# 30B preset is 17 GB as affine4, 17 GB as Q4_0 and 32 GB as Q8_0). Prints one table.
#
# Environment (all optional):
#   PRESET=<the family's row>        zmoe synth preset (e.g. glm-tiny for a quick smoke test)
#   ZMOE=scratch/gpu/zmoe            zmoe binary (needs `zmoe export gguf`)
#   LLAMA_BENCH=$WORK/llama.cpp-build/bin/llama-bench   (built by build.sh if missing)
#   MODEL=DIR                        reuse this zmoe model folder instead of synthesising
#   WORK=/tmp/zmoe-peers             llama.cpp source + build, models and GGUFs (large)
#   OUT=$WORK/out                    results: run.log env.txt zmoe.json llama-<quant>.json table.md
#                                    peer-<family>.json (commit under bench/peers/results/)
#   QUANTS=<the family's row>  REPS=10  KEEP_GGUF=0
#   ZMOE_BENCH_ARGS=""               extra `zmoe bench` flags (e.g. a plan)
#   ZMOE_TC=0                        zmoe's prefill without tensor cores (on by default;
#                                    the environment reaches `zmoe bench`)
#   ZMOE_BACKEND=cuda                (cpu: a local smoke test of this script with a CPU llama-bench)
#   LLAMA_ARGS=""                    extra llama-bench flags (e.g. "-d 0,512" for decode at depth)
set -euo pipefail
cd "$(dirname "$0")/../../.."          # repo root
HERE=bench/peers/llama_cpp

# family   zmoe synth preset   llama.cpp arch   synth format   default QUANTS (comma-separated)
# (gpt-oss GGUFs keep MXFP4 experts whatever the quant: QUANTS picks the other matrices. zmoe
# runs the release's bf16 attention, router and lm_head, so bf16 is the same-weights row;
# q4_0 is llama.cpp's usual pick, with fewer bytes than zmoe reads)
FAMILIES="
qwen3_moe      qwen3-30b-a3b  qwen3moe   affine4  q4_0,q8_0
glm4_moe_lite  glm-4.7-flash  deepseek2  affine4  q4_0,q8_0
lfm2_moe       lfm2-8b-a1b    lfm2moe    affine4  q4_0,q8_0
gpt_oss        gpt-oss-20b    gpt-oss    mxfp4    bf16,q4_0
"
PREPARE_ONLY=0
if [ "${1:-}" = --prepare-only ]; then PREPARE_ONLY=1; shift; fi
case "${1:-}" in -*) echo "error: unknown option $1 (usage: run.sh [--prepare-only] [FAMILY])" >&2; exit 1;; esac
FAMILY=${1:-qwen3_moe}
read -r _ ROW_PRESET ARCH SYNTH_QUANT ROW_QUANTS < <(echo "$FAMILIES" | awk -v f="$FAMILY" '$1 == f') || true
if [ -z "${ROW_PRESET:-}" ]; then
    echo "error: unknown family \`$FAMILY\` (known: $(echo "$FAMILIES" | awk 'NF {printf "%s ", $1}'))" >&2
    exit 1
fi
PRESET=${PRESET:-$ROW_PRESET}
AGAIN=""; [ "$PRESET" = "$ROW_PRESET" ] || AGAIN="PRESET=$PRESET "

ZMOE=${ZMOE:-scratch/gpu/zmoe}
WORK=${WORK:-/tmp/zmoe-peers}
export WORK
LLAMA_BENCH=${LLAMA_BENCH:-$WORK/llama.cpp-build/bin/llama-bench}
OUT=${OUT:-$WORK/out}
QUANTS=${QUANTS:-${ROW_QUANTS//,/ }}
REPS=${REPS:-10}
MODEL=${MODEL:-$WORK/$FAMILY-$PRESET-$SYNTH_QUANT-seed0}
mkdir -p "$WORK" "$OUT"
LOG=$OUT/run.log
: > "$LOG"
say() { echo "$*" | tee -a "$LOG"; }
die() { echo "error: $*" | tee -a "$LOG" >&2; exit 1; }

# ---- preflight: everything that can be wrong is said before the long steps ----
[ -x "$ZMOE" ] || die "zmoe binary $ZMOE not found (scripts/gpu_test.sh build on the dev machine, carry scratch/gpu; or set ZMOE)"
"$ZMOE" export gguf --help >/dev/null 2>&1 || die "$ZMOE has no \`export gguf\` subcommand: rebuild it from a tree that has src/export"
ZMOE_BACKEND=${ZMOE_BACKEND:-cuda}
if [ "$ZMOE_BACKEND" = cuda ]; then
    command -v nvidia-smi >/dev/null || die "nvidia-smi not found: this must run on the GPU machine"
    GPU=$(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader | head -1)
else
    GPU="none (ZMOE_BACKEND=$ZMOE_BACKEND)"
fi
command -v python3 >/dev/null || die "python3 not found (needed for table.py)"
if [ ! -x "$LLAMA_BENCH" ]; then
    say "llama-bench not built yet: running $HERE/build.sh"
    "$HERE/build.sh" 2>&1 | tee -a "$LOG"
fi
[ -x "$LLAMA_BENCH" ] || die "llama-bench not found at $LLAMA_BENCH"

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "gpu: $GPU"
    echo "zmoe: $("$ZMOE" --version) ($ZMOE, built at commit $(cat "$(dirname "$ZMOE")/COMMIT" 2>/dev/null || echo unknown))"
    echo "llama.cpp: $(sed -n 's/^llama.cpp commit: //p' "$WORK/llama.cpp/ZMOE_PEER_SOURCE" 2>/dev/null || echo unknown)" \
         "($(sed -n 's/^source: //p' "$WORK/llama.cpp/ZMOE_PEER_SOURCE" 2>/dev/null))"
    echo "family: $FAMILY  preset: $PRESET  arch: $ARCH  model: $MODEL"
    # The switches zmoe reads from the environment (ZMOE_TC, ZMOE_PDL, ...): they change its numbers.
    echo "zmoe env: $(env | grep '^ZMOE_' | sort | tr '\n' ' ')"
    echo "cpu: $(nproc) cores; $(free -g | awk '/Mem:/ {print $2 " GiB"}') memory"
} | tee "$OUT/env.txt" | tee -a "$LOG"

# ---- the zmoe model (synthesised once; reused while the machine stays warm) ----
if [ ! -f "$MODEL/config.json" ]; then
    say "== synthesise $FAMILY/$PRESET ($SYNTH_QUANT, seed 0) -> $MODEL"
    t=$(date +%s)
    "$ZMOE" synth --family "$FAMILY" --preset "$PRESET" --quant "$SYNTH_QUANT" --seed 0 --out "$MODEL" 2>&1 | tail -3 | tee -a "$LOG" \
        || die "zmoe synth failed (see $LOG)"
    say "synth took $(( $(date +%s) - t )) s"
fi
MODEL_BYTES=$(du -sb "$MODEL" | cut -f1)
if [ -f "$MODEL/model.zmoe-synth.json" ]; then
    # `zmoe synth --generated`: the weights are generated in memory, not on disk. The GGUFs'
    # disk check below uses this guess (the 30B presets at 4 bits) instead of the folder's size.
    MODEL_BYTES=$(( 17 << 30 ))
    say "$MODEL: weights generated in memory from its recipe; disk check assumes ~17 GiB of weights"
fi
if [ "$PREPARE_ONLY" = 1 ]; then
    say "prepared: $LLAMA_BENCH and $MODEL ($(( MODEL_BYTES >> 30 )) GiB); now run $AGAIN$HERE/run.sh $FAMILY"
    exit 0
fi

# ---- zmoe ----
ZB=("$ZMOE" bench --model "$MODEL" --backend "$ZMOE_BACKEND" --prompt-tokens 512 --gen-tokens 128 --runs 3
    --json "$OUT/zmoe.json" --force ${ZMOE_BENCH_ARGS:-})
say "== ${ZB[*]}"
echo "${ZB[*]}" >> "$OUT/env.txt"
"${ZB[@]}" 2>&1 | tee -a "$LOG" || die "zmoe bench failed (see $LOG)"

# ---- llama.cpp, one GGUF at a time ----
LLAMA_JSONS=()
for q in $QUANTS; do
    gguf=$WORK/$FAMILY-$PRESET-$q.gguf
    case $q in q4_0) need=$(( MODEL_BYTES * 11 / 10 ));; q8_0) need=$(( MODEL_BYTES * 2 ));; bf16) need=$(( MODEL_BYTES * 4 ));; *) need=$MODEL_BYTES;; esac
    # MXFP4 experts stay MXFP4 in the GGUF: only the other matrices change size.
    [ "$SYNTH_QUANT" = mxfp4 ] && need=$(( MODEL_BYTES * 3 / 2 ))
    avail=$(df --output=avail -B1 "$WORK" | tail -1)
    if [ ! -f "$gguf" ] && [ "$avail" -lt "$need" ]; then
        die "not enough disk in $WORK for $gguf: $(( avail >> 30 )) GiB free, ~$(( need >> 30 )) GiB needed"
    fi
    if [ ! -f "$gguf" ]; then
        say "== zmoe export gguf --quant $q"
        t=$(date +%s)
        "$ZMOE" export gguf --model "$MODEL" --quant "$q" --out "$gguf" 2>&1 | tee "$WORK/export.log" | tee -a "$LOG" \
            || die "zmoe export gguf failed (see $LOG)"
        grep -q "($ARCH $q," "$WORK/export.log" || die "zmoe exported $gguf with an architecture other than $ARCH (see $LOG)"
        say "export took $(( $(date +%s) - t )) s"
    fi
    LB=("$LLAMA_BENCH" -m "$gguf" -ngl 99 -p 512 -n 128 -r "$REPS" -fa 0,1 -o json ${LLAMA_ARGS:-})
    say "== ${LB[*]}"
    echo "${LB[*]}" >> "$OUT/env.txt"
    # JSON on stdout; llama.cpp's loading log goes to run.log.
    "${LB[@]}" > "$OUT/llama-$q.json" 2>> "$LOG" || die "llama-bench failed on $gguf (see $LOG)"
    LLAMA_JSONS+=("$OUT/llama-$q.json")
    [ "${KEEP_GGUF:-0}" = 1 ] || rm -f "$gguf"
done

say "== table"
python3 "$HERE/table.py" --env "$OUT/env.txt" --zmoe "$OUT/zmoe.json" --llama "${LLAMA_JSONS[@]}" \
    --json "$OUT/peer-$FAMILY.json" | tee "$OUT/table.md" | tee -a "$LOG"
say "JSON: $OUT/peer-$FAMILY.json (commit it under bench/peers/results/)"
