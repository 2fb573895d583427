"""Independent GPT-OSS forward for the golden fixtures: f32 (the CPU reference) and an
emulation of the CUDA backend's bf16 storage points (src/cuda/ops/*.cu, reference plan).

Rounding points of the GPU (reference plan, prefill), each switchable by name:
  embed   x0 = bf16(dequant(embed row))                   linear.cu embed
  norm    h  = bf16(w * (x * rsqrt(mean x^2 + eps)))       common.cuh rmsnorm_row (w f32)
  qkv     q/k/v = bf16(x W^T + b)                          linear.cu matvec_row
  rope    q'/k' = bf16(a cs - b sn) (f32 cs/sn)            mla.cu rope_slice
  attn    out = bf16(sum p v / L) (f32 softmax w/ sink)    gpt_oss.cu sink_attention
  oproj   o = bf16(attn Wo^T + bo)                         linear.cu matvec_row
  resid   x = bf16(x + y)                                  common.cuh add_bf16
  gateup  g/u = bf16(W h2 + b)                             gpt_oss.cu expert_bias_matvec
  act     a = bf16((clamp(u)+1) g sigmoid(alpha g))        gpt_oss.cu clamp_swiglu_elem
  down    y = bf16(Wd a + bd)                              gpt_oss.cu expert_bias_matvec
  combine m = bf16(sum_j w_j y_j) (f32 weights)            moe.cu combine
Router logits f32 (out_f32), lm_head f32.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

FP4 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)
ALL = ("embed", "norm", "qkv", "rope", "attn", "oproj", "resid", "gateup", "act", "down", "combine")


def bf16(x):
    x = np.ascontiguousarray(x, dtype=np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint32) << 16
    return r.astype(np.uint32).view(np.float32).reshape(x.shape)


def read_st(path):
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    hdr = json.loads(raw[8:8 + n])
    base = 8 + n
    out, dt = {}, {}
    for name, info in hdr.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        buf = raw[base + a: base + b]
        d = info["dtype"]
        if d == "BF16":
            arr = (np.frombuffer(buf, "<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(buf, {"F32": "<f4", "U32": "<u4", "U8": "u1"}[d])
        out[name] = arr.reshape(info["shape"]).copy()
        dt[name] = d
    return out, dt


def unpack(packed, bits):
    per = 32 // bits
    sh = (np.arange(per, dtype=np.uint32) * bits).astype(np.uint32)
    q = (packed[..., None] >> sh) & np.uint32((1 << bits) - 1)
    return q.reshape(*packed.shape[:-1], packed.shape[-1] * per)


def affine_deq(packed, s, b, gs, bits):
    q = unpack(packed, bits).astype(np.float32)
    *lead, n = q.shape
    q = q.reshape(*lead, n // gs, gs)
    return (s[..., None].astype(np.float32) * q + b[..., None].astype(np.float32)).reshape(*lead, n)


def mxfp4_deq(packed_u8, scales):  # [..., n/2] bytes, [..., n/32]
    codes = np.stack([packed_u8 & 0xF, packed_u8 >> 4], -1).reshape(*packed_u8.shape[:-1], -1)
    vals = FP4[codes].reshape(*packed_u8.shape[:-1], -1, 32)
    return (vals * np.exp2(scales.astype(np.float64) - 127)[..., None]).astype(np.float32).reshape(
        *packed_u8.shape[:-1], -1)


class Model:
    def __init__(self, d, as_test=True):
        """as_test: F32 tensors rounded to bf16 first (tests/gpu.rs as_bf16_weights)."""
        d = Path(d)
        cfg = json.loads((d / "config.json").read_text())
        raw, dt = read_st(d / "model.safetensors")
        if as_test:
            for k in raw:
                if dt[k] == "F32":
                    raw[k] = bf16(raw[k])
        q = cfg.get("quantization") or cfg.get("quantization_config")
        t = {}
        self.released = set()
        for name, arr in raw.items():
            if name.endswith((".scales", ".biases", "_scales")):
                continue
            if name.endswith("_blocks"):
                base = name[:-len("_blocks")]
                e, o = arr.shape[:2]
                t[base] = mxfp4_deq(arr.reshape(e, o, -1), raw[base + "_scales"])
                self.released.add(base)
                continue
            mod = name[:-len(".weight")] if name.endswith(".weight") else None
            if mod is not None and mod + ".scales" in raw:
                mode = q.get(mod) or q
                if mode.get("mode", "affine") == "mxfp4":
                    t[name] = mxfp4_deq(arr.view(np.uint8).reshape(*arr.shape[:-1], -1), raw[mod + ".scales"])
                else:
                    t[name] = affine_deq(arr, raw[mod + ".scales"], raw[mod + ".biases"], mode["group_size"],
                                         mode["bits"])
            else:
                t[name] = arr.astype(np.float32)
        self.cfg, self.t = cfg, t
        c = cfg
        self.H, self.nH, self.nKV, self.d = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c[
            "head_dim"]
        self.L, self.E, self.K, self.I = c["num_hidden_layers"], c["num_local_experts"], c["num_experts_per_tok"], c[
            "intermediate_size"]
        self.eps, self.W = c["rms_norm_eps"], c["sliding_window"]
        self.limit, self.alpha = c.get("swiglu_limit", 7.0), c.get("swiglu_alpha", 1.702)
        self.sliding = [lt == "sliding_attention" for lt in c["layer_types"]]
        rp = c.get("rope_parameters") or c.get("rope_scaling")
        dim, base, f = self.d, rp.get("rope_theta", c.get("rope_theta")), rp["factor"]
        # f32 like the Rust host (close enough; the GPU takes a host-computed f32 inv_freq)
        pos = base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        corr = lambda r: dim * np.log(rp["original_max_position_embeddings"] / (r * 2 * np.pi)) / (2 * np.log(base))
        low, high = max(corr(rp["beta_fast"]), 0.0), min(corr(rp["beta_slow"]), dim - 1.0)
        ramp = np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)
        self.inv_freq = ((1 / (f * pos)) * ramp + (1 / pos) * (1 - ramp)).astype(np.float32)
        self.att = np.float32(0.1 * np.log(f) + 1)
        self.ex = [self._experts(f"model.layers.{l}.") for l in range(self.L)]
        self.vocab = c["vocab_size"]

    def _experts(self, p):
        t, H = self.t, self.H
        x = p + "mlp.experts."
        if x + "gate_proj.weight" in t:
            return (t[x + "gate_proj.weight"], t[x + "up_proj.weight"], t[x + "down_proj.weight"],
                    t[x + "gate_proj.bias"], t[x + "up_proj.bias"], t[x + "down_proj.bias"])
        gu, dn = t[x + "gate_up_proj"], t[x + "down_proj"]
        if x + "gate_up_proj" not in self.released:  # transformers fused [E, in, out] -> [E, out, in]
            gu, dn = gu.transpose(0, 2, 1), dn.transpose(0, 2, 1)
        b = t[x + "gate_up_proj_bias"]
        return (np.ascontiguousarray(gu[:, 0::2]), np.ascontiguousarray(gu[:, 1::2]), np.ascontiguousarray(dn),
                b[:, 0::2].copy(), b[:, 1::2].copy(), t[x + "down_proj_bias"])

    def forward(self, tokens, rnd=(), trace=None, force_route=None):
        """rnd: names of the GPU rounding points to apply. trace: dict filled with router info.
        force_route: {(layer): idx array [T,K]} to impose expert choices (for isolating flips)."""
        R = (lambda name, x: bf16(x) if name in rnd else x.astype(np.float32))
        t, d, nH, nKV = self.t, self.d, self.nH, self.nKV
        T = len(tokens)
        x = R("embed", t["model.embed_tokens.weight"][np.asarray(tokens)])
        posf = np.arange(T, dtype=np.float32)[:, None] * self.inv_freq[None, :]
        cs = (np.cos(posf.astype(np.float64)).astype(np.float32) * self.att)[:, None, :]
        sn = (np.sin(posf.astype(np.float64)).astype(np.float32) * self.att)[:, None, :]

        def rms(x, w):
            xf = x.astype(np.float32)
            inv = 1.0 / np.sqrt(np.mean(xf.astype(np.float64) ** 2, -1, keepdims=True) + self.eps)
            return R("norm", w * (xf * inv.astype(np.float32)))

        def lin(x, name, rname):
            y = x.astype(np.float64) @ t[name + ".weight"].T.astype(np.float64) + t[name + ".bias"]
            return R(rname, y.astype(np.float32))

        def rope(v):
            a, b = v[..., : d // 2], v[..., d // 2:]
            return R("rope", np.concatenate([a * cs - b * sn, b * cs + a * sn], -1))

        def rope_(v, qk):
            if qk == "qk" and "qk" in rnd:
                a, b = v[..., : d // 2], v[..., d // 2:]
                return bf16(np.concatenate([a * cs - b * sn, b * cs + a * sn], -1))
            return rope(v)

        i, j = np.arange(T)[:, None], np.arange(T)[None, :]
        scale = np.float32(d ** -0.5)
        for l in range(self.L):
            p = f"model.layers.{l}."
            vis = (j <= i) & ((i - j < self.W) if self.sliding[l] else True)
            h = rms(x, t[p + "input_layernorm.weight"])
            qk = "qkv" if "qkv" in rnd else "qk"  # "qk": round q and k (projection + rope) only
            q = rope_(lin(h, p + "self_attn.q_proj", qk).reshape(T, nH, d), qk)
            k = rope_(lin(h, p + "self_attn.k_proj", qk).reshape(T, nKV, d), qk)
            v = lin(h, p + "self_attn.v_proj", "qkv").reshape(T, nKV, d)
            out = np.empty((T, nH, d), np.float32)
            for hh in range(nH):
                kv = hh // (nH // nKV)
                z = np.where(vis, (q[:, hh].astype(np.float64) @ k[:, kv].T.astype(np.float64)) * scale, -np.inf)
                sink = t[p + "self_attn.sinks"][hh]
                m = np.maximum(z.max(-1, keepdims=True), sink)
                ez = np.exp(z - m)
                out[:, hh] = ((ez / (ez.sum(-1, keepdims=True) + np.exp(sink - m))) @ v[:, kv]).astype(np.float32)
            out = R("attn", out)
            o = lin(out.reshape(T, nH * d), p + "self_attn.o_proj", "oproj")
            x = R("resid", x + o)
            h2 = rms(x, t[p + "post_attention_layernorm.weight"])
            r = (h2.astype(np.float64) @ t[p + "mlp.router.weight"].T.astype(np.float64) + t[
                p + "mlp.router.bias"]).astype(np.float32)
            wg, wu, wd, bg, bu, bd = self.ex[l]
            order = np.argsort(-r, axis=-1, kind="stable")
            sel = order[:, : self.K] if force_route is None or l not in force_route else force_route[l]
            if trace is not None:
                rs = np.take_along_axis(r, order, -1)
                trace.setdefault("idx", {})[l] = order[:, : self.K].copy()
                trace.setdefault("gap", {})[l] = rs[:, self.K - 1] - rs[:, self.K]
                trace.setdefault("h2", {})[l] = h2.copy()
            y = np.zeros((T, self.H), np.float32)
            for n in range(T):
                vals = r[n, sel[n]]
                w = np.exp(vals - vals.max())
                w = (w / w.sum()).astype(np.float32)
                acc = np.zeros(self.H, np.float32)
                for e, we in zip(sel[n], w):
                    g = R("gateup", (wg[e].astype(np.float64) @ h2[n] + bg[e]).astype(np.float32))
                    u = R("gateup", (wu[e].astype(np.float64) @ h2[n] + bu[e]).astype(np.float32))
                    g = np.minimum(g, self.limit)
                    u = np.clip(u, -self.limit, self.limit)
                    a = R("act", (u + 1) * (g / (1 + np.exp(-self.alpha * g))))
                    yy = R("down", (wd[e].astype(np.float64) @ a + bd[e]).astype(np.float32))
                    acc = acc + we * yy
                y[n] = acc
            y = R("combine", y)
            x = R("resid", x + y)
            if trace is not None:
                trace.setdefault("x", {})[l] = x.copy()
        h = rms(x, t["model.norm.weight"])
        return (h.astype(np.float64) @ t["lm_head.weight"].T.astype(np.float64)).astype(np.float32)


def rel_err_rows(a, b):
    return np.sqrt(((a.astype(np.float64) - b) ** 2).sum(-1) / np.maximum((b.astype(np.float64) ** 2).sum(-1), 1e-30))


def stats(got, want):
    e = rel_err_rows(got, want)
    return float(np.median(e)), float(e.max()), int((e > 5e-2).sum()), e
