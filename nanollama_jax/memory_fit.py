"""What fits a device: the train step's predicted peak per device, and when it exceeds the device's
memory, the cheapest micro-batch / remat that fits, found by compiling candidates (nothing is
allocated; the same AOT compile as `--dry-run`).

    fit_report(setup, recipe, flags, limit_bytes)   # train --dry-run --device-memory 80: prints, returns the fit

Candidates are tried cheapest first by a stated cost model: recomputation multiplies a step's
compute (REMAT_COST) and every halving of the micro-batch costs HALVING_COST (smaller matmuls, more
accumulation steps, the same tokens per step). The first that compiles within the limit is the answer.
"""
from __future__ import annotations

import itertools

from .config import REMAT_POLICIES
from .training_setup import TrainingSetup

GIB = 1024**3
# A step's compute relative to keeping every activation: `dots` recomputes the elementwise work,
# `qkv` also the FFN's matmuls (about a third of the forward), `full` the whole forward (+1/3 of 6N).
REMAT_COST = {"none": 1.0, "dots": 1.05, "qkv": 1.2, "full": 1.33}
HALVING_COST = 1.05


def candidates(batch_size: int, remat: str) -> list[tuple[int, str]]:
    """(rows per device, remat) to try when (batch_size, remat) does not fit, cheapest first: the
    same or a stronger remat, the same or a halved micro-batch."""
    stronger = REMAT_POLICIES[REMAT_POLICIES.index(remat):]
    sizes = [batch_size >> i for i in range(batch_size.bit_length()) if batch_size >> i >= 1]
    pairs = [(b, r) for b, r in itertools.product(sizes, stronger) if (b, r) != (batch_size, remat)]
    return sorted(pairs, key=lambda br: (REMAT_COST[br[1]] * HALVING_COST ** sizes.index(br[0]), -br[0]))


def fit_report(setup: TrainingSetup, recipe: dict, flags: dict, limit_bytes: float, say=print):
    """`say` `setup`'s predicted peak per device against `limit_bytes`, and when it does not fit,
    each candidate of the search as it compiles and the answer. `recipe` and `flags` are what built
    `setup` (`TrainingSetup.build`'s), varied by the search. Returns (the fitting (rows per device,
    remat) or None when nothing fits or the backend reports no memory, the candidates compiled as
    (rows per device, remat, peak bytes) in order)."""
    _, peak, _ = setup.step_memory
    if peak is None:
        say("memory per device: not reported by this backend; cannot check the fit")
        return None, []
    plan = setup.plan
    head = (f"predicted peak {peak / GIB:.2f} GiB per device of {limit_bytes / GIB:.2f} GiB "
            f"(--batch-size {plan.batch_size} --remat {plan.config.remat})")
    if peak <= limit_bytes:
        say(head + ": fits")
        return (plan.batch_size, plan.config.remat), []
    say(head + ": does NOT fit; compiling candidates, cheapest first")
    tried = []
    for batch_size, remat in candidates(plan.batch_size, plan.config.remat):
        try:
            trial = TrainingSetup.build(plan.config, recipe, setup.mesh,
                                        **{**flags, "batch_size": batch_size, "remat": remat})
        except ValueError:  # this micro-batch does not divide the tokens per step
            continue
        _, need, _ = trial.step_memory
        tried.append((batch_size, remat, need))
        say(f"  --batch-size {batch_size} --remat {remat}: {need / GIB:.2f} GiB")
        if need <= limit_bytes:
            say(f"fits: --batch-size {batch_size} --remat {remat} (predicted {need / GIB:.2f} GiB per device; "
                f"accumulation {trial.plan.accum}, tokens per step {trial.plan.tokens_per_step:,} unchanged)")
            return (batch_size, remat), tried
    say("nothing fits even at --batch-size 1 --remat full: shard the parameters and optimizer state over more "
        "devices (--mesh Nx1) or use a smaller --seq-len")
    return None, tried
