#!/usr/bin/env bash
# Compiles the built-in CUDA kernel module with NVRTC on a machine WITHOUT a GPU, and prints
# each kernel's registers, stack and spills (ptxas -v) — side by side with another zmoe
# binary's module when one is given. NVRTC needs no GPU: this catches CUDA syntax errors and
# register/spill regressions before any device time is spent.
#
#   scripts/nvrtc_check.sh [ZMOE] [BASE_ZMOE]     # default ZMOE: target/release/zmoe
#   CANDIDATES="gather_qmm_swiglu/t3_mma:TILES=1,SPLIT=4,PF=4 gather_qmm_swiglu/t0_warp_row" \
#       scripts/nvrtc_check.sh                    # foundry candidates instead (op/template[:knobs];
#                                                 # no knobs = the template's defaults)
#
# NVRTC comes from PyPI's nvidia-cuda-nvrtc-cu12 wheel, unpacked once into target/nvrtc/
# (ignored). Architecture: sm_90 (SM=sm_XX to change). Exit 1 on a compile error.
set -euo pipefail
cd "$(dirname "$0")/.."
zmoe=${1:-target/release/zmoe}
base=${2:-}
dir=target/nvrtc
lib=$dir/nvidia/cuda_nvrtc/lib
if [ ! -f "$lib/libnvrtc.so.12" ]; then
    mkdir -p "$dir"
    python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$dir" nvidia-cuda-nvrtc-cu12
    (cd "$dir" && python3 -m zipfile -e nvidia_cuda_nvrtc_cu12-*.whl .)
fi
if [ -n "${CANDIDATES:-}" ]; then
    # Each candidate alone (its module holds the one foundry kernel), a row per candidate,
    # labelled by what `foundry source` says it rendered (FILE.label).
    mode=candidates
    files=()
    for c in $CANDIDATES; do
        op=${c%%/*}; rest=${c#*/}; t=${rest%%:*}; kn=""; [[ "$rest" == *:* ]] && kn=${rest#*:}
        f="$dir/cand-${#files[@]}.cu"
        if ! "$zmoe" foundry source --op "$op" --template "$t" ${kn:+--knobs "$kn"} > "$f" 2>"$f.label"; then
            echo "$c: $(cat "$f.label")"
            exit 1
        fi
        files+=("$f")
    done
else
    mode=builtin
    "$zmoe" foundry source --builtin > "$dir/new.cu"
    files=("$dir/new.cu")
    [ -n "$base" ] && "$base" foundry source --builtin > "$dir/base.cu" && files+=("$dir/base.cu")
fi
LD_LIBRARY_PATH=$lib python3 - "$lib/libnvrtc.so.12" "${SM:-sm_90}" "$mode" "${files[@]}" <<'PY'
import ctypes, re, sys

nvrtc = ctypes.CDLL(sys.argv[1])

def compile(path):
    src = open(path, "rb").read()
    prog = ctypes.c_void_p()
    nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src, b"zmoe.cu", 0, None, None)
    opts = [f"--gpu-architecture={sys.argv[2]}".encode(), b"--std=c++17", b"-default-device", b"--ptxas-options=-v"]
    rc = nvrtc.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    n = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    return rc, log.value.decode(errors="replace")

def kernels(log):
    res, cur = {}, None
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)'", line):
            cur = m.group(1)
        elif cur and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            res.setdefault(cur, {})["stack"] = "/".join(m.groups())
        elif cur and (m := re.search(r"Used (\d+) registers", line)):
            res.setdefault(cur, {})["regs"] = int(m.group(1))
            cur = None
    return res

runs = []
for path in sys.argv[4:]:
    rc, log = compile(path)
    if rc != 0:
        print(f"{path}: NVRTC error {rc}\n{log}")
        sys.exit(1)
    runs.append(kernels(log))
if sys.argv[3] == "candidates":
    print("| candidate | registers | stack/spill st/spill ld |\n|---|---|---|")
    for path, ks in zip(sys.argv[4:], runs):
        label = open(path + ".label").read().split(" [")[0].strip()
        for k in ks.values():
            print(f"| {label} | {k.get('regs', '-')} | {k.get('stack', '-')} |")
    sys.exit(0)
new = runs[0]
base = runs[1] if len(runs) > 1 else {}
print(f"| kernel | registers | stack/spill st/spill ld |" + (" base registers | base stack |" if base else ""))
print("|---|---|---|" + ("---|---|" if base else ""))
for k in sorted(set(new) | set(base)):
    a, b = new.get(k, {}), base.get(k, {})
    row = f"| {k} | {a.get('regs', '-')} | {a.get('stack', '-')} |"
    if base:
        row += f" {b.get('regs', '-')} | {b.get('stack', '-')} |"
    print(row)
spills = [k for k, v in new.items() if v.get("stack", "0/0/0").split("/")[1:] != ["0", "0"]]
print(f"\n{len(new)} kernels compiled for {sys.argv[2]}; spilling: {', '.join(spills) or 'none'}")
PY
