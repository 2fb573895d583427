"""How far a bf16-activation engine must be from the f32 reference on the GPT-OSS goldens.

Runs emu.py's independent GPT-OSS forward twice on each fixture — f32, and rounding to bf16
at every point where the CUDA backend stores bf16 — over the 100-token input of
tests/gpu.rs::model_logits_match_cpu, and prints the per-position relative error (median,
worst, spikes > 5e-2) and the router's expert-set flips per layer. On 2026-12-07 this
reproduced the H100's GPU-vs-CPU numbers exactly (bench/RESULTS.md, session 7), which is why
those fixtures are left out of that test.

    python scripts/golden/bf16_gap/gap.py [FIXTURE ...]   # default: the four gpt_oss goldens
(numpy only; the venv of scripts/golden/requirements.txt has it).
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from emu import ALL, Model, stats  # noqa: E402

GOLDEN = Path(__file__).resolve().parents[3] / "tests" / "golden" / "gpt_oss"
names = sys.argv[1:] or ["bf16_hf", "f32_clamp_window3", "mxfp4_release", "mlx_mxfp4_q8"]
for v in names:
    m = Model(v if v.startswith("/") else str(GOLDEN / v), as_test=True)
    toks = [(i * 7919 + 13) % m.vocab for i in range(100)]
    ta, tb = {}, {}
    a = m.forward(toks, (), ta)
    b = m.forward(toks, ALL, tb)
    med, worst, spikes, _ = stats(b, a)
    flips = {l: int((np.sort(ta["idx"][l], 1) != np.sort(tb["idx"][l], 1)).any(1).sum()) for l in range(m.L)}
    print(f"{v}: emulated-bf16 vs f32: median {med:.2e} worst {worst:.2e} spikes {spikes}/100; "
          f"router expert-set flips per layer {flips}")
