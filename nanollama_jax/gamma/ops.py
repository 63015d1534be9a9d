"""Gamma arithmetic on state dicts: extract (θ_personality − θ_base), inject (θ_base + α·gamma, also
across depths) and compose (Σ wᵢ·gammaᵢ), each after the compatibility check."""
from __future__ import annotations

import numpy as np

from .compat import Side, check_compatible, fingerprint, gamma_side, layer_of, load_state, run_side
from .encodings import Dense, Gamma


def extract(personality_run, base_run) -> Gamma:
    from ..checkpoint import open_run

    rp, rb = open_run(personality_run), open_run(base_run)
    check_compatible([run_side(f"base {base_run}", rb), run_side(f"personality {personality_run}", rp)],
                     what="extract")
    _, base = load_state(base_run)
    _, pers = load_state(personality_run)
    check_compatible([Side(f"base {base_run}", None, None, {k: v.shape for k, v in base.items()}),
                      Side(f"personality {personality_run}", None, None, {k: v.shape for k, v in pers.items()})],
                     what="extract")
    tensors = {k: Dense(np.asarray(pers[k], np.float32) - np.asarray(base[k], np.float32)) for k in base}
    return Gamma(tensors, rb.config, rb.info.get("tokenizer_sha256"), fingerprint(base),
                 info={"extracted": {"personality": str(personality_run), "base": str(base_run),
                                     "personality_step": rp.step, "base_step": rb.step}})


def cross_depth_map(n_base: int, n_gamma: int) -> list[int]:
    """For each base layer i, the gamma layer it takes: floor(i·(L_g−1)/(L_b−1) + 1/2), the nearest layer at
    the same relative depth, a tie going to the deeper one. First maps to first and last to last; a 5-layer
    base takes a 3-layer gamma's layers [0, 1, 1, 2, 2]."""
    if n_base == 1:
        return [0]
    return [int(np.floor(i * (n_gamma - 1) / (n_base - 1) + 0.5)) for i in range(n_base)]


def n_layers(names) -> int:
    idx = [layer_of(k)[0] for k in names]
    return max((i for i in idx if i is not None), default=-1) + 1


def apply_gamma(base_state: dict, g: Gamma, alpha: float = 1.0, cross_depth: bool = False) -> dict:
    """θ_base + α·gamma as a new state dict (names and shapes assumed checked)."""
    n_base, n_gamma = n_layers(base_state), n_layers(g.tensors)
    mapping = cross_depth_map(n_base, n_gamma) if cross_depth else list(range(n_base))
    out = {}
    for k, a in base_state.items():
        i, rest = layer_of(k)
        src = k if i is None else f"layers.{mapping[i]}.{rest}"
        out[k] = np.asarray(a, np.float32) + np.float32(alpha) * g.dense(src)
    return out


def inject_into(base_run, g: Gamma, alpha: float = 1.0, cross_depth: bool = False):
    """(Run, params, notes): θ_base + α·gamma, after every check."""
    from ..checkpoint import open_run
    from ..statedict import from_state_dict

    rb = open_run(base_run)
    sides = [run_side(f"base {base_run}", rb), gamma_side(f"gamma {g.source}", g)]
    notes = check_compatible(sides, cross_depth=cross_depth, what="inject")
    rb, base = load_state(base_run)
    check_compatible([Side(f"base {base_run}", None, None, {k: v.shape for k, v in base.items()}), sides[1]],
                     cross_depth=cross_depth, what="inject")
    if g.base_fingerprint and not cross_depth:
        if fingerprint(base) != g.base_fingerprint:
            notes.append(f"the base differs from the one the gamma was extracted against (fingerprint "
                         f"{g.base_fingerprint[:12]}…): injecting into another base")
    new = apply_gamma(base, g, alpha, cross_depth)
    return rb, from_state_dict(new, rb.config, source=str(base_run)), notes


def compose(gammas: list[Gamma], weights: list[float]) -> Gamma:
    if len(gammas) != len(weights):
        raise ValueError(f"{len(gammas)} gammas but {len(weights)} weights")
    if not gammas:
        raise ValueError("nothing to compose")
    check_compatible([gamma_side(f"gamma {g.source}", g) for g in gammas], what="compose")
    first = gammas[0]
    tensors = {}
    for k in first.tensors:
        acc = np.float32(weights[0]) * first.dense(k)
        for g, w in zip(gammas[1:], weights[1:]):
            acc = acc + np.float32(w) * g.dense(k)
        tensors[k] = Dense(acc)
    fps = {g.base_fingerprint for g in gammas}
    return Gamma(tensors, next((g.config for g in gammas if g.config), None),
                 next((g.tokenizer_sha256 for g in gammas if g.tokenizer_sha256), None),
                 fps.pop() if len(fps) == 1 else None,
                 info={"composed": [{"gamma": g.source, "weight": float(w)} for g, w in zip(gammas, weights)]})
