"""Optimizers with nanollama's learning-rate rules, in optax.

Groups (by parameter path):
  embed   tok_embeddings              AdamW, lr 0.2·s
  head    output                      AdamW, lr 0.004·s
  norm    every RMSNorm scale         AdamW, lr 0.004·s
  matrix  every kernel inside layers  Muon, lr 0.02·sqrt(max(1, out/in))
with s = (d/768)^-0.5, AdamW betas (0.8, 0.95), eps 1e-10, no weight decay. Muon: Nesterov momentum
0.95, 5 Polar-Express orthogonalisation steps (optax's Newton–Schulz with per-step coefficients),
NorMuon per-neuron variance normalisation (beta2 0.95), cautious weight decay. The scanned kernels
are [layers, in, out]: Muon is told so through dimension numbers and orthogonalises each layer's
matrix on its own. Everything clips the global gradient norm at 1.0 first and follows one
warmup-stable-decay schedule; `lr_scale` multiplies every group.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax.contrib import MuonDimensionNumbers, scale_by_muon

from .config import LlamaConfig

# Polar Express (Amsel et al. 2025) coefficients for 5 steps, as nanochat uses them.
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
ADAM = dict(b1=0.8, b2=0.95, eps=1e-10)
MUON_LR, MUON_MOMENTUM, NORMUON_BETA2 = 0.02, 0.95, 0.95
SCANNED_KERNEL = MuonDimensionNumbers(reduction_axis=1, output_axis=2)  # [layers, in, out]


def param_group(path) -> str:
    keys = [getattr(k, "key", str(k)) for k in path]
    if keys[0] == "tok_embeddings":
        return "embed"
    if keys[0] == "output":
        return "head"
    if keys[-1] == "scale":
        return "norm"
    if keys[0] == "layers" and keys[-1] == "kernel":
        return "matrix"
    raise ValueError(f"no optimizer group for parameter {'/'.join(keys)}")


def group_labels(params):
    return jax.tree_util.tree_map_with_path(lambda p, _: param_group(p), params)


def wsd_schedule(steps: int, warmup: int = 100, stable_fraction: float = 0.5, xp=jnp):
    """Multiplier: linear warmup, constant until `stable_fraction` of the steps, linear decay to 0.
    `xp=np` evaluates it on the host (the same float32 arithmetic): a log line must not queue behind
    the training step already dispatched to the device."""
    decay_start = stable_fraction * steps

    def schedule(step):
        step = xp.asarray(step, xp.float32)
        ramp = xp.minimum((step + 1) / max(warmup, 1), 1.0)
        decay = xp.clip((steps - step) / max(steps - decay_start, 1), 0.0, 1.0)
        return ramp * xp.where(step < decay_start, 1.0, decay)

    return schedule


class NorMuonState(NamedTuple):
    v: optax.Updates


def normuon_variance(beta2: float = NORMUON_BETA2, eps: float = 1e-10) -> optax.GradientTransformation:
    """NorMuon: divide each output neuron's row of the orthogonalised update by the running RMS of
    that row, then restore the update's overall norm. Works on [layers, in, out] kernels."""

    def init(params):
        return NorMuonState(jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape[:1] + p.shape[2:], p.dtype), params))

    def update(updates, state, params=None):
        del params
        v = jax.tree_util.tree_map(lambda v, u: beta2 * v + (1 - beta2) * jnp.mean(u * u, axis=1), state.v, updates)

        def scale(u, v):
            normed = u / (jnp.sqrt(v)[:, None, :] + eps)
            ratio = jnp.linalg.norm(u, axis=(1, 2), keepdims=True) / (jnp.linalg.norm(normed, axis=(1, 2), keepdims=True) + eps)
            return normed * ratio

        return jax.tree_util.tree_map(scale, updates, v), NorMuonState(v)

    return optax.GradientTransformation(init, update)


def shape_lr_multiplier() -> optax.GradientTransformation:
    """Muon's per-matrix rate: sqrt(max(1, out/in)) for a [layers, in, out] kernel."""

    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map(lambda u: u * math.sqrt(max(1.0, u.shape[2] / u.shape[1])), updates), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def cautious_weight_decay(rate: float, schedule) -> optax.GradientTransformation:
    """Decay a weight only where the update moves it toward zero (sign(update) == -sign(param)
    after negation), scaled like the learning rate. Applied to the already-negated update."""

    def init(_):
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params):
        if not rate:
            return updates, state
        lr = schedule(state.count)
        out = jax.tree_util.tree_map(
            lambda u, p: u - lr * rate * p * ((u * p) < 0).astype(p.dtype), updates, params)
        return out, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def group_rates(config: LlamaConfig, lr_scale: float = 1.0, kind: str = "muon") -> dict[str, float]:
    """Peak learning rate per group. With plain AdamW the hidden matrices take the head's rate
    (Muon's 0.02 is a rate for orthogonalised updates, far too large for Adam's)."""
    s = (config.n_embd / 768) ** -0.5
    head = 0.004 * s * lr_scale
    return {"embed": 0.2 * s * lr_scale, "head": head, "norm": head,
            "matrix": head if kind == "adamw" else MUON_LR * lr_scale}


def make_optimizer(config: LlamaConfig, steps: int, *, kind: str = "muon", lr_scale: float = 1.0,
                   warmup: int = 100, weight_decay: float = 0.0, clip: float = 1.0) -> optax.GradientTransformation:
    """The whole update rule: clip, then one transform per group, each on the WSD schedule."""
    multiplier = wsd_schedule(steps, warmup)
    rates = group_rates(config, lr_scale, kind)

    def adam(rate):
        return optax.adamw(lambda t: rate * multiplier(t), weight_decay=weight_decay, **ADAM)

    if kind == "adamw":
        transforms = {g: adam(r) for g, r in rates.items()}
    elif kind == "muon":
        schedule = lambda t: rates["matrix"] * multiplier(t)  # noqa: E731
        muon = optax.chain(
            scale_by_muon(ns_coeffs=POLAR_EXPRESS, ns_steps=len(POLAR_EXPRESS), beta=MUON_MOMENTUM, nesterov=True,
                          weight_dimension_numbers=lambda tree: jax.tree_util.tree_map(lambda _: SCANNED_KERNEL, tree)),
            normuon_variance(),
            shape_lr_multiplier(),
            optax.scale_by_learning_rate(schedule),
            cautious_weight_decay(weight_decay, schedule),
        )
        transforms = {"embed": adam(rates["embed"]), "head": adam(rates["head"]), "norm": adam(rates["norm"]),
                      "matrix": muon}
    else:
        raise ValueError(f"--optimizer must be muon or adamw, got {kind!r}")
    return optax.chain(optax.clip_by_global_norm(clip), optax.multi_transform(transforms, group_labels))


def learning_rates(config: LlamaConfig, steps: int, step: int, *, kind: str = "muon", lr_scale: float = 1.0,
                   warmup: int = 100) -> dict[str, float]:
    """Each group's learning rate at `step` (for logs and tests)."""
    rates = group_rates(config, lr_scale, kind)
    m = float(wsd_schedule(steps, warmup, xp=np)(step))
    return {g: r * m for g, r in rates.items()}
