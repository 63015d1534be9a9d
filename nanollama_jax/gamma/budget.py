"""A size budget shared out over a gamma's tensors: per matrix, low rank or sparse or dense, chosen so
the whole keeps as much of ‖γ‖² as the budget buys.

Each matrix offers two concave curves of kept energy against bytes: truncated SVD (rank k keeps the
k largest σ², costs k·(out + in) values) and top-|value| entries (n entries keep the n largest squares,
cost n values + n positions); keeping it dense costs 4 bytes an entry and keeps everything. For a price
λ (bytes worth one unit of energy) every matrix independently picks the point that maximises
energy − λ·bytes, over both curves; the total size falls as λ rises, and a bisection on λ finds the
cheapest price that fits the budget (the Lagrangian relaxation of the knapsack: optimal among the
points of the curves' convex hulls). Energy is counted as a share of the whole ‖γ‖², so one price
serves every tensor and no per-group setting is needed. 1-D tensors (norms) are kept dense and
paid first.
"""
from __future__ import annotations

import numpy as np

from .encodings import index_dtype

SPARSE_POINTS = 512  # the sparse curve is sampled at this many entry counts (geometric), enough for a knapsack


def _curves(a: np.ndarray, value_bytes: int):
    """[(kind, levels, kept energy, bytes)] for one matrix: rank k, entry count n, and dense."""
    a = np.asarray(a, np.float64)
    out, inp = a.shape
    s2 = np.linalg.svd(a, compute_uv=False) ** 2
    ranks = np.arange(len(s2) + 1)
    lr = ("rank", ranks, np.concatenate([[0.0], np.cumsum(s2)]), ranks * (out + inp) * value_bytes)
    sq = np.sort(np.square(a).ravel())[::-1]
    n = np.unique(np.concatenate([[0], np.geomspace(1, sq.size, SPARSE_POINTS).astype(np.int64)]))
    csum = np.concatenate([[0.0], np.cumsum(sq)])
    sp = ("entries", n, csum[n], n * (value_bytes + np.dtype(index_dtype(a.size)).itemsize))
    dense = ("dense", np.array([1]), np.array([float(csum[-1])]), np.array([4 * a.size]))
    return [lr, sp, dense]


def _pick(curves, price: float):
    """The (kind, level, energy, bytes) maximising energy − price·bytes over all curves (nothing: 0, 0)."""
    best = ("rank", 0, 0.0, 0)
    best_gain = 0.0
    for kind, levels, energy, cost in curves:
        gain = energy - price * cost
        i = int(np.argmax(gain))
        if gain[i] > best_gain:
            best_gain, best = gain[i], (kind, int(levels[i]), float(energy[i]), int(cost[i]))
    return best


def allocate(tensors: dict, budget_bytes: float, value_bytes: int, weights: dict | None = None) -> dict:
    """{name: spec} for the 2-D tensors of `tensors` ({name: dense array}); specs are {"rank": k},
    {"entries": n} or {"dense": True}. 1-D tensors are left out (the caller keeps them dense) and their
    bytes come off the budget first. `weights` ({name: worth of a unit of energy}, default 1) scale each
    tensor's curve."""
    fixed = sum(4 * a.size for a in tensors.values() if a.ndim < 2)
    left = budget_bytes - fixed
    if left < 0:
        raise ValueError(f"the budget ({int(budget_bytes):,} bytes) does not even hold the norms ({fixed:,} bytes)")
    mats = {k: a for k, a in tensors.items() if a.ndim >= 2}
    w = {k: 1.0 if weights is None else float(weights.get(k, 0.0)) for k in mats}
    total = sum(w[k] * float(np.sum(np.square(a, dtype=np.float64))) for k, a in mats.items()) or 1.0
    # worth as shares of the whole: the price is then in "share of the (weighted) ‖γ‖² per byte"
    curves = {k: [(kind, lv, w[k] * e / total, c) for kind, lv, e, c in _curves(a, value_bytes)]
              for k, a in mats.items()}

    def plan(price):
        return {k: _pick(c, price) for k, c in curves.items()}

    def size(p):
        return sum(b for _, _, _, b in p.values())

    lo, hi = 1e-15, 1.0  # at price 1 nothing is worth a byte: a byte never holds the whole gamma
    if size(plan(lo)) <= left:  # everything the curves offer fits
        hi = lo
    for _ in range(80):  # bisection in log space; the size only falls as the price rises
        mid = np.sqrt(lo * hi)
        if size(plan(mid)) <= left:
            hi = mid
        else:
            lo = mid
    chosen = plan(hi)
    return {k: ({"dense": True} if kind == "dense" else {kind: level}) for k, (kind, level, _, _) in chosen.items()}
