"""Compressed gammas (truncated SVD, rank or energy; top-|value| sparse) per group of tensors, and the
fidelity report: the share of the personality effect a compressed gamma keeps."""
from __future__ import annotations

import numpy as np

from ..config import LlamaConfig
from .budget import allocate
from .encodings import Dense, Gamma, LowRank, Sparse
from .ops import apply_gamma


def low_rank(a: np.ndarray, rank: int | None = None, energy: float | None = None, dtype=np.float32) -> LowRank:
    """Truncated SVD: rank `rank`, or the smallest rank keeping the fraction `energy` of the squared
    Frobenius norm (both: the smaller of the two)."""
    u, s, vt = np.linalg.svd(np.asarray(a, np.float64), full_matrices=False)
    r = len(s)
    if energy is not None:
        total = float(np.sum(s ** 2))
        r = int(np.searchsorted(np.cumsum(s ** 2) / total, energy - 1e-12) + 1) if total else 0
    if rank is not None:
        r = min(r, rank)
    r = max(0, min(r, len(s)))
    return LowRank(u[:, :r] * s[:r], vt[:r], dtype)


def top_fraction(a: np.ndarray, density: float, dtype=np.float32) -> Sparse:
    return top_entries(a, int(round(density * np.size(a))), dtype)


def top_entries(a: np.ndarray, n: int, dtype=np.float32) -> Sparse:
    """The n entries of largest |value|, as a sparse tensor."""
    flat = np.asarray(a, np.float32).ravel()
    if n >= flat.size:
        idx = np.arange(flat.size)
    elif n <= 0:
        idx = np.zeros(0, np.int64)
    else:
        idx = np.sort(np.argpartition(-np.abs(flat), n - 1)[:n])
    return Sparse(a.shape, idx, flat[idx], dtype)


GROUPS = ("layers", "head", "embedding")


def group_of(name: str) -> str:
    return {"tok_embeddings.weight": "embedding", "output.weight": "head"}.get(name, "layers")


def parse_spec(text: str, what: str = "spec") -> dict:
    """'rank:8', 'energy:0.7', 'density:0.25', 'rank:16,energy:0.8' or 'dense' → a spec dict."""
    spec = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if part == "dense":
            spec["dense"] = True
            continue
        key, _, value = part.partition(":")
        try:
            spec[key] = int(value) if key == "rank" else float(value)
        except ValueError:
            raise ValueError(f"{what}: bad value in {part!r}") from None
        if key not in ("rank", "energy", "density"):
            raise ValueError(f"{what}: unknown setting {key!r} (rank:R, energy:E, density:D or dense)")
    return _check_spec(spec, what)


def _check_spec(spec: dict, what: str) -> dict:
    if spec.get("rank") is not None and spec["rank"] < 1:
        raise ValueError(f"{what}: rank must be >= 1, got {spec['rank']}")
    if spec.get("density") is not None and not 0 <= spec["density"] <= 1:
        raise ValueError(f"{what}: density must be in [0, 1], got {spec['density']}")
    if spec.get("energy") is not None and not 0 < spec["energy"] <= 1:
        raise ValueError(f"{what}: energy must be in (0, 1], got {spec['energy']}")
    if spec.get("density") is not None and (spec.get("rank") or spec.get("energy")):
        raise ValueError(f"{what}: choose low rank (rank/energy) or density, not both")
    return spec


def default_specs(rank=None, density=None, energy=None) -> dict:
    """The documented defaults: layer matrices and head low rank (rank and/or energy) when asked,
    else sparse; the token embedding sparse when a density is given, else low rank."""
    lowrank = {k: v for k, v in (("rank", rank), ("energy", energy)) if v is not None}
    sparse = {"density": density} if density is not None else {}
    main = lowrank or sparse
    return {"layers": main, "head": main, "embedding": sparse or lowrank}


DEFAULT_BUDGET = 0.2  # of the dense float32 size, when no setting is given
ARRAY_OVERHEAD = 300  # bytes an .npz array costs besides its data


def compress_to_budget(g: Gamma, budget: float = DEFAULT_BUDGET, dtype: str = "float16",
                       weights: dict | None = None) -> Gamma:
    """Compression to `budget` × the dense float32 size, shared out over the tensors by `budget.allocate`
    (per matrix: the rank, the number of top entries, or dense that buys most of ‖γ‖² per byte).
    `weights` ({name: loss per unit of ‖γ‖²}, from `sensitivities`) make a unit of energy in a tensor
    that matters more to the loss worth more; without them every unit of ‖γ‖² counts the same."""
    if dtype not in ("float32", "float16"):
        raise ValueError(f"--dtype must be float32 or float16, got {dtype}")
    if not 0 < budget <= 1:
        raise ValueError(f"--budget must be in (0, 1], got {budget}")
    dense = g.dense_state()
    # the file's own bookkeeping is paid from the budget too (a zip entry and an .npy header, ~300 bytes an
    # array, up to two arrays a tensor), so the file on disk keeps to it, not only its tensor data
    overhead = 2 * ARRAY_OVERHEAD * len(dense)
    specs = allocate(dense, budget * g.dense_nbytes() - overhead, np.dtype(dtype).itemsize, weights)
    tensors = {}
    for k, a in dense.items():
        spec = specs.get(k, {"dense": True})
        if "dense" in spec:
            tensors[k] = Dense(a)
        elif "entries" in spec:
            tensors[k] = top_entries(a, spec["entries"], dtype)
        else:
            tensors[k] = low_rank(a, spec["rank"], dtype=dtype)
    info = dict(g.info)
    info["compressed_from"] = {"gamma": g.source, "budget": budget, "dtype": dtype, "allocation": specs,
                               "weighted_by_loss": weights is not None}
    info["ranks"] = {k: t.rank for k, t in tensors.items() if t.kind == "lowrank"}
    return Gamma(tensors, g.config, g.tokenizer_sha256, g.base_fingerprint, None, None, info, g.source)


def compress(g: Gamma, rank: int | None = None, density: float | None = None, energy: float | None = None,
             dtype: str = "float32", specs: dict | None = None) -> Gamma:
    """Per-group compression (groups: layers, head, embedding); `specs` overrides the defaults of
    rank/density/energy per group. 1-D tensors stay dense float32."""
    if dtype not in ("float32", "float16"):
        raise ValueError(f"--dtype must be float32 or float16, got {dtype}")
    plan = default_specs(rank, density, energy)
    plan.update(specs or {})
    for group, spec in plan.items():
        _check_spec(spec, f"--{group}" if specs and group in specs else "compress")
    if not any(plan.values()):
        raise ValueError("compress needs --rank, --energy and/or --density (or per-group settings)")
    tensors = {}
    for k, e in g.tensors.items():
        a = e.dense()
        spec = plan[group_of(k)]
        if a.ndim < 2 or not spec or spec.get("dense"):
            tensors[k] = Dense(a)
        elif "density" in spec:
            tensors[k] = top_fraction(a, spec["density"], dtype)
        else:
            tensors[k] = low_rank(a, spec.get("rank"), spec.get("energy"), dtype)
    info = dict(g.info)
    info["compressed_from"] = {"gamma": g.source, "plan": plan, "dtype": dtype}
    info["ranks"] = {k: t.rank for k, t in tensors.items() if t.kind == "lowrank"}
    return Gamma(tensors, g.config, g.tokenizer_sha256, g.base_fingerprint, rank, density, info, g.source)


def personality_loss_fn(config: LlamaConfig, data_dir, seq_len: int, batch_size: int, batches: int):
    """A function params -> mean loss on the val split of `data_dir` (fixed batches): the training
    loss itself, so the share kept is measured in the quantity training minimises."""
    import functools

    import jax

    from ..input import validation_batches
    from ..training_setup import next_token_loss  # imported here: only the fidelity report needs training's code

    vb = validation_batches(data_dir, seq_len=seq_len, batch_size=batch_size, max_batches=batches)
    loss = jax.jit(functools.partial(next_token_loss, config=config))

    def fn(params):
        return float(np.mean([float(loss(params, b)) for b in vb]))

    return fn


def sensitivities(pers_state: dict, g: Gamma, config: LlamaConfig, loss_fn, progress=None) -> dict:
    """{matrix name: loss per unit of ‖γ‖²}: how much the personality's loss rises when that matrix's
    gamma alone is left out, divided by the matrix's ‖γ‖² (the embedding's delta, spread over rows of
    rare tokens, can be large and matter little; the head's the other way round). Floors at a small
    positive share so no matrix is priced at nothing. `progress` (a tqdm-like bar) is advanced per matrix."""
    from ..statedict import from_state_dict

    lp = loss_fn(from_state_dict(pers_state, config))
    out = {}
    for k, e in g.tensors.items():
        if len(e.shape) < 2:
            continue
        d = e.dense()
        energy = float(np.sum(np.square(d, dtype=np.float64)))
        if not energy:
            continue
        without = dict(pers_state)
        without[k] = np.asarray(pers_state[k], np.float32) - d
        out[k] = max(loss_fn(from_state_dict(without, config)) - lp, 0.0) / energy
        if progress is not None:
            progress.update()
    floor = 1e-3 * max(out.values(), default=0.0)
    return {k: max(v, floor) for k, v in out.items()}


def fidelity(base_state: dict, pers_state: dict, compressed: Gamma, config: LlamaConfig, loss_fn) -> dict:
    from ..statedict import from_state_dict

    lb = loss_fn(from_state_dict(base_state, config))
    lp = loss_fn(from_state_dict(pers_state, config))
    lc = loss_fn(from_state_dict(apply_gamma(base_state, compressed), config))
    gap = lb - lp
    return {"loss_base": lb, "loss_personality": lp, "loss_compressed": lc,
            "share_kept": (lb - lc) / gap if gap else float("nan")}
