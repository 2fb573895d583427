#!/usr/bin/env python3
"""Golden fixtures for zmoe: tiny random-weight checkpoints plus the logits that
HuggingFace transformers (the peer implementation of each family) computes for them.

    python scripts/golden/make_golden.py [--family qwen3_moe] [--out tests/golden]

For every variant of every selected family this writes ``<out>/<family>/<variant>/``:

* ``config.json`` + ``model.safetensors`` -- the checkpoint zmoe loads (HF layout saved by
  ``save_pretrained``, or the mlx-community layout with MLX affine-quantised tensors);
* ``golden.json`` -- ``prompt_tokens``, ``logits`` (float32, one row of ``vocab_size`` per
  prompt position), ``greedy_tokens`` (plain argmax continuation, no EOS stop, ties -> lowest
  id), the transformers/torch versions and notes.

The reference always runs in float32 with eager attention and eager experts, loaded through
``from_pretrained`` from a checkpoint on disk (the fixture itself, or for quantised variants a
float32 checkpoint holding exactly the dequantised weights).

Fixtures are margin-aware: a variant is regenerated with the next seed until every top-k
router decision (gap between the k-th and (k+1)-th router probability) and every greedy
decision (gap between the best and second-best logit) is clear by a wide margin, so that an
f32 re-implementation with a different summation order makes the same discrete choices.

Adding a family = writing ONE function that returns a list of ``Variant`` and registering it
in ``FAMILIES`` (see README.md next to this file).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import safetensors
import torch
import transformers
from safetensors import TensorSpec, serialize_file

REPO_ROOT = Path(__file__).resolve().parents[2]

# A router choice is "clear" when the k-th and (k+1)-th router probabilities differ by at
# least this much (f32 re-implementations differ by ~1e-6), a greedy choice when the best
# logit beats the runner-up by at least this much.
ROUTER_GAP_MIN = 2e-4
GREEDY_GAP_MIN = 5e-3
# Tiny random models easily fall into repeating one token; a continuation that does not
# repeat itself is what makes the generate check sensitive to KV-cache / position bugs.
MIN_DISTINCT_GREEDY = 8
MAX_FIXTURE_BYTES = 2 * 1024 * 1024


# ----------------------------------------------------------------------------------------
# bfloat16 and MLX affine quantisation in numpy (model-spec.md section 6.1)
# ----------------------------------------------------------------------------------------


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 -> bfloat16 (round to nearest, ties to even); returns the uint16 bits."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_bits_to_f32(b: np.ndarray) -> np.ndarray:
    return (np.ascontiguousarray(b, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def pack_bits(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes along the last axis, LSB first: element k of a word at bits k*bits."""
    assert bits in (2, 4, 8), "only power-of-two widths pack evenly into uint32"
    per = 32 // bits
    *lead, n = q.shape
    q = q.astype(np.uint32).reshape(*lead, n // per, per)
    shifts = (np.arange(per, dtype=np.uint32) * bits).astype(np.uint32)
    return np.bitwise_or.reduce(q << shifts, axis=-1).astype(np.uint32)


def unpack_bits(packed: np.ndarray, bits: int) -> np.ndarray:
    per = 32 // bits
    shifts = (np.arange(per, dtype=np.uint32) * bits).astype(np.uint32)
    q = (packed[..., None] >> shifts) & np.uint32((1 << bits) - 1)
    return q.reshape(*packed.shape[:-1], packed.shape[-1] * per)


def mlx_affine_quantize(w: np.ndarray, group_size: int, bits: int):
    """Quantise like ``mx.quantize(w, group_size, bits, mode="affine")`` (mlx/ops.cpp).

    Per group: scale = max((max-min)/(2^bits-1), 1e-7); if |min| > |max| the edge is min and
    the scale positive, else the edge is max and the scale NEGATED; q0 = round(edge/scale);
    if q0 != 0 then scale = edge/q0 and bias = edge, else bias = 0. Scales and biases are then
    stored as bfloat16 and the codes are computed against the *stored* (rounded) values, so
    ``dequantize(pack, scales, biases)`` is exactly what the reference model runs on.

    Returns (packed uint32 [..., in*bits/32], scales bf16 bits [..., in/gs], biases bf16 bits).
    """
    w = np.asarray(w, dtype=np.float32)
    *lead, n_in = w.shape
    assert n_in % group_size == 0, (w.shape, group_size)
    n_bins = np.float32((1 << bits) - 1)
    g = w.reshape(*lead, n_in // group_size, group_size)
    w_max = g.max(axis=-1, keepdims=True)
    w_min = g.min(axis=-1, keepdims=True)
    mask = np.abs(w_min) > np.abs(w_max)
    scales = np.maximum((w_max - w_min) / n_bins, np.float32(1e-7))
    scales = np.where(mask, scales, -scales)
    edge = np.where(mask, w_min, w_max)
    q0 = np.round(edge / scales)
    scales = np.where(q0 != 0, edge / np.where(q0 != 0, q0, np.float32(1)), scales).astype(np.float32)
    biases = np.where(q0 == 0, np.float32(0), edge).astype(np.float32)
    s_bits = f32_to_bf16_bits(scales)
    b_bits = f32_to_bf16_bits(biases)
    s = bf16_bits_to_f32(s_bits)
    b = bf16_bits_to_f32(b_bits)
    q = np.clip(np.round((g - b) / s), 0, n_bins).astype(np.uint32).reshape(*lead, n_in)
    return pack_bits(q, bits), s_bits[..., 0], b_bits[..., 0]


def mlx_affine_dequantize(packed: np.ndarray, scales: np.ndarray, biases: np.ndarray,
                          group_size: int, bits: int) -> np.ndarray:
    """w[o, g*gs+j] = scale[o,g] * q + bias[o,g] in float32 (product exact, one rounding)."""
    q = unpack_bits(packed, bits).astype(np.float32)
    *lead, n_in = q.shape
    q = q.reshape(*lead, n_in // group_size, group_size)
    s = np.asarray(scales, dtype=np.float32)[..., None]
    b = np.asarray(biases, dtype=np.float32)[..., None]
    return (s * q + b).astype(np.float32).reshape(*lead, n_in)


# ----------------------------------------------------------------------------------------
# safetensors I/O (write through the safetensors package; read with an independent parser)
# ----------------------------------------------------------------------------------------


def write_safetensors(path: Path, tensors: dict[str, tuple[np.ndarray, str]], metadata=None):
    """``tensors``: name -> (array, dtype) with dtype in {"float32", "bfloat16" (array holds
    the uint16 bits), "uint32", ...}. Uses the safetensors package's own serializer, which
    (unlike ``safetensors.numpy``) can emit BF16 without ml_dtypes."""
    keep = {}
    specs = {}
    for name in sorted(tensors):
        arr, dtype = tensors[name]
        arr = np.ascontiguousarray(arr)
        if dtype == "bfloat16":
            assert arr.dtype == np.uint16, name
        else:
            assert arr.dtype.name == dtype, (name, arr.dtype, dtype)
        keep[name] = arr
        specs[name] = TensorSpec(dtype=dtype, shape=list(arr.shape), data_ptr=arr.ctypes.data,
                                 data_len=arr.nbytes)
    serialize_file(specs, str(path), metadata=metadata)


_ST_DTYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "U32": np.uint32,
              "I32": np.int32, "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I64": np.int64}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Minimal independent reader: BF16 is returned upcast to float32, other dtypes as is."""
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        buf = raw[base + a: base + b]
        if info["dtype"] == "BF16":
            arr = bf16_bits_to_f32(np.frombuffer(buf, dtype="<u2"))
        else:
            arr = np.frombuffer(buf, dtype=np.dtype(_ST_DTYPES[info["dtype"]]).newbyteorder("<"))
        out[name] = arr.reshape(info["shape"]).copy()
    return out


def read_safetensors_dtypes(path: Path) -> dict[str, str]:
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    return {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}


# ----------------------------------------------------------------------------------------
# Variant description + shared pieces
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Variant:
    """One fixture. ``writer(model, fixture_dir, tmp_dir) -> reference_dir`` writes the
    fixture checkpoint and returns the directory transformers loads the reference from."""

    name: str
    config: transformers.PretrainedConfig
    model_cls: type
    randomise: Callable[[torch.nn.Module, torch.Generator], None]
    writer: Callable[[torch.nn.Module, Path, Path], Path]
    seed: int
    prompt_len: int = 16
    gen_len: int = 20
    notes: str = ""
    # Optional: install hooks that record router gaps; returns (gaps list, remove-fn).
    router_probe: Callable[[torch.nn.Module], tuple[list, Callable[[], None]]] | None = None
    # Optional independent numpy check: (fixture_dir, prompt, golden) -> summary str.
    np_check: Callable[[Path, list[int], dict], str] | None = None


def randomise_norms_and_biases(model: torch.nn.Module, gen: torch.Generator,
                               norm_std: float = 0.1, bias_std: float = 0.1) -> None:
    """Every RMSNorm weight -> 1 + norm_std*N(0,1), every bias -> bias_std*N(0,1)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + norm_std * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(bias_std * torch.randn(p.shape, generator=gen))


def assert_nothing_trivial(model: torch.nn.Module) -> None:
    """No parameter may be constant (all zeros / all ones hide bugs)."""
    for name, p in model.named_parameters():
        t = p.detach().float()
        if t.numel() > 1 and bool((t == t.flatten()[0]).all()):
            raise AssertionError(f"parameter {name} is constant ({t.flatten()[0].item()}); randomise it")


def save_hf(dtype: torch.dtype, keep_fp32: tuple[str, ...] = ()):
    """Writer: ``save_pretrained`` in ``dtype``; the fixture is also the reference.

    Tensors whose name ends with one of ``keep_fp32`` stay float32 on disk (``model.to(dtype)``
    would cast them; ``from_pretrained`` keeps them fp32 via ``_keep_in_fp32_modules_strict``,
    which is what released checkpoints hold, e.g. the GLM / DeepSeek ``e_score_correction_bias``)."""

    def writer(model: torch.nn.Module, fixture_dir: Path, _tmp: Path) -> Path:
        keep = {name: t.detach().clone() for name, t in model.state_dict().items() if name.endswith(keep_fp32)} \
            if keep_fp32 else {}
        model = model.to(dtype)
        if keep:
            with torch.no_grad():
                for name, t in model.state_dict(keep_vars=True).items():
                    if name in keep:
                        t.data = keep[name].float()
        kwargs = {}
        if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
            kwargs["safe_serialization"] = True  # transformers 4.x; v5 always writes safetensors
        model.save_pretrained(fixture_dir, **kwargs)
        want = {torch.float32: "F32", torch.bfloat16: "BF16"}[dtype]
        dtypes = read_safetensors_dtypes(fixture_dir / "model.safetensors")
        got = {v for k, v in dtypes.items() if not k.endswith(keep_fp32)}
        assert got == {want}, f"expected only {want} tensors on disk, got {got}"
        kept = {v for k, v in dtypes.items() if keep_fp32 and k.endswith(keep_fp32)}
        assert kept <= {"F32"} and (not keep_fp32 or kept), f"expected {keep_fp32} as F32 on disk, got {kept}"
        return fixture_dir

    return writer


def save_mlx_affine(*, group_size: int, bits: int, override: Callable[[str], dict | None],
                    config_transform: Callable[[dict], dict],
                    stacked_experts: Callable[[str, tuple], list | None],
                    unquantised: Callable[[str], bool] | None = None,
                    keep_fp32: Callable[[str], bool] | None = None,
                    remap: Callable[[str, np.ndarray], tuple[list, Callable[[list], np.ndarray]] | None] | None = None,
                    reshaped: Callable[[str, tuple], tuple | None] | None = None):
    """Writer for the mlx-community layout (model-spec.md 6.3-6.5).

    Every 2-D weight (Linear, embedding, router) and every fused 3-D expert tensor is
    MLX-affine quantised along its last axis; 1-D tensors (norms, linear biases) are stored as
    bfloat16. ``override(module_path)`` returns a per-module {"group_size", "bits"} dict (it is
    written into config.json) or None for the global parameters. ``stacked_experts(name)``
    maps an in-memory fused expert tensor (name, shape) to [(mlx_module_path, row_slice), ...]
    (slices along axis 1) or None for any other tensor.
    Optional per-family hooks (default: none): ``unquantised(name)`` -> store that >=2-D tensor
    as plain bfloat16 (GLM router ``mlp.gate.weight``); ``keep_fp32(name)`` -> store it as float32
    unchanged (``e_score_correction_bias``); ``remap(name, array)`` -> ([(mlx_module_path,
    array), ...], inverse) splits one HF tensor into differently shaped MLX tensors, each
    quantised along its last axis, and ``inverse(list of dequantised arrays)`` rebuilds the HF
    tensor (GLM ``kv_b_proj`` -> ``embed_q`` / ``unembed_out``); ``reshaped(name, shape)`` -> a new
    shape of the same elements in the same order, stored unquantised as bfloat16 (the LFM2 conv
    kernel: HF ``[H, 1, L]``, MLX ``[H, L, 1]``).
    The dequantised (and bf16-rounded) weights are loaded back into the model, saved as a
    float32 HF checkpoint in tmp_dir, and that is what the reference runs on.
    """

    def writer(model: torch.nn.Module, fixture_dir: Path, tmp: Path) -> Path:
        cfg = model.config
        sd = {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}
        out: dict[str, tuple[np.ndarray, str]] = {}
        deq: dict[str, np.ndarray] = {}
        qcfg: dict = {"group_size": group_size, "bits": bits, "mode": "affine"}

        def put(module: str, w: np.ndarray) -> np.ndarray:
            ov = override(module)
            gs, nb = (ov["group_size"], ov["bits"]) if ov else (group_size, bits)
            if ov:
                qcfg[module] = dict(ov)
            packed, s, b = mlx_affine_quantize(w, gs, nb)
            out[module + ".weight"] = (packed, "uint32")
            out[module + ".scales"] = (s, "bfloat16")
            out[module + ".biases"] = (b, "bfloat16")
            return mlx_affine_dequantize(packed, bf16_bits_to_f32(s), bf16_bits_to_f32(b), gs, nb)

        tied = bool(getattr(cfg, "tie_word_embeddings", False))
        for name, w in sd.items():
            if tied and name == "lm_head.weight":
                continue  # tied: not stored; filled from the embedding below
            parts = stacked_experts(name, w.shape)
            mapped = remap(name, w) if remap else None
            new_shape = reshaped(name, w.shape) if reshaped else None
            if keep_fp32 and keep_fp32(name):
                out[name] = (np.ascontiguousarray(w, dtype=np.float32), "float32")
                deq[name] = w.astype(np.float32)
            elif new_shape is not None:
                bits16 = f32_to_bf16_bits(w)
                out[name] = (bits16.reshape(new_shape), "bfloat16")
                deq[name] = bf16_bits_to_f32(bits16)
            elif mapped:
                pieces, inverse = mapped
                deq[name] = inverse([put(module, arr) for module, arr in pieces])
                assert deq[name].shape == w.shape, name
            elif parts:
                pieces = [put(module, w[:, rows, :]) for module, rows in parts]
                deq[name] = np.concatenate(pieces, axis=1)
            elif unquantised and unquantised(name):
                bits16 = f32_to_bf16_bits(w)
                out[name] = (bits16, "bfloat16")
                deq[name] = bf16_bits_to_f32(bits16)
            elif w.ndim >= 2:
                assert name.endswith(".weight"), name
                deq[name] = put(name[: -len(".weight")], w)
            else:
                bits16 = f32_to_bf16_bits(w)
                out[name] = (bits16, "bfloat16")
                deq[name] = bf16_bits_to_f32(bits16)
        if tied:
            deq["lm_head.weight"] = deq["model.embed_tokens.weight"]

        # The reference runs on exactly the dequantised weights.
        missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in deq.items()},
                                                    strict=True)
        assert not missing and not unexpected
        ref_dir = tmp / "dequantized_f32"
        model.save_pretrained(ref_dir)

        fixture_dir.mkdir(parents=True, exist_ok=True)
        write_safetensors(fixture_dir / "model.safetensors", out, metadata={"format": "mlx"})
        hf_cfg = json.loads((ref_dir / "config.json").read_text())
        mlx_cfg = config_transform(hf_cfg)
        mlx_cfg["quantization"] = qcfg
        mlx_cfg["quantization_config"] = copy.deepcopy(qcfg)
        (fixture_dir / "config.json").write_text(json.dumps(mlx_cfg, indent=2, sort_keys=True) + "\n")

        # Self-check: an independent unpack + dequantise of the file on disk reproduces the
        # tensors handed to transformers bit for bit.
        disk = read_safetensors(fixture_dir / "model.safetensors")
        rebuilt = dequantize_mlx_state(disk, mlx_cfg["quantization"])
        for name, w in deq.items():
            parts = stacked_experts(name, w.shape)
            mapped = remap(name, w) if remap else None
            if mapped:
                pieces, inverse = mapped
                got = inverse([rebuilt[m + ".weight"] for m, _ in pieces])
            elif parts:
                got = np.concatenate([rebuilt[m + ".weight"] for m, _ in parts], axis=1)
            elif tied and name == "lm_head.weight":
                got = rebuilt["model.embed_tokens.weight"]
            elif reshaped and reshaped(name, w.shape) is not None:
                assert rebuilt[name].shape == tuple(reshaped(name, w.shape)), name
                got = rebuilt[name].reshape(w.shape)
            else:
                got = rebuilt[name]
            assert got.dtype == np.float32 and got.shape == w.shape, name
            assert np.array_equal(got.view(np.uint32), w.view(np.uint32)), f"dequant mismatch in {name}"
        return ref_dir

    return writer


def dequantize_mlx_state(t: dict[str, np.ndarray], qcfg: dict) -> dict[str, np.ndarray]:
    """mlx-community tensors -> float32 (``<m>.weight/.scales/.biases`` -> ``<m>.weight``)."""
    out = {}
    for name, arr in t.items():
        if name.endswith(".scales") or name.endswith(".biases"):
            continue
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if module is not None and module + ".scales" in t:
            ov = qcfg.get(module)
            gs = (ov or qcfg)["group_size"]
            bits = (ov or qcfg)["bits"]
            assert (ov or qcfg).get("mode", "affine") == "affine"
            assert arr.dtype == np.uint32
            out[name] = mlx_affine_dequantize(arr, t[module + ".scales"], t[module + ".biases"], gs, bits)
        else:
            out[name] = arr.astype(np.float32)
    return out


def softmax_topk_router_probe(k_attr: str = "top_k"):
    """Hook every module with a ``top_k`` attribute whose first output is router logits
    [tokens, experts]; records gap = p_(k) - p_(k+1) of softmax(logits) per token."""

    def probe(model: torch.nn.Module):
        gaps: list[float] = []
        handles = []

        def hook(mod, _inp, out):
            logits = out[0] if isinstance(out, tuple) else out
            p = torch.softmax(logits.detach().double(), dim=-1)
            k = getattr(mod, k_attr)
            top = torch.topk(p, k + 1, dim=-1).values
            gaps.extend((top[:, k - 1] - top[:, k]).tolist())

        for _name, mod in model.named_modules():
            if hasattr(mod, k_attr) and hasattr(mod, "weight") and type(mod).__name__.endswith("Router"):
                handles.append(mod.register_forward_hook(hook))
        assert handles, "router probe found no router modules"
        return gaps, lambda: [h.remove() for h in handles]

    return probe


# ----------------------------------------------------------------------------------------
# Family: qwen3_moe  (model-spec.md section 2)
# ----------------------------------------------------------------------------------------


def qwen3_moe_variants() -> list[Variant]:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    common = dict(hidden_size=64, rms_norm_eps=1e-6, hidden_act="silu", max_position_embeddings=512,
                  initializer_range=0.2, use_sliding_window=False, bos_token_id=1, eos_token_id=2)

    def mlx_config(hf: dict) -> dict:
        """HF v5 config -> the style mlx-community configs use (released Qwen3 config keys:
        ``num_experts``, top-level ``rope_theta`` + ``rope_scaling``, ``torch_dtype``)."""
        cfg = {k: v for k, v in hf.items() if k not in ("num_local_experts", "rope_parameters", "dtype")}
        cfg["num_experts"] = hf["num_local_experts"]
        assert hf["rope_parameters"]["rope_type"] == "default"
        cfg["rope_theta"] = hf["rope_parameters"]["rope_theta"]
        cfg["rope_scaling"] = None
        cfg["torch_dtype"] = "bfloat16"
        # transformers reads this legacy spelling back to the same config:
        legacy = Qwen3MoeConfig.from_dict(dict(cfg))
        for key in ("num_experts", "rope_parameters", "head_dim", "mlp_only_layers", "decoder_sparse_step",
                    "norm_topk_prob", "tie_word_embeddings", "attention_bias"):
            want = {"num_experts": hf["num_local_experts"], "rope_parameters": hf["rope_parameters"]}.get(key, hf.get(key))
            assert getattr(legacy, key) == want, (key, getattr(legacy, key), want)
        return cfg

    def experts_split(name: str, shape: tuple):
        """In-memory fused expert tensors -> mlx-lm SwitchGLU modules: gate_up_proj [E, 2I, H]
        holds gate rows 0..I-1 then up rows I..2I-1; down_proj [E, H, I] maps as is."""
        if name.endswith(".mlp.experts.gate_up_proj"):
            prefix = name[: -len("experts.gate_up_proj")]
            i = shape[1] // 2
            return [(prefix + "switch_mlp.gate_proj", slice(0, i)), (prefix + "switch_mlp.up_proj", slice(i, 2 * i))]
        if name.endswith(".mlp.experts.down_proj"):
            return [(name[: -len("experts.down_proj")] + "switch_mlp.down_proj", slice(None))]
        return None

    def router_8bit(module: str):
        return {"group_size": 64, "bits": 8} if module.endswith(".mlp.gate") else None

    probe = softmax_topk_router_probe()
    variants = []

    # 1. float32, untied head, normalised top-k, one dense layer via mlp_only_layers.
    cfg = Qwen3MoeConfig(vocab_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=32, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
                         num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1],
                         tie_word_embeddings=False, attention_bias=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, **common)
    variants.append(Variant(
        name="f32_untied_normtopk", config=cfg, model_cls=Qwen3MoeForCausalLM,
        randomise=randomise_norms_and_biases, writer=save_hf(torch.float32), seed=1000,
        prompt_len=16, gen_len=20, router_probe=probe, np_check=qwen3_moe_np_check,
        notes="HF layout saved by save_pretrained, float32. Untied lm_head, norm_topk_prob=true, "
              "layer 1 dense via mlp_only_layers=[1] (MoE layers 0,2,3). GQA 4 q heads / 2 kv heads, "
              "head_dim 32 != hidden/heads (16). rope_theta 1e6. All norm weights ~1+0.1N, no biases."))

    # 2. bfloat16 on disk, tied head, unnormalised top-k, attention biases, sparse step 2
    #    combined with mlp_only_layers (layer 5 would be MoE by the step rule, the list wins).
    cfg = Qwen3MoeConfig(vocab_size=512, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2,
                         head_dim=16, intermediate_size=96, moe_intermediate_size=32, num_experts=16,
                         num_experts_per_tok=4, norm_topk_prob=False, decoder_sparse_step=2, mlp_only_layers=[5],
                         tie_word_embeddings=True, attention_bias=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 10_000.0}, **common)
    variants.append(Variant(
        name="bf16_tied_bias_step2", config=cfg, model_cls=Qwen3MoeForCausalLM,
        randomise=randomise_norms_and_biases, writer=save_hf(torch.bfloat16), seed=2000,
        prompt_len=13, gen_len=20, router_probe=probe, np_check=qwen3_moe_np_check,
        notes="HF layout saved by save_pretrained, bfloat16 on disk (reference upcasts exactly to float32). "
              "tie_word_embeddings=true (no lm_head key), norm_topk_prob=false (raw softmax probs), "
              "attention_bias=true on q/k/v/o, decoder_sparse_step=2 with mlp_only_layers=[5]: MoE layers 1,3; "
              "dense 0,2,4,5. 16 experts top-4, 8 q heads / 2 kv heads (n_rep 4), head_dim 16 != 64/8. "
              "rope_theta 1e4."))

    # 3. MLX affine 4-bit (gs 32), router 8-bit gs 64, mlx-community layout, dense layer 0.
    cfg = Qwen3MoeConfig(vocab_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=32, intermediate_size=96, moe_intermediate_size=64, num_experts=8,
                         num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[0],
                         tie_word_embeddings=False, attention_bias=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, **common)
    variants.append(Variant(
        name="mlx_affine_q4", config=cfg, model_cls=Qwen3MoeForCausalLM,
        randomise=randomise_norms_and_biases,
        writer=save_mlx_affine(group_size=32, bits=4, override=router_8bit, config_transform=mlx_config,
                               stacked_experts=experts_split),
        seed=3000, prompt_len=20, gen_len=20, router_probe=probe, np_check=qwen3_moe_np_check,
        notes="mlx-community layout (safetensors metadata format=mlx): every Linear, the embedding and lm_head "
              "MLX-affine 4-bit group 32 (uint32 LSB-first packing, bf16 scales/biases, scales may be negative); "
              "routers model.layers.{1,2,3}.mlp.gate 8-bit group 64 via per-module overrides in "
              "config.json 'quantization' (duplicated as 'quantization_config'); experts stacked as "
              "mlp.switch_mlp.{gate,up,down}_proj [E, out, in*bits/32]; norms and attention linear biases "
              "(.bias, not to be confused with quantisation .biases) plain bf16. Layer 0 dense (mlp_only_layers=[0]) "
              "-> quantised dense MLP incl. down_proj with 3 groups. Config uses the released spelling: num_experts, "
              "top-level rope_theta, torch_dtype. Reference = transformers on the dequantised weights, "
              "w = f32(scale_bf16)*q + f32(bias_bf16) computed in float32."))
    return variants


def qwen3_moe_np_check(fixture_dir: Path, prompt: list[int], golden: dict) -> str:
    """Independent float64 numpy forward from the fixture files and the spec (model-spec.md 2.4/2.5);
    must reproduce transformers' logits and greedy tokens."""
    cfg = json.loads((fixture_dir / "config.json").read_text())
    t = read_safetensors(fixture_dir / "model.safetensors")
    if "quantization" in cfg:
        t = dequantize_mlx_state(t, cfg["quantization"])
    t = {k: v.astype(np.float64) for k, v in t.items()}

    H = cfg["hidden_size"]
    nH = cfg["num_attention_heads"]
    nKV = cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or H // nH
    eps = cfg["rms_norm_eps"]
    E = cfg.get("num_experts", cfg.get("num_local_experts"))
    K = cfg["num_experts_per_tok"]
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta"))
    L = cfg["num_hidden_layers"]
    step = cfg.get("decoder_sparse_step", 1)
    mlp_only = cfg.get("mlp_only_layers") or []
    is_moe = [(l not in mlp_only) and E > 0 and (l + 1) % step == 0 for l in range(L)]
    embed = t["model.embed_tokens.weight"]
    if cfg.get("tie_word_embeddings", False):
        assert "lm_head.weight" not in t, "tied checkpoint should not store lm_head"
        lm_head = embed
    else:
        lm_head = t["lm_head.weight"]

    def experts(l: int, proj: str) -> np.ndarray:
        stacked = f"model.layers.{l}.mlp.switch_mlp.{proj}.weight"
        if stacked in t:
            return t[stacked]
        return np.stack([t[f"model.layers.{l}.mlp.experts.{e}.{proj}.weight"] for e in range(E)])

    for l in range(L):  # the key layout must agree with the selection rule
        has_router = f"model.layers.{l}.mlp.gate.weight" in t
        has_dense = f"model.layers.{l}.mlp.gate_proj.weight" in t
        assert has_router == is_moe[l] and has_dense == (not is_moe[l]), f"layer {l} keys disagree with config"

    def rms(x, w):
        return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))

    def lin(x, name):
        y = x @ t[name + ".weight"].T
        return y + t[name + ".bias"] if name + ".bias" in t else y

    def silu(x):
        return x / (1.0 + np.exp(-x))

    inv_freq = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    gaps = []

    def forward(tokens: list[int]) -> np.ndarray:
        T = len(tokens)
        x = embed[np.asarray(tokens)]
        freqs = np.arange(T, dtype=np.float64)[:, None] * inv_freq[None, :]
        emb = np.concatenate([freqs, freqs], axis=-1)
        cos, sin = np.cos(emb)[:, None, :], np.sin(emb)[:, None, :]

        def rope(v):
            rot = np.concatenate([-v[..., d // 2:], v[..., : d // 2]], axis=-1)
            return v * cos + rot * sin

        causal = np.triu(np.full((T, T), -np.inf), k=1)
        for l in range(L):
            p = f"model.layers.{l}."
            h = rms(x, t[p + "input_layernorm.weight"])
            q = rms(lin(h, p + "self_attn.q_proj").reshape(T, nH, d), t[p + "self_attn.q_norm.weight"])
            k = rms(lin(h, p + "self_attn.k_proj").reshape(T, nKV, d), t[p + "self_attn.k_norm.weight"])
            v = lin(h, p + "self_attn.v_proj").reshape(T, nKV, d)
            q, k = rope(q), rope(k)
            out = np.empty((T, nH, d))
            for hh in range(nH):
                kv = hh // (nH // nKV)
                s = (q[:, hh, :] @ k[:, kv, :].T) * d ** -0.5 + causal
                s = np.exp(s - s.max(axis=-1, keepdims=True))
                out[:, hh, :] = (s / s.sum(axis=-1, keepdims=True)) @ v[:, kv, :]
            x = x + lin(out.reshape(T, nH * d), p + "self_attn.o_proj")
            h2 = rms(x, t[p + "post_attention_layernorm.weight"])
            if is_moe[l]:
                r = h2 @ t[p + "mlp.gate.weight"].T
                pr = np.exp(r - r.max(axis=-1, keepdims=True))
                pr = pr / pr.sum(axis=-1, keepdims=True)
                wg, wu, wd = experts(l, "gate_proj"), experts(l, "up_proj"), experts(l, "down_proj")
                y = np.zeros_like(h2)
                for n in range(T):
                    order = np.argsort(-pr[n], kind="stable")  # ties -> lowest expert id
                    gaps.append(pr[n, order[K - 1]] - pr[n, order[K]])
                    sel = order[:K]
                    w = pr[n, sel]
                    if cfg.get("norm_topk_prob", False):
                        w = w / w.sum()
                    for e, we in zip(sel, w):
                        y[n] += we * (wd[e] @ (silu(wg[e] @ h2[n]) * (wu[e] @ h2[n])))
            else:
                y = lin(silu(lin(h2, p + "mlp.gate_proj")) * lin(h2, p + "mlp.up_proj"), p + "mlp.down_proj")
            x = x + y
        return rms(x, t["model.norm.weight"]) @ lm_head.T

    logits = forward(prompt)
    want = np.asarray(golden["logits"], dtype=np.float64)
    err = np.abs(logits - want) / np.maximum(1.0, np.abs(want))
    assert err.max() < 1e-4, f"numpy forward disagrees with transformers: max rel err {err.max():.3g}"
    seq = list(prompt)
    for _ in range(len(golden["greedy_tokens"])):
        seq.append(int(np.argmax(forward(seq)[-1])))
    assert seq[len(prompt):] == golden["greedy_tokens"], (seq[len(prompt):], golden["greedy_tokens"])
    return (f"numpy f64 forward: max |dlogit|/max(1,|e|) = {err.max():.2e}, greedy identical, "
            f"min router gap {min(gaps) if gaps else float('nan'):.2e}")


class RouterGaps(list):
    """Gap list that also carries router statistics (stored in golden.json as router_stats)."""

    def __init__(self):
        super().__init__()
        self.stats: dict = {}


def sigmoid_group_router_probe(bias_attr: str = "e_score_correction_bias"):
    """Probe for DeepSeek-V3-style routers (GLM-4.7-Flash, DeepSeek-V3, Kimi-K2; class
    ``*TopkRouter`` returning (logits, weights, indices)). Recomputes the routing from the
    router logits in float64 and records two kinds of gaps, all in biased-score units
    (sigmoid(logit) + bias, the quantity selection is made on):

    * group choice (only when topk_group < n_group): per token, the topk_group-th minus the
      (topk_group+1)-th group score, group score = sum of the top-2 biased scores in the group;
    * expert choice: among the experts of the kept groups, the k-th minus the (k+1)-th biased
      score.

    It also asserts that the float64 recomputation reproduces transformers' selected sets and
    (to 1e-5) its routing weights, and counts how many token selections would change if the
    bias were ignored (stats; the harness rejects a seed where that count is 0 on the prompt)
    and, for grouped routers, how many would change without group limiting.
    """

    def route(sc: torch.Tensor, n_group: int, topk_group: int, k: int):
        n, e = sc.shape
        grp = sc.view(n, n_group, e // n_group).topk(2, dim=-1).values.sum(dim=-1)
        keep = grp.topk(topk_group, dim=-1).indices
        gmask = torch.zeros(n, n_group, dtype=torch.bool).scatter(1, keep, True)
        mask = gmask.repeat_interleave(e // n_group, dim=1)
        masked = sc.masked_fill(~mask, float("-inf"))
        return grp, masked, masked.topk(k, dim=-1).indices

    def probe(model: torch.nn.Module):
        gaps = RouterGaps()
        st = gaps.stats
        st.update(routings=0, selections_changed_by_bias=0, prompt_routings=0,
                  prompt_selections_changed_by_bias=0, min_group_gap=None, min_expert_gap=None)
        seen: set[int] = set()
        handles = []

        def hook(mod, _inp, out):
            logits, weights, indices = (o.detach() for o in out[:3])
            s = torch.sigmoid(logits.double())
            sc = s + getattr(mod, bias_attr).detach().double()
            g, tg, k = mod.num_group, mod.topk_group, mod.top_k
            grp, masked, idx = route(sc, g, tg, k)
            if tg < g:
                gs = grp.sort(dim=-1, descending=True).values
                gg = (gs[:, tg - 1] - gs[:, tg]).tolist()
                gaps.extend(gg)
                st["min_group_gap"] = min([x for x in (st["min_group_gap"],) if x is not None] + gg)
            top = masked.sort(dim=-1, descending=True).values
            if top.shape[1] > k:
                eg = (top[:, k - 1] - top[:, k]).tolist()
                eg = [x if x == x else float("inf") for x in eg]  # -inf - -inf
                gaps.extend(eg)
                st["min_expert_gap"] = min([x for x in (st["min_expert_gap"],) if x is not None] + eg)
            # Our reading of the router must reproduce transformers' choice and weights.
            assert torch.equal(idx.sort(dim=-1).values, indices.sort(dim=-1).values.to(idx.dtype)), \
                "float64 re-routing disagrees with transformers' selection"
            w = s.gather(1, indices.long())
            if mod.norm_topk_prob:
                w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
            w = w * mod.routed_scaling_factor
            assert torch.allclose(w, weights.double(), rtol=1e-5, atol=1e-7), "routing weights disagree"
            _, _, idx0 = route(s, g, tg, k)
            changed = int((idx0.sort(dim=-1).values != idx.sort(dim=-1).values).any(dim=-1).sum())
            st["routings"] += idx.shape[0]
            st["selections_changed_by_bias"] += changed
            if tg < g:  # how often group limiting matters (vs plain top-k over all experts)
                _, _, idx1 = route(sc, 1, 1, k)
                st["selections_changed_by_group_limit"] = st.get("selections_changed_by_group_limit", 0) + int(
                    (idx1.sort(dim=-1).values != idx.sort(dim=-1).values).any(dim=-1).sum())
            if id(mod) not in seen:  # first call of each router = the prompt forward
                seen.add(id(mod))
                st["prompt_routings"] += idx.shape[0]
                st["prompt_selections_changed_by_bias"] += changed

        for _name, mod in model.named_modules():
            if type(mod).__name__.endswith("TopkRouter") and hasattr(mod, bias_attr):
                handles.append(mod.register_forward_hook(hook))
        assert handles, "router probe found no router modules"
        return gaps, lambda: [h.remove() for h in handles]

    return probe


def randomise_mla_moe(bias_range: float):
    """Norms and linear biases as usual, plus e_score_correction_bias ~ U(-bias_range, bias_range)
    (init leaves it 0)."""

    def randomise(model: torch.nn.Module, gen: torch.Generator) -> None:
        randomise_norms_and_biases(model, gen)
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    b.copy_((torch.rand(b.shape, generator=gen, dtype=torch.float64) * 2 - 1) * bias_range)

    return randomise


def fused_experts_to_switch_mlp(name: str, shape: tuple):
    """In-memory fused experts -> mlx-lm SwitchGLU modules (gate_up_proj [E, 2I, H] = gate rows
    0..I-1 then up rows I..2I-1; down_proj [E, H, I] as is)."""
    if name.endswith(".mlp.experts.gate_up_proj"):
        prefix = name[: -len("experts.gate_up_proj")]
        i = shape[1] // 2
        return [(prefix + "switch_mlp.gate_proj", slice(0, i)), (prefix + "switch_mlp.up_proj", slice(i, 2 * i))]
    if name.endswith(".mlp.experts.down_proj"):
        return [(name[: -len("experts.down_proj")] + "switch_mlp.down_proj", slice(None))]
    return None


def kv_b_to_embed_q_unembed_out(num_heads: int, qk_nope: int, v_head: int):
    """``self_attn.kv_b_proj.weight`` [H*(nope+v), kv_lora] (per head: nope rows of W_UK then v
    rows of W_UV) -> mlx-lm MultiLinear ``embed_q.weight`` [H, kv_lora, nope] (= W_UK[h]^T) and
    ``unembed_out.weight`` [H, v, kv_lora] (= W_UV[h]); model-spec.md 6.5."""

    def remap(name: str, w: np.ndarray):
        if not name.endswith(".self_attn.kv_b_proj.weight"):
            return None
        prefix = name[: -len("kv_b_proj.weight")]
        kv_lora = w.shape[1]
        per = w.reshape(num_heads, qk_nope + v_head, kv_lora)
        embed_q = np.ascontiguousarray(per[:, :qk_nope, :].transpose(0, 2, 1))
        unembed_out = np.ascontiguousarray(per[:, qk_nope:, :])

        def inverse(arrs):
            eq, uo = arrs
            return np.concatenate([eq.transpose(0, 2, 1), uo], axis=1).reshape(w.shape).astype(np.float32)

        return [(prefix + "embed_q", embed_q), (prefix + "unembed_out", unembed_out)], inverse

    return remap


def _yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * np.log(scale) + 1.0


def mla_np_check(fixture_dir: Path, prompt: list[int], golden: dict) -> str:
    """Independent float64 numpy forward for MLA + sigmoid/grouped-router families
    (glm4_moe_lite, deepseek_v3), from the fixture files only (HF or mlx-community layout);
    must reproduce transformers' logits and greedy tokens."""
    import math

    cfg = json.loads((fixture_dir / "config.json").read_text())
    t = read_safetensors(fixture_dir / "model.safetensors")
    if "quantization" in cfg:
        t = dequantize_mlx_state(t, cfg["quantization"])
    t = {k: v.astype(np.float64) for k, v in t.items()}
    mt = cfg["model_type"]
    H = cfg["hidden_size"]
    nH = cfg["num_attention_heads"]
    nope, rdim, vdim = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    qk = nope + rdim
    kv_lora = cfg["kv_lora_rank"]
    eps = cfg["rms_norm_eps"]
    L = cfg["num_hidden_layers"]
    E = cfg["n_routed_experts"]
    K = cfg["num_experts_per_tok"]
    G, TG = cfg["n_group"], cfg["topk_group"]
    if mt == "glm4_moe_lite":
        types = cfg.get("mlp_layer_types") or (["dense"] + ["sparse"] * (L - 1))
        is_moe = [types[l] == "sparse" for l in range(L)]
    else:
        assert mt == "deepseek_v3", mt
        is_moe = [l >= cfg["first_k_dense_replace"] for l in range(L)]
    rp = cfg.get("rope_parameters") or dict(cfg.get("rope_scaling") or {}, rope_theta=cfg["rope_theta"])
    rtype = rp.get("rope_type", rp.get("type", "default"))
    base = rp["rope_theta"]
    # RoPE (model-spec 1.3 / transformers modeling_rope_utils), float64 here.
    j = np.arange(0, rdim, 2, dtype=np.float64)
    inv_freq = 1.0 / base ** (j / rdim)
    att_factor = 1.0
    scaling = qk ** -0.5
    if rtype == "yarn":
        f = rp["factor"]
        L0 = rp["original_max_position_embeddings"]
        ms, msa = rp.get("mscale"), rp.get("mscale_all_dim")
        att_factor = rp.get("attention_factor") or (
            _yarn_get_mscale(f, ms) / _yarn_get_mscale(f, msa) if ms and msa else _yarn_get_mscale(f))
        bf, bs = rp.get("beta_fast") or 32, rp.get("beta_slow") or 1

        def corr(r):
            return rdim * math.log(L0 / (r * 2 * math.pi)) / (2 * math.log(base))

        lo, hi = corr(bf), corr(bs)
        if rp.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, rdim - 1)
        if lo == hi:
            hi += 0.001
        ramp = np.clip((np.arange(rdim // 2) - lo) / (hi - lo), 0, 1)
        inv_freq = (inv_freq / f) * ramp + inv_freq * (1 - ramp)
        if msa:
            scaling *= _yarn_get_mscale(f, msa) ** 2
    else:
        assert rtype == "default", rtype
    interleave = cfg.get("rope_interleave", True)
    embed = t["model.embed_tokens.weight"]
    lm_head = embed if cfg.get("tie_word_embeddings", False) else t["lm_head.weight"]

    def rms(x, w, e):
        return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + e))

    def lin(x, name):
        y = x @ t[name + ".weight"].T
        return y + t[name + ".bias"] if name + ".bias" in t else y

    def silu(x):
        return x / (1.0 + np.exp(-x))

    def mlp(x, p):
        return lin(silu(lin(x, p + "gate_proj")) * lin(x, p + "up_proj"), p + "down_proj")

    def kv_b(p):
        if p + "self_attn.kv_b_proj.weight" in t:
            return t[p + "self_attn.kv_b_proj.weight"].reshape(nH, nope + vdim, kv_lora)
        eq, uo = t[p + "self_attn.embed_q.weight"], t[p + "self_attn.unembed_out.weight"]
        assert eq.shape == (nH, kv_lora, nope) and uo.shape == (nH, vdim, kv_lora)
        return np.concatenate([eq.transpose(0, 2, 1), uo], axis=1)

    def experts(p, proj):
        stacked = p + f"mlp.switch_mlp.{proj}.weight"
        if stacked in t:
            return t[stacked]
        return np.stack([t[p + f"mlp.experts.{e}.{proj}.weight"] for e in range(E)])

    for l in range(L):
        p = f"model.layers.{l}."
        assert (p + "mlp.gate.weight" in t) == is_moe[l] and (p + "mlp.gate_proj.weight" in t) != is_moe[l], l
    assert f"model.layers.{L}.input_layernorm.weight" not in t

    def rope(x, cos, sin):  # x [..., T, rdim] with cos/sin [T, rdim/2]
        if interleave:
            a, b = x[..., 0::2], x[..., 1::2]
        else:
            a, b = x[..., : rdim // 2], x[..., rdim // 2:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)

    def route(sc):
        grp = np.sort(sc.reshape(G, E // G), axis=-1)[:, -2:].sum(-1)
        keep = np.argsort(-grp, kind="stable")[:TG]
        m = np.full(E, -np.inf)
        for g in keep:
            m[g * (E // G):(g + 1) * (E // G)] = 0.0
        return np.argsort(-(sc + m), kind="stable")[:K]

    changed = [0]

    def forward(tokens):
        T = len(tokens)
        x = embed[np.asarray(tokens)]
        ang = np.arange(T, dtype=np.float64)[:, None] * inv_freq[None, :]
        cos, sin = np.cos(ang) * att_factor, np.sin(ang) * att_factor
        causal = np.triu(np.full((T, T), -np.inf), k=1)
        for l in range(L):
            p = f"model.layers.{l}."
            a = p + "self_attn."
            h = rms(x, t[p + "input_layernorm.weight"], eps)
            if cfg.get("q_lora_rank") is None:
                q = lin(h, a + "q_proj")
            else:
                q = lin(rms(lin(h, a + "q_a_proj"), t[a + "q_a_layernorm.weight"], 1e-6), a + "q_b_proj")
            q = q.reshape(T, nH, qk).transpose(1, 0, 2)
            ckv = lin(h, a + "kv_a_proj_with_mqa")
            c = rms(ckv[:, :kv_lora], t[a + "kv_a_layernorm.weight"], 1e-6)
            k_pe = rope(ckv[:, kv_lora:], cos, sin)  # [T, rdim], shared by all heads
            q_pe = rope(q[..., nope:], cos, sin)
            W = kv_b(p)  # [nH, nope+v, kv_lora]
            k_nope = np.einsum("tc,hdc->htd", c, W[:, :nope, :])
            v = np.einsum("tc,hdc->htd", c, W[:, nope:, :])
            s = (np.einsum("hqd,hkd->hqk", q[..., :nope], k_nope) + np.einsum("hqd,kd->hqk", q_pe, k_pe))
            s = s * scaling + causal
            s = np.exp(s - s.max(-1, keepdims=True))
            s = s / s.sum(-1, keepdims=True)
            o = np.einsum("hqk,hkd->qhd", s, v).reshape(T, nH * vdim)
            x = x + lin(o, a + "o_proj")
            h2 = rms(x, t[p + "post_attention_layernorm.weight"], eps)
            if is_moe[l]:
                sg = 1.0 / (1.0 + np.exp(-(h2 @ t[p + "mlp.gate.weight"].T)))
                bias = t[p + "mlp.gate.e_score_correction_bias"]
                wg, wu, wd = experts(p, "gate_proj"), experts(p, "up_proj"), experts(p, "down_proj")
                y = mlp(h2, p + "mlp.shared_experts.")
                for n in range(T):
                    sel = route(sg[n] + bias)
                    changed[0] += set(sel) != set(route(sg[n]))
                    w = sg[n, sel]
                    if cfg.get("norm_topk_prob", True):
                        w = w / (w.sum() + 1e-20)
                    w = w * cfg["routed_scaling_factor"]
                    for e, we in zip(sel, w):
                        y[n] += we * (wd[e] @ (silu(wg[e] @ h2[n]) * (wu[e] @ h2[n])))
            else:
                y = mlp(h2, p + "mlp.")
            x = x + y
        return rms(x, t["model.norm.weight"], eps) @ lm_head.T

    logits = forward(prompt)
    prompt_changed = changed[0]
    want = np.asarray(golden["logits"], dtype=np.float64)
    err = np.abs(logits - want) / np.maximum(1.0, np.abs(want))
    assert err.max() < 1e-4, f"numpy forward disagrees with transformers: max rel err {err.max():.3g}"
    seq = list(prompt)
    for _ in range(len(golden["greedy_tokens"])):
        seq.append(int(np.argmax(forward(seq)[-1])))
    assert seq[len(prompt):] == golden["greedy_tokens"], (seq[len(prompt):], golden["greedy_tokens"])
    return (f"numpy f64 forward: max |dlogit|/max(1,|e|) = {err.max():.2e}, greedy identical, "
            f"router bias changed {prompt_changed} prompt token-layer selections")


# ----------------------------------------------------------------------------------------
# Family: glm4_moe_lite  (GLM-4.7-Flash; model-spec.md section 3)
# ----------------------------------------------------------------------------------------


def glm4_moe_lite_variants() -> list[Variant]:
    from transformers import Glm4MoeLiteConfig, Glm4MoeLiteForCausalLM

    common = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=96,
                  rms_norm_eps=1e-5, hidden_act="silu", max_position_embeddings=512, initializer_range=0.2,
                  bos_token_id=1, eos_token_id=2, pad_token_id=None)
    probe = sigmoid_group_router_probe()
    keep_bias = ("e_score_correction_bias",)
    variants = []

    # 1. bf16 HF layout, q_lora, n_group 1, top-2 of 8, one shared expert, layer 0 dense by default.
    cfg = Glm4MoeLiteConfig(vocab_size=512, num_hidden_layers=3, q_lora_rank=48, kv_lora_rank=32,
                            qk_nope_head_dim=24, qk_rope_head_dim=8, v_head_dim=16, moe_intermediate_size=32,
                            n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
                            routed_scaling_factor=1.8, norm_topk_prob=True, rope_interleave=True,
                            tie_word_embeddings=False, attention_bias=False,
                            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, **common)
    variants.append(Variant(
        name="bf16_hf", config=cfg, model_cls=Glm4MoeLiteForCausalLM, randomise=randomise_mla_moe(0.1),
        writer=save_hf(torch.bfloat16, keep_fp32=keep_bias), seed=4000, prompt_len=16, gen_len=20,
        router_probe=probe, np_check=mla_np_check,
        notes="HF layout saved by save_pretrained, bfloat16 on disk except mlp.gate.e_score_correction_bias (F32). "
              "MLA: q_lora_rank 48 (q_a_proj -> q_a_layernorm eps 1e-6 -> q_b_proj), kv_lora_rank 32, qk_nope 24 + "
              "qk_rope 8 = qk_head 32 != v_head 16, 4 heads; rope_interleave true, default rope theta 1e6 on the 8 "
              "rope dims. mlp_layer_types absent from the constructor -> default ['dense','sparse','sparse'] "
              "(saved explicitly in config.json). Router: sigmoid, e_score_correction_bias ~U(-0.1,0.1) for "
              "selection only, n_group 1, top-2 of 8, norm_topk_prob true, routed_scaling_factor 1.8; one shared "
              "expert (intermediate 32). Untied lm_head. rms_norm_eps 1e-5. Router margins are in biased "
              "sigmoid-score units."))

    # 2. f32, no q_lora (plain q_proj), grouped routing, 2 shared experts, explicit mlp_layer_types,
    #    attention_bias (on kv_a_proj_with_mqa and o_proj; q_proj never has a bias).
    cfg = Glm4MoeLiteConfig(vocab_size=384, num_hidden_layers=4, q_lora_rank=None, kv_lora_rank=32,
                            qk_nope_head_dim=24, qk_rope_head_dim=8, v_head_dim=16, moe_intermediate_size=24,
                            n_routed_experts=16, num_experts_per_tok=3, n_shared_experts=2, n_group=2, topk_group=1,
                            routed_scaling_factor=2.5, norm_topk_prob=False, rope_interleave=True,
                            mlp_layer_types=["dense", "sparse", "dense", "sparse"], tie_word_embeddings=False,
                            attention_bias=True, rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
                            **common)
    variants.append(Variant(
        name="f32_grouped_noqlora", config=cfg, model_cls=Glm4MoeLiteForCausalLM, randomise=randomise_mla_moe(0.1),
        writer=save_hf(torch.float32), seed=5000, prompt_len=16, gen_len=20, router_probe=probe,
        np_check=mla_np_check,
        notes="HF layout saved by save_pretrained, float32. q_lora_rank null -> plain self_attn.q_proj (no bias, "
              "no q_a_layernorm). attention_bias true -> .bias on kv_a_proj_with_mqa and o_proj only (q_proj, "
              "q_b_proj, kv_b_proj never have one). kv_lora 32, qk_nope 24 + qk_rope 8, v_head 16, 4 heads, rope "
              "theta 1e4 interleaved. mlp_layer_types ['dense','sparse','dense','sparse'] (MoE layers 1,3). "
              "Router: 16 experts in n_group 2 groups, topk_group 1 (group score = sum of the top-2 biased "
              "scores, experts of dropped groups -> -inf), top-3, norm_topk_prob false (raw sigmoid weights), "
              "routed_scaling_factor 2.5, bias ~U(-0.1,0.1); n_shared_experts 2 -> one shared MLP of intermediate "
              "2*24 = 48. Router margins (group and expert choice) in biased sigmoid-score units."))

    # 3. mlx-community layout, MLX affine 4-bit gs 32.
    nh, nope, vh = 4, 32, 16
    cfg = Glm4MoeLiteConfig(vocab_size=512, num_hidden_layers=3, q_lora_rank=64, kv_lora_rank=32,
                            qk_nope_head_dim=nope, qk_rope_head_dim=16, v_head_dim=vh, moe_intermediate_size=32,
                            n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1, n_group=1, topk_group=1,
                            routed_scaling_factor=1.8, norm_topk_prob=True, rope_interleave=True,
                            tie_word_embeddings=False, attention_bias=False,
                            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, **common)

    def mlx_config(hf: dict) -> dict:
        """HF v5 config -> the spelling of the released GLM-4.7-Flash config.json that mlx-community
        conversions carry: top-level rope_theta / partial_rotary_factor, rope_scaling null,
        first_k_dense_replace instead of mlp_layer_types, noaux_tc/sigmoid markers, torch_dtype."""
        cfg = {k: v for k, v in hf.items() if k not in ("rope_parameters", "dtype", "mlp_layer_types", "qk_head_dim")}
        assert hf["mlp_layer_types"] == ["dense"] + ["sparse"] * (hf["num_hidden_layers"] - 1)
        assert hf["rope_parameters"]["rope_type"] == "default"
        cfg.update(rope_theta=hf["rope_parameters"]["rope_theta"], rope_scaling=None, partial_rotary_factor=1.0,
                   first_k_dense_replace=1, num_nextn_predict_layers=1, topk_method="noaux_tc",
                   scoring_func="sigmoid", torch_dtype="bfloat16")
        legacy = Glm4MoeLiteConfig.from_dict(dict(cfg))
        # top-level partial_rotary_factor is moved into rope_parameters on load
        assert legacy.rope_parameters == dict(hf["rope_parameters"], partial_rotary_factor=1.0), legacy.rope_parameters
        for key in ("mlp_layer_types", "q_lora_rank", "n_group", "norm_topk_prob", "num_experts_per_tok",
                    "routed_scaling_factor", "rope_interleave", "tie_word_embeddings", "attention_bias"):
            assert getattr(legacy, key) == hf[key], (key, getattr(legacy, key), hf[key])
        return cfg

    variants.append(Variant(
        name="mlx_affine_q4", config=cfg, model_cls=Glm4MoeLiteForCausalLM, randomise=randomise_mla_moe(0.1),
        writer=save_mlx_affine(group_size=32, bits=4, override=lambda _m: None, config_transform=mlx_config,
                               stacked_experts=fused_experts_to_switch_mlp,
                               unquantised=lambda n: n.endswith(".mlp.gate.weight"),
                               keep_fp32=lambda n: n.endswith(".mlp.gate.e_score_correction_bias"),
                               remap=kv_b_to_embed_q_unembed_out(nh, nope, vh)),
        seed=6000, prompt_len=20, gen_len=20, router_probe=probe, np_check=mla_np_check,
        notes="mlx-community layout (safetensors metadata format=mlx). MLX-affine 4-bit group 32 (uint32 LSB-first "
              "packing, bf16 scales/biases, scales may be negative), no per-module overrides: "
              "model.embed_tokens, lm_head, self_attn.{q_a_proj,q_b_proj,kv_a_proj_with_mqa,o_proj}, "
              "self_attn.embed_q [4,32(kv_lora),32(qk_nope)] (1 group along qk_nope), self_attn.unembed_out "
              "[4,16(v_head),32(kv_lora)] (1 group along kv_lora), layer-0 dense mlp.{gate,up,down}_proj "
              "(down: 3 groups), mlp.shared_experts.{gate,up,down}_proj, mlp.switch_mlp.{gate,up,down}_proj "
              "[16,out,in*4/32]. NOT quantised: mlp.gate.weight (bf16), mlp.gate.e_score_correction_bias (F32), "
              "all norms (bf16; incl. q_a_layernorm, kv_a_layernorm). No kv_b_proj on disk: kv_b_proj rows of "
              "head h = [embed_q[h]^T (32x32 = qk_nope x kv_lora); unembed_out[h] (16x32)]. Config in the released "
              "spelling: no mlp_layer_types (transformers default: layer 0 dense) with first_k_dense_replace 1, "
              "top-level rope_theta 1e6, rope_scaling null, partial_rotary_factor 1.0, num_nextn_predict_layers 1 "
              "(no MTP weights stored, as in mlx-community conversions), torch_dtype. q_lora 64, kv_lora 32, qk_nope "
              "32 + qk_rope 16 = 48 != v_head 16, 4 heads, interleaved rope. Router: n_group 1, top-4 of 16, "
              "norm_topk_prob true, scaling 1.8, bias ~U(-0.1,0.1); one shared expert. Reference = transformers on "
              "the dequantised weights, w = f32(scale_bf16)*q + f32(bias_bf16) in float32."))
    return variants


# ----------------------------------------------------------------------------------------
# Family: deepseek_v3  (DeepSeek-V3 / Kimi-K2 architecture; same MLA + router as GLM-4.7-Flash)
# ----------------------------------------------------------------------------------------


def deepseek_v3_variants() -> list[Variant]:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    # num_key_value_heads must be given: its default is 128 (not num_attention_heads), and MLA
    # uses num_attention_heads // num_key_value_heads as the repeat_kv factor.
    common = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=96,
                  rms_norm_eps=1e-6, hidden_act="silu", initializer_range=0.2, bos_token_id=1, eos_token_id=2,
                  pad_token_id=None)
    probe = sigmoid_group_router_probe()
    variants = []

    # 1. bf16, YaRN (factor 4, original 64; mscale != mscale_all_dim so both the cos/sin factor and
    #    the softmax-scale mscale^2 differ from 1), grouped routing 4 groups keep 2, top-4 of 16.
    cfg = DeepseekV3Config(vocab_size=512, num_hidden_layers=3, q_lora_rank=48, kv_lora_rank=32,
                           qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=24, moe_intermediate_size=32,
                           n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1, n_group=4, topk_group=2,
                           first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                           rope_interleave=True, tie_word_embeddings=False, attention_bias=False,
                           max_position_embeddings=256,
                           rope_parameters={"rope_type": "yarn", "rope_theta": 10_000.0, "factor": 4.0,
                                            "original_max_position_embeddings": 64, "beta_fast": 32,
                                            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.707},
                           **common)
    variants.append(Variant(
        name="bf16_yarn_grouped", config=cfg, model_cls=DeepseekV3ForCausalLM, randomise=randomise_mla_moe(0.1),
        writer=save_hf(torch.bfloat16, keep_fp32=("e_score_correction_bias",)), seed=7000, prompt_len=16,
        gen_len=20, router_probe=probe, np_check=mla_np_check,
        notes="HF layout saved by save_pretrained, bfloat16 on disk except mlp.gate.e_score_correction_bias (F32). "
              "MoE layers chosen by first_k_dense_replace=1 (layer_idx >= 1 -> MoE: layers 1,2). MLA: q_lora 48, "
              "kv_lora 32, qk_nope 16 + qk_rope 16 = 32 != v_head 24, 4 heads (num_key_value_heads 4 given "
              "explicitly; its default is 128). YaRN: theta 1e4, factor 4, original_max_position_embeddings 64, "
              "max_position_embeddings 256, beta_fast 32, beta_slow 1, truncate default (true) -> correction range "
              "[0,3] over the 8 frequencies (i=0 original, i=1,2 blended, i>=3 divided by 4); attention_factor "
              "(cos/sin multiplier) = mscale(4,1.0)/mscale(4,0.707) = 1.0369927; softmax scale = 32^-0.5 * "
              "mscale(4,0.707)^2 = 0.21312697 (mscale(f,m) = 0.1*m*ln f + 1). YaRN is static in transformers: "
              "positions (<36 here) vs original_max_position_embeddings do not matter. Interleaved rope. Router: "
              "16 experts in 4 groups, topk_group 2, top-4, norm_topk_prob true, routed_scaling_factor 2.5, bias "
              "~U(-0.1,0.1); one shared expert (intermediate 32). Untied. rms_norm_eps 1e-6. Router margins "
              "(group and expert choice) in biased sigmoid-score units."))

    # 2. f32, q_lora + attention_bias (q_a_proj, kv_a_proj_with_mqa, o_proj biases), default rope
    #    with rope_interleave false (half-split), Kimi-K2-like n_group 1, 2 dense layers, tied head.
    cfg = DeepseekV3Config(vocab_size=384, num_hidden_layers=4, q_lora_rank=32, kv_lora_rank=48,
                           qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, moe_intermediate_size=32,
                           n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2, n_group=1, topk_group=1,
                           first_k_dense_replace=2, routed_scaling_factor=1.5, norm_topk_prob=False,
                           rope_interleave=False, tie_word_embeddings=True, attention_bias=True,
                           max_position_embeddings=512,
                           rope_parameters={"rope_type": "default", "rope_theta": 50_000.0}, **common)
    variants.append(Variant(
        name="f32_bias_halfrope_tied", config=cfg, model_cls=DeepseekV3ForCausalLM,
        randomise=randomise_mla_moe(0.1), writer=save_hf(torch.float32), seed=8000, prompt_len=13, gen_len=20,
        router_probe=probe, np_check=mla_np_check,
        notes="HF layout saved by save_pretrained, float32. first_k_dense_replace=2 -> layers 0,1 dense, 2,3 MoE. "
              "attention_bias true -> .bias on q_a_proj, kv_a_proj_with_mqa, o_proj (not q_b_proj / kv_b_proj). "
              "q_lora 32 < kv_lora 48, qk_nope 16 + qk_rope 8, v_head 16, 4 heads. rope_interleave FALSE: half-split "
              "(rotate_half) rotation of the 8 rope dims, default rope theta 5e4. tie_word_embeddings true (no "
              "lm_head key). Router: n_group 1 / topk_group 1 (Kimi-K2 style, no group limiting), top-2 of 8, "
              "norm_topk_prob false (raw sigmoid weights), routed_scaling_factor 1.5, bias ~U(-0.1,0.1); "
              "n_shared_experts 2 -> one shared MLP of intermediate 64."))
    return variants


# ----------------------------------------------------------------------------------------
# Family: gpt_oss  (model-spec.md section 5; MXFP4 sections 5.8 and 6.2)
# ----------------------------------------------------------------------------------------

FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                      dtype=np.float32)


def mxfp4_quantize(w: np.ndarray):
    """[..., n] float -> (codes u8 [..., n/2] low nibble = even element, E8M0 scales u8 [..., n/32]).
    Per 32-block the exponent puts the block's largest magnitude at or below 6 (the largest E2M1
    value); each element is then the nearest E2M1 value (ties to the even code)."""
    blocks = w.reshape(*w.shape[:-1], -1, 32).astype(np.float64)
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    e = np.ceil(np.log2(np.maximum(amax, 1e-30) / 6.0)).clip(-127, 127)
    scaled = blocks / np.exp2(e)
    mags = FP4_VALUES[:8].astype(np.float64)
    idx = np.abs(np.abs(scaled)[..., None] - mags).argmin(axis=-1)  # first (= smaller, even) on ties
    codes = (idx | np.where(scaled < 0, 8, 0)).astype(np.uint8).reshape(*w.shape[:-1], -1)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    scales = (e[..., 0] + 127).astype(np.uint8)
    return packed, scales


def mxfp4_dequantize(packed: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Model-spec 5.8 / 6.2, written independently of transformers: [..., n/2] u8 + [..., n/32] u8."""
    codes = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)
    vals = FP4_VALUES[codes].reshape(*packed.shape[:-1], -1, 32)
    return (vals * np.exp2(scales.astype(np.float64) - 127)[..., None]).astype(np.float32).reshape(vals.shape[:-2] + (-1,))


def randomise_gpt_oss(gate_up_scale: float = 1.0):
    """Norms 1+0.1N, linear/router/expert biases 0.1N, sinks N(0,1) (init leaves zeros and ones:
    a bias or sink bug would pass); optionally scale gate_up_proj so that the clamp at
    swiglu_limit (gate from above, up on both sides) is hit."""

    def randomise(model: torch.nn.Module, gen: torch.Generator) -> None:
        randomise_norms_and_biases(model, gen)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("_bias"):
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen))
                elif name.endswith("self_attn.sinks"):
                    p.copy_(torch.randn(p.shape, generator=gen))
                elif name.endswith("experts.gate_up_proj"):
                    p.mul_(gate_up_scale)

    return randomise


def topk_logit_router_probe():
    """GPT-OSS selects on raw router logits (bias included): gap = logit_(k) - logit_(k+1).
    Also counts gate/up values beyond swiglu_limit (the clamp must be exercised)."""

    def probe(model: torch.nn.Module):
        gaps: list[float] = []
        handles = []

        def hook(mod, _inp, out):
            logits = out[0].detach().double()
            top = torch.topk(logits, mod.top_k + 1, dim=-1).values
            gaps.extend((top[:, mod.top_k - 1] - top[:, mod.top_k]).tolist())

        for _name, mod in model.named_modules():
            if type(mod).__name__ == "GptOssTopKRouter":
                handles.append(mod.register_forward_hook(hook))
        assert handles, "router probe found no GptOssTopKRouter"
        return gaps, lambda: [h.remove() for h in handles]

    return probe


def gpt_oss_config(**kw):
    from transformers import GptOssConfig
    base = dict(vocab_size=384, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, intermediate_size=64, num_local_experts=8, num_experts_per_tok=2, sliding_window=5,
                max_position_embeddings=4096, initializer_range=0.2, rms_norm_eps=1e-5, attention_bias=True,
                tie_word_embeddings=False, bos_token_id=None, eos_token_id=2, pad_token_id=0,
                rope_parameters={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                 "original_max_position_embeddings": 4096, "truncate": False,
                                 "rope_theta": 150000.0})
    base.update(kw)
    return GptOssConfig(**base)


def save_gpt_oss_mxfp4_release():
    """Writer: the original openai/gpt-oss layout (model-spec 5.8): experts as
    ``*_blocks`` u8 [E, out, in/32, 16] + ``*_scales`` u8 [E, out, in/32] in the [out, in]
    orientation (gate/up interleaved by rows), everything else bf16, quantization_config
    quant_method mxfp4. The reference is transformers loading *this folder* with
    ``Mxfp4Config(dequantize=True)`` (its own dequantisation), after checking that it equals an
    independent numpy dequantisation bit for bit."""

    def writer(model: torch.nn.Module, fixture_dir: Path, tmp: Path) -> Path:
        from transformers import Mxfp4Config
        from transformers.integrations.mxfp4 import convert_moe_packed_tensors
        sd = {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}
        out: dict[str, tuple[np.ndarray, str]] = {}
        deq: dict[str, np.ndarray] = {}
        for name, w in sd.items():
            if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
                rows = np.ascontiguousarray(np.swapaxes(w, 1, 2))  # [E, in, out] -> [E, out, in]
                packed, scales = mxfp4_quantize(rows)
                e, o, _ = rows.shape
                out[name + "_blocks"] = (packed.reshape(e, o, -1, 16), "uint8")
                out[name + "_scales"] = (scales, "uint8")
                mine = np.swapaxes(mxfp4_dequantize(packed, scales), 1, 2)
                theirs = convert_moe_packed_tensors(torch.from_numpy(packed.reshape(e, o, -1, 16)),
                                                    torch.from_numpy(scales), dtype=torch.float32).numpy()
                assert np.array_equal(mine, theirs), f"MXFP4 dequantisation differs from transformers in {name}"
                deq[name] = mine
            else:
                bits16 = f32_to_bf16_bits(w)
                out[name] = (bits16, "bfloat16")
                deq[name] = bf16_bits_to_f32(bits16)
        fixture_dir.mkdir(parents=True, exist_ok=True)
        write_safetensors(fixture_dir / "model.safetensors", out, metadata={"format": "pt"})
        cfg = model.config.to_dict()
        cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
        cfg["dtype"] = "bfloat16"
        (fixture_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        # transformers reads the fixture itself, dequantising the blocks on the CPU; it must
        # hold exactly the weights above.
        ref = type(model).from_pretrained(fixture_dir, dtype=torch.float32,
                                          quantization_config=Mxfp4Config(dequantize=True))
        for name, t in ref.state_dict().items():
            assert np.array_equal(t.float().numpy(), deq[name]), f"transformers loaded {name} differently"
        ref_dir = tmp / "dequantized_f32"
        model.load_state_dict({k: torch.from_numpy(v) for k, v in deq.items()}, strict=True)
        model.save_pretrained(ref_dir)
        return ref_dir

    return writer


def save_gpt_oss_mlx(expert_mode: str):
    """Writer: mlx-community layout (model-spec 6.5): experts split from the interleaved HF
    tensors into ``mlp.experts.{gate,up,down}_proj`` [E, out, ...] (even rows -> gate, odd ->
    up; biases likewise, as ``.bias``), quantised in ``expert_mode`` (``mxfp4``: uint32
    [E, out, in/8] + uint8 E8M0 scales; per-module overrides in config.json); every other
    Linear, the embedding and lm_head MLX-affine 8-bit group 64 (the router too, as mlx-lm's
    predicate does); norms, sinks and linear biases bf16. The reference runs on exactly the
    dequantised weights."""

    def writer(model: torch.nn.Module, fixture_dir: Path, tmp: Path) -> Path:
        cfg = model.config
        sd = {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}
        out: dict[str, tuple[np.ndarray, str]] = {}
        deq: dict[str, np.ndarray] = {}
        qcfg: dict = {"group_size": 64, "bits": 8, "mode": "affine"}

        def affine(module: str, w: np.ndarray) -> np.ndarray:
            packed, s, b = mlx_affine_quantize(w, 64, 8)
            out[module + ".weight"] = (packed, "uint32")
            out[module + ".scales"] = (s, "bfloat16")
            out[module + ".biases"] = (b, "bfloat16")
            return mlx_affine_dequantize(packed, bf16_bits_to_f32(s), bf16_bits_to_f32(b), 64, 8)

        def experts(module: str, w: np.ndarray) -> np.ndarray:  # w [E, out, in]
            assert expert_mode == "mxfp4"
            packed, scales = mxfp4_quantize(w)
            qcfg[module] = {"group_size": 32, "bits": 4, "mode": "mxfp4"}
            out[module + ".weight"] = (np.ascontiguousarray(packed).view(np.uint32), "uint32")
            out[module + ".scales"] = (scales, "uint8")
            return mxfp4_dequantize(packed, scales)

        def vec(name: str, w: np.ndarray) -> np.ndarray:
            bits16 = f32_to_bf16_bits(w)
            out[name] = (bits16, "bfloat16")
            return bf16_bits_to_f32(bits16)

        for name, w in sd.items():
            if name.endswith("experts.gate_up_proj"):
                x = name[: -len("gate_up_proj")]
                rows = np.swapaxes(w, 1, 2)  # [E, 2I, H]
                g = experts(x + "gate_proj", np.ascontiguousarray(rows[:, 0::2]))
                u = experts(x + "up_proj", np.ascontiguousarray(rows[:, 1::2]))
                both = np.empty_like(rows)
                both[:, 0::2], both[:, 1::2] = g, u
                deq[name] = np.ascontiguousarray(np.swapaxes(both, 1, 2))
            elif name.endswith("experts.gate_up_proj_bias"):
                x = name[: -len("gate_up_proj_bias")]
                both = np.empty_like(w)
                both[:, 0::2] = vec(x + "gate_proj.bias", np.ascontiguousarray(w[:, 0::2]))
                both[:, 1::2] = vec(x + "up_proj.bias", np.ascontiguousarray(w[:, 1::2]))
                deq[name] = both
            elif name.endswith("experts.down_proj"):
                d = experts(name, np.ascontiguousarray(np.swapaxes(w, 1, 2)))
                deq[name] = np.ascontiguousarray(np.swapaxes(d, 1, 2))
            elif name.endswith("experts.down_proj_bias"):
                deq[name] = vec(name[: -len("_bias")] + ".bias", w)
            elif w.ndim >= 2:
                deq[name] = affine(name[: -len(".weight")], w)
            else:
                deq[name] = vec(name, w)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in deq.items()}, strict=True)
        ref_dir = tmp / "dequantized_f32"
        model.save_pretrained(ref_dir)
        fixture_dir.mkdir(parents=True, exist_ok=True)
        write_safetensors(fixture_dir / "model.safetensors", out, metadata={"format": "mlx"})
        mlx_cfg = json.loads((ref_dir / "config.json").read_text())
        mlx_cfg["quantization"] = qcfg
        mlx_cfg["quantization_config"] = copy.deepcopy(qcfg)
        mlx_cfg["dtype"] = "bfloat16"
        (fixture_dir / "config.json").write_text(json.dumps(mlx_cfg, indent=2, sort_keys=True) + "\n")
        del cfg
        return ref_dir

    return writer


def gpt_oss_np_check(fixture_dir: Path, prompt: list[int], golden: dict) -> str:
    """Independent float64 numpy forward from the fixture files and the spec (model-spec.md 5.4-5.8,
    6.2): its own YaRN table (checked against the spec's sanity values on the released shape),
    all three expert layouts (fused [E, in, out], MXFP4 blocks/scales, mlx split experts in
    MXFP4 or affine), sinks, sliding windows, top-k on logits, the clamped SwiGLU."""
    cfg = json.loads((fixture_dir / "config.json").read_text())
    raw = read_safetensors(fixture_dir / "model.safetensors")
    qcfg = cfg.get("quantization")
    t: dict[str, np.ndarray] = {}
    for name, arr in raw.items():
        if name.endswith((".scales", ".biases")) or name.endswith("_scales"):
            continue
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if name.endswith("_blocks"):  # openai release: [E, out, in/32, 16] + [E, out, in/32]
            base = name[: -len("_blocks")]
            e, o = arr.shape[:2]
            t[base] = mxfp4_dequantize(arr.reshape(e, o, -1), raw[base + "_scales"]).astype(np.float64)
        elif module is not None and module + ".scales" in raw:
            mode = (qcfg.get(module) or qcfg)
            if mode.get("mode", "affine") == "mxfp4":
                t[name] = mxfp4_dequantize(arr.view(np.uint8), raw[module + ".scales"]).astype(np.float64)
            else:
                t[name] = mlx_affine_dequantize(arr, raw[module + ".scales"], raw[module + ".biases"],
                                                mode["group_size"], mode["bits"]).astype(np.float64)
        else:
            t[name] = arr.astype(np.float64)

    H, nH, nKV, d = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    L, E, K, I = cfg["num_hidden_layers"], cfg["num_local_experts"], cfg["num_experts_per_tok"], cfg["intermediate_size"]
    eps, W = cfg["rms_norm_eps"], cfg["sliding_window"]
    limit, alpha = cfg.get("swiglu_limit", 7.0), cfg.get("swiglu_alpha", 1.702)
    sliding = [lt == "sliding_attention" for lt in cfg["layer_types"]]
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling")

    def yarn(dim, base, factor, orig, fast, slow):
        pos = base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        corr = lambda r: dim * np.log(orig / (r * 2 * np.pi)) / (2 * np.log(base))  # noqa: E731
        low, high = max(corr(fast), 0.0), min(corr(slow), dim - 1.0)  # truncate = false
        ramp = np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)
        return (1 / (factor * pos)) * ramp + (1 / pos) * (1 - ramp), 0.1 * np.log(factor) + 1

    ref, ref_scale = yarn(64, 150000.0, 32.0, 4096.0, 32.0, 1.0)  # gpt-oss-20b, spec 5.4
    assert np.allclose(ref[:4], [1.0, 0.68904430, 0.47478205, 0.32714587], rtol=1e-7), ref[:4]
    assert abs(ref[31] - 3.0235114e-7) < 1e-13 and abs(ref_scale - 1.3465736) < 1e-7
    assert rp["rope_type"] == "yarn" and rp.get("truncate") is False
    inv_freq, att = yarn(d, rp["rope_theta"], rp["factor"], rp["original_max_position_embeddings"],
                         rp["beta_fast"], rp["beta_slow"])

    def experts(p):
        x = p + "mlp.experts."
        if x + "gate_proj.weight" in t:  # mlx-community: split [E, out, in] + .bias
            return (t[x + "gate_proj.weight"], t[x + "up_proj.weight"], t[x + "down_proj.weight"],
                    t[x + "gate_proj.bias"], t[x + "up_proj.bias"], t[x + "down_proj.bias"])
        gu, dn = t[x + "gate_up_proj"], t[x + "down_proj"]
        if gu.shape[1] == H:  # transformers fused [E, in, out] -> [E, out, in]
            gu, dn = gu.transpose(0, 2, 1), dn.transpose(0, 2, 1)
        b = t[x + "gate_up_proj_bias"]
        return gu[:, 0::2], gu[:, 1::2], dn, b[:, 0::2], b[:, 1::2], t[x + "down_proj_bias"]

    def rms(x, w):
        return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))

    def lin(x, name):
        return x @ t[name + ".weight"].T + t[name + ".bias"]

    ex = [experts(f"model.layers.{l}.") for l in range(L)]
    gaps = []

    def forward(tokens):
        T = len(tokens)
        x = t["model.embed_tokens.weight"][np.asarray(tokens)]
        ang = np.arange(T, dtype=np.float64)[:, None] * inv_freq[None, :]
        cos, sin = (np.cos(ang) * att)[:, None, :], (np.sin(ang) * att)[:, None, :]

        def rope(v):
            a, b = v[..., : d // 2], v[..., d // 2:]
            return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)

        i, j = np.arange(T)[:, None], np.arange(T)[None, :]
        for l in range(L):
            p = f"model.layers.{l}."
            visible = (j <= i) & ((i - j < W) if sliding[l] else True)
            h = rms(x, t[p + "input_layernorm.weight"])
            q = rope(lin(h, p + "self_attn.q_proj").reshape(T, nH, d))
            k = rope(lin(h, p + "self_attn.k_proj").reshape(T, nKV, d))
            v = lin(h, p + "self_attn.v_proj").reshape(T, nKV, d)
            out = np.empty((T, nH, d))
            for hh in range(nH):
                kv = hh // (nH // nKV)
                z = np.where(visible, (q[:, hh] @ k[:, kv].T) * d ** -0.5, -np.inf)
                sink = t[p + "self_attn.sinks"][hh]
                m = np.maximum(z.max(axis=-1, keepdims=True), sink)
                ez = np.exp(z - m)
                out[:, hh] = (ez / (ez.sum(axis=-1, keepdims=True) + np.exp(sink - m))) @ v[:, kv]
            x = x + lin(out.reshape(T, nH * d), p + "self_attn.o_proj")
            h2 = rms(x, t[p + "post_attention_layernorm.weight"])
            r = lin(h2, p + "mlp.router")
            wg, wu, wd, bg, bu, bd = ex[l]
            y = np.zeros_like(h2)
            for n in range(T):
                order = np.argsort(-r[n], kind="stable")  # ties -> lowest expert id
                gaps.append(r[n, order[K - 1]] - r[n, order[K]])
                sel = order[:K]
                w = np.exp(r[n, sel] - r[n, sel].max())
                w = w / w.sum()
                for e, we in zip(sel, w):
                    g = np.minimum(wg[e] @ h2[n] + bg[e], limit)
                    u = np.clip(wu[e] @ h2[n] + bu[e], -limit, limit)
                    y[n] += we * (wd[e] @ ((u + 1) * g / (1 + np.exp(-alpha * g))) + bd[e])
            x = x + y
        return rms(x, t["model.norm.weight"]) @ t["lm_head.weight"].T

    logits = forward(prompt)
    want = np.asarray(golden["logits"], dtype=np.float64)
    err = np.abs(logits - want) / np.maximum(1.0, np.abs(want))
    assert err.max() < 1e-4, f"numpy forward disagrees with transformers: max rel err {err.max():.3g}"
    seq = list(prompt)
    for _ in range(len(golden["greedy_tokens"])):
        seq.append(int(np.argmax(forward(seq)[-1])))
    assert seq[len(prompt):] == golden["greedy_tokens"], (seq[len(prompt):], golden["greedy_tokens"])
    return (f"numpy f64 forward (own YaRN, MXFP4 and MLX decoding): max |dlogit|/max(1,|e|) = {err.max():.2e}, "
            f"greedy identical, min router logit gap {min(gaps):.2e}")


def gpt_oss_variants() -> list[Variant]:
    from transformers import GptOssForCausalLM

    probe = topk_logit_router_probe()
    variants = []
    # 1. HF bf16 (transformers-5 fused [E, in, out] experts), window 5 crossed by the prompt.
    variants.append(Variant(
        name="bf16_hf", config=gpt_oss_config(), model_cls=GptOssForCausalLM,
        randomise=randomise_gpt_oss(), writer=save_hf(torch.bfloat16), seed=18000, prompt_len=16, gen_len=20,
        router_probe=probe, np_check=gpt_oss_np_check,
        notes="HF layout saved by save_pretrained, bfloat16: experts fused gate_up_proj [E, H, 2I] (interleaved "
              "gate/up columns) + gate_up_proj_bias, down_proj [E, I, H] + down_proj_bias; q/k/v/o biases, "
              "sinks N(0,1), router bias; layer_types sliding/full alternating from layer 0 with sliding_window 5 "
              "(prompt 16 and greedy 20 tokens cross it); YaRN factor 32 truncate=false (attention factor on "
              "cos and sin); 8 experts top-2 (top-k on logits, softmax over the k)."))
    # 2. float32, gate_up scaled x4 so the clamp at 7 is hit, 3-key window, 4 q heads per kv head.
    variants.append(Variant(
        name="f32_clamp_window3", model_cls=GptOssForCausalLM,
        config=gpt_oss_config(vocab_size=256, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
                              sliding_window=3, num_local_experts=8, num_experts_per_tok=4, intermediate_size=32,
                              layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
        randomise=randomise_gpt_oss(gate_up_scale=4.0), writer=save_hf(torch.float32), seed=18100,
        prompt_len=12, gen_len=20, router_probe=probe, np_check=gpt_oss_np_check,
        notes="HF layout, float32. gate_up_proj scaled x4 so gate values exceed swiglu_limit 7 (clamped from "
              "above) and up values leave [-7, 7]; sliding_window 3, GQA 8 q heads / 2 kv heads; 8 experts top-4."))
    # 3. The original MXFP4 release layout (blocks/scales), loaded by transformers itself.
    variants.append(Variant(
        name="mxfp4_release", config=gpt_oss_config(intermediate_size=96), model_cls=GptOssForCausalLM,
        randomise=randomise_gpt_oss(), writer=save_gpt_oss_mxfp4_release(), seed=18200, prompt_len=14,
        gen_len=20, router_probe=probe, np_check=gpt_oss_np_check,
        notes="openai/gpt-oss release layout: mlp.experts.{gate_up,down}_proj_blocks u8 [E, out, in/32, 16] + "
              "_scales u8 [E, out, in/32] (E2M1 codes, low nibble first; E8M0 scales), biases/attention/router/"
              "embeddings bf16, quantization_config quant_method mxfp4. Reference = transformers loading this "
              "folder with Mxfp4Config(dequantize=True), checked equal to an independent numpy dequantisation."))
    # 4. mlx-community: split experts in MXFP4 mode, everything else affine 8-bit.
    variants.append(Variant(
        name="mlx_mxfp4_q8", config=gpt_oss_config(hidden_size=128, intermediate_size=64, num_attention_heads=4,
                                                   head_dim=32, vocab_size=256),
        model_cls=GptOssForCausalLM, randomise=randomise_gpt_oss(), writer=save_gpt_oss_mlx("mxfp4"),
        seed=18300, prompt_len=14, gen_len=20, router_probe=probe, np_check=gpt_oss_np_check,
        notes="mlx-community layout (metadata format=mlx): mlp.experts.{gate,up,down}_proj.{weight u32 [E, out, "
              "in/8], scales u8 [E, out, in/32], bias} in MXFP4 mode via per-module overrides; attention, router, "
              "embedding, lm_head MLX-affine 8-bit group 64; norms, sinks, linear biases bf16. Reference on the "
              "dequantised weights."))
    return variants



# ----------------------------------------------------------------------------------------
# Family: lfm2_moe  (LFM2-8B-A1B / LFM2-24B-A2B; model-spec.md section 4)
# ----------------------------------------------------------------------------------------


def lfm2_router_probe():
    """Probe for ``Lfm2MoeTopKRouter`` (forward(hidden, expert_bias) -> (logits, weights, indices)):
    recomputes the routing in float64 from the router logits and records, in biased-score units
    (sigmoid(logit) + expert_bias, what selection is made on), the gap between the k-th and
    (k+1)-th score. Asserts the recomputation reproduces transformers' selected sets and weights,
    and counts selections the bias changes (a seed where none does on the prompt is rejected)."""

    def probe(model: torch.nn.Module):
        gaps = RouterGaps()
        st = gaps.stats
        st.update(routings=0, selections_changed_by_bias=0, prompt_routings=0, prompt_selections_changed_by_bias=0)
        seen: set[int] = set()
        handles = []

        def hook(mod, inp, out):
            logits, weights, indices = (o.detach() for o in out[:3])
            bias = inp[1].detach().double() if len(inp) > 1 and inp[1] is not None else None
            s = torch.sigmoid(logits.double())
            sc = s + bias if bias is not None else s
            k = mod.top_k
            top = sc.sort(dim=-1, descending=True)
            gaps.extend((top.values[:, k - 1] - top.values[:, k]).tolist())
            idx = top.indices[:, :k]
            assert torch.equal(idx.sort(dim=-1).values, indices.sort(dim=-1).values.to(idx.dtype)), \
                "float64 re-routing disagrees with transformers' selection"
            w = s.gather(1, indices.long())
            if mod.norm_topk_prob:
                w = w / (w.sum(dim=-1, keepdim=True) + 1e-6)
            w = w * mod.routed_scaling_factor
            assert torch.allclose(w, weights.double(), rtol=1e-5, atol=1e-7), "routing weights disagree"
            idx0 = s.topk(k, dim=-1).indices
            changed = int((idx0.sort(dim=-1).values != idx.sort(dim=-1).values).any(dim=-1).sum())
            st["routings"] += idx.shape[0]
            st["selections_changed_by_bias"] += changed
            if id(mod) not in seen:
                seen.add(id(mod))
                st["prompt_routings"] += idx.shape[0]
                st["prompt_selections_changed_by_bias"] += changed

        for _name, mod in model.named_modules():
            if type(mod).__name__ == "Lfm2MoeTopKRouter":
                handles.append(mod.register_forward_hook(hook))
        assert handles, "router probe found no router modules"
        return gaps, lambda: [h.remove() for h in handles]

    return probe


def randomise_lfm2(bias_range: float):
    """Norms (incl. q/k_layernorm, embedding_norm) and conv biases as usual, plus expert_bias ~
    U(-bias_range, bias_range) (init leaves it 0)."""

    def randomise(model: torch.nn.Module, gen: torch.Generator) -> None:
        randomise_norms_and_biases(model, gen)
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name.endswith("expert_bias"):
                    b.copy_((torch.rand(b.shape, generator=gen, dtype=torch.float64) * 2 - 1) * bias_range)

    return randomise


def lfm2_np_check(fixture_dir: Path, prompt: list[int], golden: dict) -> str:
    """Independent float64 numpy forward for LFM2-MoE (model-spec.md 4.4/4.5) from the fixture
    files only (HF or mlx-community layout, `layer_types` or `full_attn_idxs`); must reproduce
    transformers' logits and greedy tokens."""
    cfg = json.loads((fixture_dir / "config.json").read_text())
    t = read_safetensors(fixture_dir / "model.safetensors")
    if "quantization" in cfg:
        t = dequantize_mlx_state(t, cfg["quantization"])
    t = {k: v.astype(np.float64) for k, v in t.items()}
    H, nH, nKV = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = H // nH
    eps = cfg["norm_eps"]
    L = cfg["num_hidden_layers"]
    E, K = cfg["num_experts"], cfg["num_experts_per_tok"]
    if "layer_types" in cfg:
        conv = [k == "conv" for k in cfg["layer_types"]]
    else:
        conv = [l not in cfg["full_attn_idxs"] for l in range(L)]
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta"))
    tied = cfg.get("tie_word_embeddings", cfg.get("tie_embedding", True))
    embed = t["model.embed_tokens.weight"]
    lm_head = embed if tied else t["lm_head.weight"]
    dense_names = ("w1", "w3", "w2") if "model.layers.0.feed_forward.w1.weight" in t else ("gate_proj", "up_proj", "down_proj")

    def rms(x, w):
        return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))

    def lin(x, name):
        y = x @ t[name + ".weight"].T
        return y + t[name + ".bias"] if name + ".bias" in t else y

    def silu(x):
        return x / (1.0 + np.exp(-x))

    def experts(p, hf, mlx):
        stacked = p + f"feed_forward.switch_mlp.{mlx}.weight"
        if stacked in t:
            return t[stacked]
        return np.stack([t[p + f"feed_forward.experts.{e}.{hf}.weight"] for e in range(E)])

    inv_freq = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    changed = [0]

    def forward(tokens):
        T = len(tokens)
        x = embed[np.asarray(tokens)]
        freqs = np.arange(T, dtype=np.float64)[:, None] * inv_freq[None, :]
        emb = np.concatenate([freqs, freqs], axis=-1)
        cos, sin = np.cos(emb)[:, None, :], np.sin(emb)[:, None, :]

        def rope(v):
            return v * cos + np.concatenate([-v[..., d // 2:], v[..., : d // 2]], axis=-1) * sin

        causal = np.triu(np.full((T, T), -np.inf), k=1)
        for l in range(L):
            p = f"model.layers.{l}."
            h = rms(x, t[p + "operator_norm.weight"])
            if conv[l]:
                bcx = lin(h, p + "conv.in_proj")
                B, C, X = bcx[:, :H], bcx[:, H:2 * H], bcx[:, 2 * H:]
                u = B * X
                w = t[p + "conv.conv.weight"].reshape(H, -1)  # [H,1,L] (HF) or [H,L,1] (MLX)
                Lk = w.shape[1]
                up = np.concatenate([np.zeros((Lk - 1, H)), u], axis=0)
                y = sum(w[:, k][None, :] * up[k:k + T] for k in range(Lk))
                if p + "conv.conv.bias" in t:
                    y = y + t[p + "conv.conv.bias"]
                out = lin(C * y, p + "conv.out_proj")
            else:
                a = p + "self_attn."
                q = rope(rms(lin(h, a + "q_proj").reshape(T, nH, d), t[a + "q_layernorm.weight"]))
                k = rope(rms(lin(h, a + "k_proj").reshape(T, nKV, d), t[a + "k_layernorm.weight"]))
                v = lin(h, a + "v_proj").reshape(T, nKV, d)
                o = np.empty((T, nH, d))
                for hh in range(nH):
                    kv = hh // (nH // nKV)
                    sc = (q[:, hh] @ k[:, kv].T) * d ** -0.5 + causal
                    sc = np.exp(sc - sc.max(-1, keepdims=True))
                    o[:, hh] = (sc / sc.sum(-1, keepdims=True)) @ v[:, kv]
                out = lin(o.reshape(T, H), a + "out_proj")
            x = x + out
            h2 = rms(x, t[p + "ffn_norm.weight"])
            f = p + "feed_forward."
            if l < cfg["num_dense_layers"]:
                g, u_, dn = dense_names
                y = lin(silu(lin(h2, f + g)) * lin(h2, f + u_), f + dn)
            else:
                s = 1.0 / (1.0 + np.exp(-(h2 @ t[f + "gate.weight"].T)))
                bias = t.get(f + "expert_bias") if cfg.get("use_expert_bias", True) else None
                wg, wu, wd = experts(p, "w1", "gate_proj"), experts(p, "w3", "up_proj"), experts(p, "w2", "down_proj")
                y = np.zeros_like(h2)
                for n in range(T):
                    sc = s[n] + bias if bias is not None else s[n]
                    sel = np.argsort(-sc, kind="stable")[:K]
                    changed[0] += set(sel) != set(np.argsort(-s[n], kind="stable")[:K])
                    w = s[n, sel]
                    if cfg.get("norm_topk_prob", True):
                        w = w / (w.sum() + 1e-6)
                    w = w * cfg.get("routed_scaling_factor", 1.0)
                    for e, we in zip(sel, w):
                        y[n] += we * (wd[e] @ (silu(wg[e] @ h2[n]) * (wu[e] @ h2[n])))
            x = x + y
        return rms(x, t["model.embedding_norm.weight"]) @ lm_head.T

    logits = forward(prompt)
    prompt_changed = changed[0]
    want = np.asarray(golden["logits"], dtype=np.float64)
    err = np.abs(logits - want) / np.maximum(1.0, np.abs(want))
    assert err.max() < 1e-4, f"numpy forward disagrees with transformers: max rel err {err.max():.3g}"
    seq = list(prompt)
    for _ in range(len(golden["greedy_tokens"])):
        seq.append(int(np.argmax(forward(seq)[-1])))
    assert seq[len(prompt):] == golden["greedy_tokens"], (seq[len(prompt):], golden["greedy_tokens"])
    return (f"numpy f64 forward: max |dlogit|/max(1,|e|) = {err.max():.2e}, greedy identical, "
            f"expert bias changed {prompt_changed} prompt token-layer selections")


def lfm2_moe_variants() -> list[Variant]:
    from transformers import Lfm2MoeConfig, Lfm2MoeForCausalLM

    common = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                  norm_eps=1e-5, initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                  max_position_embeddings=512)
    probe = lfm2_router_probe()
    variants = []

    # 1. bf16 HF layout (per-expert w1/w3/w2), tied, conv L=3, one dense layer, attention at 1.
    cfg = Lfm2MoeConfig(vocab_size=512, num_hidden_layers=4, layer_types=["conv", "full_attention", "conv", "conv"],
                        num_dense_layers=1, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                        use_expert_bias=True, norm_topk_prob=True, routed_scaling_factor=1.0, conv_L_cache=3,
                        conv_bias=False, tie_word_embeddings=True,
                        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, **common)
    variants.append(Variant(
        name="bf16_hf", config=cfg, model_cls=Lfm2MoeForCausalLM, randomise=randomise_lfm2(0.1),
        writer=save_hf(torch.bfloat16, keep_fp32=("expert_bias",)), seed=9000, prompt_len=16, gen_len=20,
        router_probe=probe, np_check=lfm2_np_check,
        notes="HF layout saved by save_pretrained, bfloat16 on disk except feed_forward.expert_bias (F32). "
              "layer_types [conv, full_attention, conv, conv] (conv followed by conv: the conv state of each layer "
              "is its own), num_dense_layers 1 (feed_forward.w1/w3/w2, intermediate 96), MoE layers 1-3: "
              "feed_forward.gate [8,64], expert_bias ~U(-0.1,0.1) for selection only, experts.{e}.w1/w3/w2 "
              "(intermediate 32), top-2 of 8, norm_topk_prob true (/ (sum + 1e-6)), routed_scaling_factor 1.0. "
              "conv_L_cache 3, no conv bias: conv.in_proj [192,64] (rows B, C, X), conv.conv.weight [64,1,3], "
              "conv.out_proj. Attention: 4 q heads / 2 kv heads, head_dim 16, q_layernorm / k_layernorm, out_proj. "
              "Tied (no lm_head key); embedding_norm is the final norm. norm_eps 1e-5, rope theta 1e6."))

    # 2. f32, untied, conv bias, conv L=4, two dense layers, raw weights scaled 2.0, attention first.
    cfg = Lfm2MoeConfig(vocab_size=384, num_hidden_layers=5,
                        layer_types=["full_attention", "conv", "conv", "full_attention", "conv"],
                        num_dense_layers=2, moe_intermediate_size=24, num_experts=16, num_experts_per_tok=3,
                        use_expert_bias=True, norm_topk_prob=False, routed_scaling_factor=2.0, conv_L_cache=4,
                        conv_bias=True, tie_word_embeddings=False,
                        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0}, **common)
    variants.append(Variant(
        name="f32_untied_convbias_l4", config=cfg, model_cls=Lfm2MoeForCausalLM, randomise=randomise_lfm2(0.1),
        writer=save_hf(torch.float32), seed=9100, prompt_len=13, gen_len=20, router_probe=probe,
        np_check=lfm2_np_check,
        notes="HF layout saved by save_pretrained, float32. layer_types [full_attention, conv, conv, full_attention, "
              "conv], num_dense_layers 2 (layers 0-1 dense), MoE layers 2-4: 16 experts top-3, norm_topk_prob false "
              "(raw sigmoid weights), routed_scaling_factor 2.0, expert_bias ~U(-0.1,0.1). conv_L_cache 4 (state of 3 "
              "gated inputs), conv_bias true: .bias on conv.in_proj, conv.conv and conv.out_proj (~0.1N). Untied "
              "lm_head. rope theta 1e4."))

    # 3. mlx-community layout, affine 4-bit gs 32 (router 8-bit gs 64), legacy config spelling.
    cfg = Lfm2MoeConfig(vocab_size=512, num_hidden_layers=4, layer_types=["conv", "conv", "full_attention", "conv"],
                        num_dense_layers=1, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                        use_expert_bias=True, norm_topk_prob=True, routed_scaling_factor=1.0, conv_L_cache=3,
                        conv_bias=False, tie_word_embeddings=True,
                        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, **common)

    def mlx_config(hf: dict) -> dict:
        """HF v5 config -> the older spelling LFM2 configs carry: `full_attn_idxs` instead of
        `layer_types`, `tie_embedding`, top-level `rope_theta`."""
        cfg = {k: v for k, v in hf.items() if k not in ("layer_types", "tie_word_embeddings", "rope_parameters", "dtype")}
        cfg["full_attn_idxs"] = [i for i, k in enumerate(hf["layer_types"]) if k != "conv"]
        cfg["tie_embedding"] = hf["tie_word_embeddings"]
        assert hf["rope_parameters"]["rope_type"] == "default"
        cfg["rope_theta"] = hf["rope_parameters"]["rope_theta"]
        cfg["torch_dtype"] = "bfloat16"
        return cfg

    def experts_split(name: str, shape: tuple):
        if name.endswith(".feed_forward.experts.gate_up_proj"):
            prefix = name[: -len("experts.gate_up_proj")]
            i = shape[1] // 2
            return [(prefix + "switch_mlp.gate_proj", slice(0, i)), (prefix + "switch_mlp.up_proj", slice(i, 2 * i))]
        if name.endswith(".feed_forward.experts.down_proj"):
            return [(name[: -len("experts.down_proj")] + "switch_mlp.down_proj", slice(None))]
        return None

    def dense_rename(name: str, w: np.ndarray):
        """mlx-lm renames the dense FFN: w1 -> gate_proj, w3 -> up_proj, w2 -> down_proj."""
        for hf, mlx in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            if name.endswith(f".feed_forward.{hf}.weight"):
                return [(name[: -len(f"{hf}.weight")] + mlx, w)], lambda arrs: arrs[0]
        return None

    variants.append(Variant(
        name="mlx_affine_q4", config=cfg, model_cls=Lfm2MoeForCausalLM, randomise=randomise_lfm2(0.1),
        writer=save_mlx_affine(
            group_size=32, bits=4,
            override=lambda m: {"group_size": 64, "bits": 8} if m.endswith(".feed_forward.gate") else None,
            config_transform=mlx_config, stacked_experts=experts_split,
            keep_fp32=lambda n: n.endswith(".feed_forward.expert_bias"), remap=dense_rename,
            reshaped=lambda n, shape: (shape[0], shape[2], shape[1]) if n.endswith(".conv.conv.weight") else None),
        seed=9200, prompt_len=20, gen_len=20, router_probe=probe, np_check=lfm2_np_check,
        notes="mlx-community layout (safetensors metadata format=mlx). MLX-affine 4-bit group 32: model.embed_tokens "
              "(tied, no lm_head), conv.in_proj, conv.out_proj, self_attn.{q,k,v,out}_proj, the layer-0 dense FFN "
              "renamed feed_forward.{gate,up,down}_proj (down: 3 groups), feed_forward.switch_mlp.{gate,up,down}_proj "
              "[8,out,in*4/32]; routers feed_forward.gate 8-bit group 64 (per-module overrides). NOT quantised: "
              "conv.conv.weight stored bf16 in MLX's layout [64,3,1] (HF [64,1,3]), feed_forward.expert_bias F32, "
              "norms bf16. Config in the older spelling: full_attn_idxs [2] instead of layer_types, tie_embedding, "
              "top-level rope_theta. layer_types [conv, conv, full_attention, conv], num_dense_layers 1, top-2 of 8, "
              "norm_topk_prob true. Reference = transformers on the dequantised weights, w = f32(scale_bf16)*q + "
              "f32(bias_bf16) in float32."))
    return variants


# ----------------------------------------------------------------------------------------
# Registry + harness
# ----------------------------------------------------------------------------------------

FAMILIES: dict[str, Callable[[], list[Variant]]] = {
    "qwen3_moe": qwen3_moe_variants,
    "glm4_moe_lite": glm4_moe_lite_variants,
    "deepseek_v3": deepseek_v3_variants,
    "lfm2_moe": lfm2_moe_variants,
    "gpt_oss": gpt_oss_variants,
}




def load_reference(model_cls, ref_dir: Path):
    kwargs = dict(dtype=torch.float32, attn_implementation="eager")
    try:
        model = model_cls.from_pretrained(ref_dir, experts_implementation="eager", **kwargs)
    except (TypeError, ValueError) as e:  # transformers without an experts backend switch
        print(f"  (experts_implementation unsupported: {e}; using the default)", file=sys.stderr)
        model = model_cls.from_pretrained(ref_dir, **kwargs)
    model.eval()
    return model


def run_reference(model, prompt: list[int], gen_len: int):
    with torch.no_grad():
        ids = torch.tensor([prompt], dtype=torch.long)
        logits = model(input_ids=ids, use_cache=False).logits[0].float().numpy()
        seq = list(prompt)
        greedy_gaps = []
        for _ in range(gen_len):  # plain argmax loop, full recompute, no EOS stop
            last = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].double().numpy()
            top2 = np.sort(last)[-2:]
            greedy_gaps.append(float(top2[1] - top2[0]))
            seq.append(int(np.argmax(last)))  # first maximal index = lowest id on ties
        # Same continuation through the KV cache (prefill, then one token per step), as a
        # decoder would run it; with the margins enforced by the caller it must agree.
        out = model(input_ids=ids, use_cache=True)
        cached = [int(np.argmax(out.logits[0, -1].double().numpy()))]
        for _ in range(gen_len - 1):
            out = model(input_ids=torch.tensor([[cached[-1]]]), past_key_values=out.past_key_values, use_cache=True)
            cached.append(int(np.argmax(out.logits[0, -1].double().numpy())))
    greedy = seq[len(prompt):]
    return logits, greedy, greedy_gaps, cached == greedy


def fmt_row(row: np.ndarray) -> list[float]:
    return [float(f"{v:.9g}") for v in row.astype(np.float32)]  # 9 significant digits: exact f32


def build_variant(family: str, v: Variant, out_root: Path, max_attempts: int) -> Path:
    fixture_dir = out_root / family / v.name
    vocab = v.config.vocab_size
    for attempt in range(max_attempts):
        seed = v.seed + attempt
        torch.manual_seed(seed)
        model = v.model_cls(copy.deepcopy(v.config))
        model.eval()
        v.randomise(model, torch.Generator().manual_seed(seed))
        assert_nothing_trivial(model)
        prompt = [int(x) for x in np.random.default_rng(seed).integers(1, vocab, size=v.prompt_len)]

        if fixture_dir.exists():
            shutil.rmtree(fixture_dir)
        with tempfile.TemporaryDirectory() as tmp:
            ref_dir = v.writer(model, fixture_dir, Path(tmp))
            ref = load_reference(v.model_cls, ref_dir)
            experts_impl = getattr(ref.config, "_experts_implementation", None)
            attn_impl = getattr(ref.config, "_attn_implementation", None)
            gaps, remove = v.router_probe(ref) if v.router_probe else ([], lambda: None)
            logits, greedy, greedy_gaps, cache_agrees = run_reference(ref, prompt, v.gen_len)
            remove()
        min_router = min(gaps) if gaps else float("inf")
        min_greedy = min(greedy_gaps)
        distinct = len(set(greedy))
        # Probes of biased routers report how often the bias changed a selection; a fixture on
        # which it never does cannot catch "bias ignored" bugs.
        router_stats = getattr(gaps, "stats", None)
        bias_matters = router_stats is None or router_stats["prompt_selections_changed_by_bias"] > 0
        if not cache_agrees:
            print(f"  {v.name}: seed {seed}: KV-cached decode disagrees with full recompute", file=sys.stderr)
        elif not bias_matters:
            print(f"  {v.name}: seed {seed}: router bias changes no selection on the prompt", file=sys.stderr)
        elif min_router >= ROUTER_GAP_MIN and min_greedy >= GREEDY_GAP_MIN and distinct >= MIN_DISTINCT_GREEDY:
            break
        print(f"  {v.name}: seed {seed} rejected (router gap {min_router:.2e}, greedy gap {min_greedy:.2e}, "
              f"{distinct} distinct greedy tokens); retrying", file=sys.stderr)
    else:
        raise RuntimeError(f"{v.name}: no acceptable seed in {max_attempts} attempts")

    # EOS does not influence logits, so pick it *after* generating: the 3rd greedy token. A
    # generate that stops at EOS (no --ignore-eos) then returns 3 tokens instead of gen_len.
    eos = greedy[2]
    for name in ("config.json", "generation_config.json"):
        path = fixture_dir / name
        if path.exists():
            c = json.loads(path.read_text())
            c["eos_token_id"] = eos
            path.write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")
    cfg = json.loads((fixture_dir / "config.json").read_text())
    assert cfg.get("model_type") == family and cfg.get("eos_token_id") == eos
    assert logits.shape == (len(prompt), vocab)
    golden = {
        "family": family,
        "variant": v.name,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "safetensors_version": safetensors.__version__,
        "seed": seed,
        "reference": {"dtype": "float32", "attn_implementation": attn_impl,
                      "experts_implementation": experts_impl, "use_cache": False},
        "min_router_gap": min_router if gaps else None,
        "min_greedy_logit_gap": min_greedy,
        "prompt_tokens": prompt,
        "logits": [fmt_row(r) for r in logits],
        "greedy_tokens": greedy,
        "eos_token_id": eos,
        "notes": v.notes + " Greedy: argmax over full-recompute logits, no EOS stop, ties -> lowest id; "
                 f"eos_token_id set to {eos} = greedy_tokens[2] after generation (EOS does not affect logits), "
                 "so ignoring --ignore-eos truncates the continuation. transformers' KV-cached decode gives the same "
                 "continuation. "
                 f"Margins: every top-k router choice clear by >= {ROUTER_GAP_MIN} in probability and every "
                 f"greedy choice by >= {GREEDY_GAP_MIN} in logit, >= {MIN_DISTINCT_GREEDY} distinct greedy tokens "
                 "(seed chosen for that).",
    }
    if router_stats is not None:
        golden["router_stats"] = router_stats
    if v.np_check:
        golden["notes"] += " Cross-checked: " + v.np_check(fixture_dir, prompt, golden) + "."
    (fixture_dir / "golden.json").write_text(json.dumps(golden, separators=(",", ":")) + "\n")

    total = sum(f.stat().st_size for f in fixture_dir.iterdir())
    assert total < MAX_FIXTURE_BYTES, f"{fixture_dir} is {total} bytes"
    print(f"{family}/{v.name}: seed {seed}, {len(prompt)} prompt tokens, {len(greedy)} greedy tokens, "
          f"min router gap {min_router:.2e}, min greedy gap {min_greedy:.2e}, {total / 1024:.0f} KiB"
          f"{'' if router_stats is None else chr(10) + '  router: ' + json.dumps(router_stats)}\n"
          f"  {golden['notes'].split('Cross-checked: ')[-1] if v.np_check else ''}")
    return fixture_dir


def self_test_quantizer() -> None:
    """Packing layout and bf16 rounding against hand-computed / torch values."""
    words = pack_bits(np.arange(8, dtype=np.uint32)[None], 4)
    assert words[0, 0] == 0x76543210, hex(words[0, 0])
    words = pack_bits(np.array([[1, 2, 3, 255]], dtype=np.uint32), 8)
    assert words[0, 0] == 0xFF030201, hex(words[0, 0])
    x = np.random.default_rng(0).normal(size=4096).astype(np.float32) * 3
    assert np.array_equal(bf16_bits_to_f32(f32_to_bf16_bits(x)),
                          torch.from_numpy(x).bfloat16().float().numpy())
    w = np.random.default_rng(1).normal(size=(16, 128)).astype(np.float32) * 0.1
    for bits, gs in ((4, 32), (8, 64), (2, 32), (4, 128)):
        packed, s, b = mlx_affine_quantize(w, gs, bits)
        assert packed.shape == (16, 128 * bits // 32) and s.shape == (16, 128 // gs)
        deq = mlx_affine_dequantize(packed, bf16_bits_to_f32(s), bf16_bits_to_f32(b), gs, bits)
        step = np.abs(bf16_bits_to_f32(s)).repeat(gs, axis=1)
        # MLX shrinks the scale so that 0 is on the grid, and bf16 scales/biases move the grid
        # by up to ~2^-9 relative: a loose bound, the real check is the bit-exact round trip.
        err = np.abs(deq - w) / step
        assert err.max() <= 2.0 and err.mean() <= 0.5, (bits, gs, err.max(), err.mean())
    assert (bf16_bits_to_f32(mlx_affine_quantize(w, 32, 4)[1]) < 0).any(), "expected some negative scales"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=sorted(FAMILIES), action="append",
                    help="family to generate (repeatable; default: all)")
    ap.add_argument("--variant", action="append", help="only these variant names (repeatable)")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "tests" / "golden")
    ap.add_argument("--max-attempts", type=int, default=50)
    args = ap.parse_args()

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    self_test_quantizer()
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, numpy {np.__version__}, "
          f"safetensors {safetensors.__version__}")
    for family in args.family or sorted(FAMILIES):
        for v in FAMILIES[family]():
            if args.variant and v.name not in args.variant:
                continue
            build_variant(family, v, args.out, args.max_attempts)


if __name__ == "__main__":
    main()
