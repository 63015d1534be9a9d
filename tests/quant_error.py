"""The error model behind every comparison of a quantised GGUF across runtimes (llama.cpp, the Go engine, ours).

A runtime evaluating a GGUF changes the numbers in two ways only:
  1. its weights are the file's values, i.e. the dequantised tensors. The reference here uses exactly those
     (read back with gguf-py), so weight quantisation is no part of any tolerance;
  2. it rounds the activations entering each matrix product to the type ggml pairs with the weight type
     (its vec_dot_type): F32 rounds nothing; F16 -> fp16; BF16 -> bf16; Q8_0, Q4_0, Q5_0 -> Q8_0 and Q4_1,
     Q5_1 -> Q8_1 (blocks of 32, step = amax/127 with the scale kept in fp16); the K-quants -> Q8_K (blocks
     of 256, step amax/127, float32 scale). With an F16 KV cache, K and V are stored in fp16 and the query and
     the softmax probabilities are rounded to fp16 for their products with them; an F32 cache rounds nothing.

Rounding x to a grid of step D leaves an error uniform in +-D/2 (Widrow's model; plus +-2^-11 relative for a
scale kept in fp16). Propagated through the network these errors add to logit i a noise of standard deviation
sigma_i, measured here by running the float64 reference with every rounding replaced by independent uniform
noise of that size (SAMPLES draws). A correct implementation lies within

    |logit_i - reference_i| <= Z * sigma_i + FLOOR

of the noise-free reference. sigma is estimated from SAMPLES = 32 draws, so |diff|/sigma follows Student's t
with 32 degrees of freedom: Z = 8 is exceeded with probability 4e-9 per logit (Z = 6: 1e-6, too likely over
the ~10^6 logits the suite compares). Measured on the Go-engine fixtures, |diff|/sigma of llama.cpp has
quantiles 0.67 / 2.7 / 3.6 at 50 / 99 / 99.9 % (a Gaussian: 0.67 / 2.58 / 3.29) and a largest value of 4.5-5.7
over ~40K logits: the model is calibrated. FLOOR covers fp32 evaluation order (F32 files match to ~4e-6). Two implementations each within their
bound (llama.cpp and the Go engine, say, whose roundings flip differently when their sums differ in the last
bit) differ from each other by at most the sum of the bounds. `simulate(..., mode="round")` applies ggml's
actual roundings instead of noise: the deterministic quantised arithmetic, which the model must also bound.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import gguf

Z = 8.0
FLOOR = 1e-4
SAMPLES = 32
Q = gguf.GGMLQuantizationType
ACT_Q8_32 = {Q.Q8_0, Q.Q4_0, Q.Q5_0, Q.Q4_1, Q.Q5_1}  # activations -> Q8_0 / Q8_1 (same rounding)
ACT_Q8_K = {Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K}


@dataclass
class Model:
    n_layer: int
    n_head: int
    n_kv: int
    head_dim: int
    eps: float
    rope_base: float
    weights: dict  # GGUF name -> float64 [rows, cols] (norms: [n])
    types: dict  # GGUF name -> GGMLQuantizationType


def read_model(path) -> Model:
    r = gguf.GGUFReader(str(path))
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    arch = f["general.architecture"]
    weights, types = {}, {}
    for t in r.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        a = t.data if t.tensor_type == Q.F32 else gguf.quants.dequantize(t.data, t.tensor_type)
        weights[t.name] = np.asarray(a, np.float64).reshape(shape)
        if len(shape) == 2:  # kept transposed-contiguous: the products below read W.T
            weights[t.name] = np.ascontiguousarray(weights[t.name].T).T
        types[t.name] = t.tensor_type
    if "output.weight" not in weights:  # tied embeddings
        weights["output.weight"], types["output.weight"] = weights["token_embd.weight"], types["token_embd.weight"]
    n_head = f[f"{arch}.attention.head_count"]
    return Model(n_layer=f[f"{arch}.block_count"], n_head=n_head, n_kv=f[f"{arch}.attention.head_count_kv"],
                 head_dim=weights["blk.0.attn_q.weight"].shape[0] // n_head,
                 eps=float(f[f"{arch}.attention.layer_norm_rms_epsilon"]),
                 rope_base=float(f.get(f"{arch}.rope.freq_base", 10000.0)), weights=weights, types=types)


# ---------------------------------------------------------------- roundings and their noise

def _float_step(x, mantissa_bits):
    """The spacing of the float grid (fp16: 10 stored mantissa bits, bf16: 7) at each x."""
    _, e = np.frexp(x)
    step = np.ldexp(1.0, e - 1 - mantissa_bits)
    return np.where(x == 0, 0.0, np.maximum(step, 2.0 ** -24 if mantissa_bits == 10 else 0.0))


def _blocks(x, size):
    return x.reshape(*x.shape[:-1], x.shape[-1] // size, size)


def _round_fp16(x):
    return x.astype(np.float32).astype(np.float16).astype(np.float64)


def _round_bf16(x):
    b = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16 << 16  # round to nearest even
    return b.astype(np.uint32).view(np.float32).astype(np.float64)


def round_activations(x, kind, rng=None):
    """x as ggml would prepare it for a product with weights of type `kind` ('fp16' for the KV cache):
    rounded (rng None) or with the uniform noise of that rounding added (rng given)."""
    if kind == Q.F32:
        return x
    if kind in (Q.F16, "fp16", Q.BF16):
        if rng is None:
            return _round_fp16(x) if kind != Q.BF16 else _round_bf16(x)
        step = _float_step(x, 7 if kind == Q.BF16 else 10)
        return x + step * rng.uniform(-0.5, 0.5, x.shape)
    size = 32 if kind in ACT_Q8_32 else 256 if kind in ACT_Q8_K else None
    assert size is not None, f"no activation model for {kind!r}"
    b = _blocks(x, size)
    amax = np.abs(b).max(-1, keepdims=True)
    if size == 32:
        d = _round_fp16(amax / 127)  # the scale is stored in fp16
        if rng is None:
            q = np.round(np.divide(b, amax / 127, out=np.zeros_like(b), where=amax > 0))
            return (q * d).reshape(x.shape)
        scale_err = 1 + rng.uniform(-1, 1, amax.shape) * 2.0 ** -11
        return ((b + (amax / 127) * rng.uniform(-0.5, 0.5, b.shape)) * scale_err).reshape(x.shape)
    if rng is None:  # Q8_K: iscale = -127/max, q = round(iscale*x) (at most 127), d = 1/iscale
        signed = np.take_along_axis(b, np.abs(b).argmax(-1)[..., None], -1)
        iscale = np.divide(-127.0, signed, out=np.zeros_like(signed), where=signed != 0)
        q = np.minimum(np.round(iscale * b), 127)
        return np.divide(q, iscale, out=np.zeros_like(q), where=iscale != 0).reshape(x.shape)
    return (b + (amax / 127) * rng.uniform(-0.5, 0.5, b.shape)).reshape(x.shape)


# ---------------------------------------------------------------- the float64 reference forward

def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope(x, base):  # x [..., T, heads, hd]; llama.cpp's normal mode: adjacent pairs (the GGUF layout)
    t, hd = x.shape[-3], x.shape[-1]
    ang = np.arange(t)[:, None] * base ** (-np.arange(0, hd, 2) / hd)
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
    return out


def forward(m: Model, ids, *, kv: str = "f32", mode: str = "exact", rng=None, samples: int = 1) -> np.ndarray:
    """Logits [samples, T, vocab] in float64. mode: 'exact' (no rounding), 'round' (ggml's roundings),
    'noise' (their uniform noise, an independent draw from rng for each sample)."""
    noise = rng if mode == "noise" else None
    w, hd = m.weights, m.head_dim

    def act(x, kind):  # one rounding per tensor and type, shared by the products that read it
        return x if mode == "exact" else round_activations(x, kind, noise)

    def mms(x, *names):
        rounded = {}
        for name in names:
            kind = m.types[name]
            if kind not in rounded:
                rounded[kind] = act(x, kind)
        # as one 2-D product per weight (numpy's stacked matmul is many times slower)
        return [(rounded[m.types[n]].reshape(-1, x.shape[-1]) @ w[n].T).reshape(*x.shape[:-1], -1) for n in names]

    x = np.repeat(w["token_embd.weight"][np.asarray(ids)][None], samples, axis=0)
    n, t = x.shape[:2]
    mask = np.triu(np.full((t, t), -np.inf), 1)
    for i in range(m.n_layer):
        b = f"blk.{i}."
        q, k, v = mms(_rms(x, w[b + "attn_norm.weight"], m.eps), *(b + f"attn_{c}.weight" for c in "qkv"))
        q = _rope(q.reshape(n, t, m.n_head, hd), m.rope_base)
        k = _rope(k.reshape(n, t, m.n_kv, hd), m.rope_base)
        v = v.reshape(n, t, m.n_kv, hd)
        if kv == "f16":  # the cache holds K and V in fp16; Q is rounded to fp16 for its product with K
            q, k, v = act(q, "fp16"), act(k, "fp16"), act(v, "fp16")
        rep = m.n_head // m.n_kv
        k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
        s = np.einsum("nthd,nshd->nhts", q, k) / np.sqrt(hd) + mask
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        if kv == "f16":  # the probabilities are rounded to fp16 for their product with V
            p = act(p, "fp16")
        att = np.einsum("nhts,nshd->nthd", p, v).reshape(n, t, m.n_head * hd)
        x = x + mms(att, b + "attn_output.weight")[0]
        g, u = mms(_rms(x, w[b + "ffn_norm.weight"], m.eps), b + "ffn_gate.weight", b + "ffn_up.weight")
        x = x + mms(g / (1 + np.exp(-g)) * u, b + "ffn_down.weight")[0]
    return mms(_rms(x, w["output_norm.weight"], m.eps), "output.weight")[0]


# ---------------------------------------------------------------- the bound

@dataclass
class Bound:
    reference: np.ndarray  # noise-free logits [T, vocab] on the file's weights
    sigma: np.ndarray  # per-logit standard deviation of the rounding noise
    rounded: np.ndarray  # logits with ggml's roundings applied (the quantised arithmetic)

    @property
    def limit(self) -> np.ndarray:
        return Z * self.sigma + FLOOR

    def excess(self, logits) -> float:
        """max_i |logits_i - reference_i| / limit_i: at most 1 for an implementation the model admits."""
        return float((np.abs(np.asarray(logits, np.float64) - self.reference) / self.limit).max())

    def describe(self, name, logits) -> str:
        diff = np.abs(np.asarray(logits, np.float64) - self.reference)
        return (f"{name}: max|diff| {diff.max():.2e} vs reference, {self.excess(logits):.2f} of its bound "
                f"(sigma median {np.median(self.sigma):.1e}, max {self.sigma.max():.1e})")

    def sure_argmax(self) -> np.ndarray:
        """Positions whose top logit leads the next by more than twice the bound: every admitted
        implementation picks the same token there."""
        top2 = np.sort(self.reference, -1)[:, -2:]
        return (top2[:, 1] - top2[:, 0]) > 2 * self.limit.max(-1)


def bound(path, ids, *, kv: str = "f32", samples: int = SAMPLES, seed: int = 0) -> Bound:
    m = read_model(path)
    ref = forward(m, ids, kv=kv)[0]
    draws = forward(m, ids, kv=kv, mode="noise", rng=np.random.default_rng(seed), samples=samples) - ref
    return Bound(ref, np.sqrt((draws ** 2).mean(0)), forward(m, ids, kv=kv, mode="round")[0])
