"""Compile time of a forward+backward step vs depth: scanned layers keep it flat.

    python -m benchmarks.compile_time      # writes benchmarks/results/compile_time.{json,md}

The acceptance bar: a 32-layer CPU config compiles in at most 1.5x the time of a 4-layer one.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from nanollama_jax.config import LlamaConfig
from nanollama_jax.model import cross_entropy, forward, param_shapes

RESULTS = Path("benchmarks") / "results"  # under the working directory, never beside an installed file


def compile_seconds(n_layer: int, repeats: int = 3) -> float:
    config = LlamaConfig(n_layer=n_layer, n_embd=256, n_head=4, n_kv_head=2, vocab_size=4096, sequence_len=128)

    def loss(params, tokens):
        return cross_entropy(forward(params, tokens[:, :-1], config), tokens[:, 1:])

    shapes = param_shapes(config)
    tokens = jax.ShapeDtypeStruct((8, 129), jnp.int32)
    best = float("inf")
    for _ in range(repeats):
        jax.clear_caches()
        start = time.perf_counter()
        jax.jit(jax.value_and_grad(loss)).lower(shapes, tokens).compile()
        best = min(best, time.perf_counter() - start)
    return best


def main():
    rows = {n: compile_seconds(n) for n in (4, 32)}
    ratio = rows[32] / rows[4]
    result = {"seconds": {str(k): v for k, v in rows.items()}, "ratio_32_over_4": ratio, "bar": 1.5,
              "backend": jax.default_backend()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "compile_time.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "compile_time.md").write_text(
        "# Compile time of forward+backward vs depth (CPU, d 256, seq 128, batch 8; best of 3)\n\n"
        "| layers | compile seconds |\n| --- | --- |\n"
        + "".join(f"| {n} | {s:.2f} |\n" for n, s in rows.items())
        + f"\nratio 32/4 = {ratio:.2f} (bar: ≤ 1.5)\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
