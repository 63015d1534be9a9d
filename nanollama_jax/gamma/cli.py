"""Personality as a weight delta (gamma): extract, inject, compose, compress, inspect.

    python -m nanollama_jax.gamma extract --personality runs/pirate --base runs/base -o pirate.npz
    python -m nanollama_jax.gamma inject --base runs/base --gamma pirate.npz --alpha 0.8 -o runs/base+pirate
    python -m nanollama_jax.gamma compose pirate.npz poet.npz --weights 1 0.5 -o mix.npz
    python -m nanollama_jax.gamma compress pirate.npz -o pirate-small.npz \\
        --base runs/base --personality runs/pirate --data data/pirate      # 20% of the size + fidelity report
    python -m nanollama_jax.gamma stats pirate.npz --base runs/base --reference runs/base-seed1

gamma = θ_personality − θ_base over the whole param pytree; inject gives θ = θ_base + α·gamma.
A gamma is held as a flat state dict in nanollama's names and torch's [out, in] orientation
(`nanollama_jax.statedict`), so it is the same object in every file format:

* our `.npz` (written by `nanollama_jax.gamma`): key `__gamma__` holds JSON metadata (format, kind
  dense|lowrank|sparse|mixed, rank, density, the model config, the tokenizer's sha256, the base
  params' fingerprint, provenance, a fidelity report when compressed); then per tensor K either
  `K` (dense float32), `K.lora_b` [out, r] + `K.lora_a` [r, in] (low rank: K = lora_b @ lora_a),
  or `K.sparse_index` (flat positions, uint16/uint32/uint64: the smallest that addresses the tensor)
  + `K.sparse_value` (float32, or float16 with `compress --dtype float16`);
* the reference's (nanollama) `.npz`: per K `K.indices_0`, `K.indices_1`, … (int32 COO, one per
  dimension), `K.values` (float16), `K.shape` (int64), plus `_metadata.layer_names` and
  `_metadata.total_norm`. Read automatically (the layout is detected from the keys) and written
  with `--layout reference`. Its values are float16, so a gamma that went through that layout is
  float16-rounded; it carries no config or tokenizer, so only names and shapes can be checked.

Compatibility is checked before any arithmetic: model config, tokenizer sha256, tensor names and
shapes. A mismatch is one error listing every difference, and nothing is written.

--cross-depth (inject): a gamma of L_g layers onto a base of L_b layers (same width). Target layer
i takes gamma layer j = floor(i·(L_g−1)/(L_b−1) + 1/2) (j = 0 when L_b = 1): first maps to first,
last to last, the rest proportionally to the nearest layer.

compress: with no setting, `--budget 0.2` — the gamma shrinks to 20% of its dense float32 size (file
bookkeeping included), float16 storage, and the budget is shared out automatically: for each matrix the
truncated-SVD rank, the number of top-|value| entries, or dense, whichever buys most per byte of what
matters (`nanollama_jax.gamma.budget`). Without data, "what matters" is the share of ‖γ‖²; with --base and
--data, each matrix's energy is priced by the loss it costs to leave that matrix's gamma out. Or set it
by hand, in three groups — layers (the 2-D matrices inside the layers), head (output), embedding.
`--rank R` gives the layer matrices and head a truncated SVD of rank R; `--energy E` picks each
matrix's rank as the smallest keeping the fraction E of its ‖γ‖² (adapts to each spectrum; with
--rank, capped at R); `--density D` keeps the top fraction D (by |value|) as a sparse COO list.
The token embedding (a lookup table whose rows are tokens: low rank fits it poorly) takes the
density when one is given, else the low rank; layers and head take the low rank when asked, else
the density. `--layers/--head/--embedding SPEC` override a group (`rank:R`, `energy:E`,
`density:D`, `dense`). `--dtype float16` stores factors and values in half precision. 1-D tensors
(the norms) are tiny and always kept dense float32. With --base, --data (personality
data with a val split) and --personality (or a dense input gamma), the fidelity report measures
the share of the personality effect kept: (loss_base − loss_compressed) / (loss_base −
loss_personality) on the personality validation text, in training's own next-token loss.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from nanollama_base.cli import ArgumentParser, Progress, run_cli
from .compat import check_compatible, gamma_side, load_state, run_side
from .compress import (DEFAULT_BUDGET, GROUPS, compress, compress_to_budget, fidelity, parse_spec,
                       personality_loss_fn, sensitivities)
from .layouts import load_gamma, save_gamma
from .ops import apply_gamma, compose, cross_depth_map, extract, inject_into, n_layers
from .stats import format_stats, plot_stats, stats

PROG = "python -m nanollama_jax.gamma"


def _write_run(out, run, params, **sections):
    from ..checkpoint import write_params_run
    from nanollama_base.files import atomic_dir

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: already exists and is not empty; choose another -o")
    with atomic_dir(out) as tmp:
        write_params_run(tmp, run.config, params, run.tokenizer_path, **sections)


def _fmt_bytes(n: int) -> str:
    return f"{n:,} bytes"


def _cmd_extract(a):
    g = extract(a.personality, a.base)
    size = save_gamma(g, a.output, a.layout)
    print(f"wrote {a.output} ({a.layout} layout, {len(g.tensors)} tensors, ‖γ‖ = "
          f"{np.sqrt(sum(float(np.sum(e.dense().astype(np.float64) ** 2)) for e in g.tensors.values())):.6g}, "
          f"{_fmt_bytes(size)})")


def _cmd_inject(a):
    g = load_gamma(a.gamma)
    run, params, notes = inject_into(a.base, g, a.alpha, a.cross_depth)
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    _write_run(a.output, run, params, gamma={"gamma": str(a.gamma), "alpha": a.alpha, "cross_depth": a.cross_depth,
                                             "base": str(a.base), "base_step": run.step, "kind": g.kind,
                                             "layout": g.layout})
    if a.cross_depth:
        print(f"layers: base ← gamma {cross_depth_map(run.config.n_layer, n_layers(g.tensors))}")
    print(f"wrote {a.output} (base {a.base} + {a.alpha:g}·{a.gamma})")


def _cmd_compose(a):
    weights = a.weights if a.weights is not None else [1.0] * len(a.gammas)
    g = compose([load_gamma(p) for p in a.gammas], weights)
    size = save_gamma(g, a.output, a.layout)
    print(f"wrote {a.output} ({' + '.join(f'{w:g}·{p}' for w, p in zip(weights, a.gammas))}, {_fmt_bytes(size)})")


def _allocation_summary(alloc: dict) -> str:
    """'13 low rank (rank 1–57), 3 sparse (86–10,701 entries), 0 dense' (the per-tensor list is in the file)."""
    parts = []
    for kind, label, unit in (("rank", "low rank", "rank "), ("entries", "sparse", "")):
        v = [spec[kind] for spec in alloc.values() if kind in spec]
        span = f" ({unit}{min(v):,}–{max(v):,}{' entries' if kind == 'entries' else ''})" if v else ""
        parts.append(f"{len(v)} {label}{span}")
    parts.append(f"{sum('dense' in spec for spec in alloc.values())} dense")
    return ", ".join(parts)


def _cmd_compress(a):
    g = load_gamma(a.gamma)
    # check everything the fidelity report needs before any work
    report_wanted = a.base is not None or a.data is not None or a.personality is not None
    if report_wanted and (a.base is None or a.data is None):
        raise ValueError("the fidelity report needs --base and --data (and --personality unless the gamma is dense)")
    if report_wanted and a.personality is None and g.kind != "dense":
        raise ValueError(f"{a.gamma} is already compressed: give --personality to measure the personality effect")
    if report_wanted:
        from ..checkpoint import open_run

        rb = open_run(a.base)
        sides = [run_side(f"base {a.base}", rb), gamma_side(f"gamma {a.gamma}", g)]
        if a.personality:
            sides.append(run_side(f"personality {a.personality}", open_run(a.personality)))
        for n in check_compatible(sides, what="measure fidelity"):
            print(f"note: {n}", file=sys.stderr)
        rb, base = load_state(a.base)
        pers = load_state(a.personality)[1] if a.personality else apply_gamma(base, g)
        seq = a.seq_len or min(rb.config.sequence_len, 256)
        loss_fn = personality_loss_fn(rb.config, a.data, seq, a.batch_size, a.batches)
    specs = {grp: parse_spec(getattr(a, grp), f"--{grp}") for grp in GROUPS if getattr(a, grp)}
    settings = specs or any(v is not None for v in (a.rank, a.density, a.energy))
    if settings and a.budget is not None:
        raise ValueError("--budget chooses every setting itself: give it alone, or --rank/--energy/--density")
    if settings:
        dtype = a.dtype or "float32"
        c = compress(g, a.rank, a.density, a.energy, dtype, specs)
        plan = c.info["compressed_from"]["plan"]
        print(f"compressed {a.gamma} ({dtype}): " + "; ".join(
            f"{grp} {', '.join(f'{k} {v}' for k, v in plan[grp].items()) or 'dense'}" for grp in GROUPS))
    else:
        dtype = a.dtype or "float16"
        # with the report's data, each matrix is priced by what its gamma is worth to the loss
        weights = None
        if report_wanted:
            bar = Progress(sum(len(e.shape) > 1 for e in g.tensors.values()), desc="pricing matrices by the loss",
                           unit="matrix")
            weights = sensitivities(pers, g, rb.config, loss_fn, bar)
            bar.close()
        else:
            print("note: no --base/--data: the budget is shared by ‖γ‖² alone, not weighted by the loss, and no "
                  "fidelity is measured", file=sys.stderr)
        c = compress_to_budget(g, DEFAULT_BUDGET if a.budget is None else a.budget, dtype, weights)
        print(f"compressed {a.gamma} ({dtype}) to a budget of {100 * c.info['compressed_from']['budget']:g}% of "
              f"the dense size: {_allocation_summary(c.info['compressed_from']['allocation'])}")
    dense_bytes, size = c.dense_nbytes(), c.nbytes()
    if c.info["ranks"]:
        print("ranks: " + ", ".join(f"{k} {r}" for k, r in c.info["ranks"].items()))
    print(f"size: {_fmt_bytes(size)} of tensor data vs {_fmt_bytes(dense_bytes)} dense float32 "
          f"({100 * size / dense_bytes:.1f}%)")
    c.info["size"] = {"bytes": size, "dense_bytes": dense_bytes, "ratio": size / dense_bytes}
    if report_wanted:
        f = fidelity(base, pers, c, rb.config, loss_fn)
        c.info["fidelity"] = {**f, "data": str(a.data), "seq_len": seq}
        print(f"fidelity on {a.data} (val): loss base {f['loss_base']:.4f}, personality {f['loss_personality']:.4f}, "
              f"base + compressed gamma {f['loss_compressed']:.4f} -> {100 * f['share_kept']:.1f}% of the "
              f"personality effect kept at {100 * size / dense_bytes:.1f}% of the dense size")
    fsize = save_gamma(c, a.output, "ours")
    print(f"wrote {a.output} ({c.kind}, {_fmt_bytes(fsize)} on disk)")


def _cmd_stats(a):
    g = load_gamma(a.gamma)
    base_state = ref = None
    if a.reference and not a.base:
        raise ValueError("--reference needs --base (the reference delta is θ_reference − θ_base)")
    if a.base:
        from ..checkpoint import open_run

        sides = [gamma_side(f"gamma {a.gamma}", g), run_side(f"base {a.base}", open_run(a.base))]
        if a.reference:
            sides.append(run_side(f"reference {a.reference}", open_run(a.reference)))
        for n in check_compatible(sides, what="compare"):
            print(f"note: {n}", file=sys.stderr)
        _, base_state = load_state(a.base)
        if a.reference:
            _, rs = load_state(a.reference)
            ref = {k: rs[k].astype(np.float32) - base_state[k].astype(np.float32) for k in base_state}
    s = stats(g, base_state, ref)
    print(format_stats(s))
    png = Path(a.plot) if a.plot else Path(a.gamma).with_suffix(".stats.png")
    plot_stats(s, png, title=f"{Path(a.gamma).name}" + (f" vs {a.reference} − {a.base}" if ref else ""))
    if a.json:
        from nanollama_base.files import atomic_path

        with atomic_path(a.json) as tmp:
            tmp.write_text(json.dumps(s, indent=1) + "\n")
    print(f"wrote {png}")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__)
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", required=True)

    e = sub.add_parser("extract", help="gamma = θ_personality − θ_base",
                       description="gamma = θ_personality − θ_base over the whole param pytree.",
                       epilog="example:\n  python -m nanollama_jax.gamma extract --personality runs/pirate "
                              "--base runs/base -o pirate.npz")
    e.add_argument("--personality", required=True, help="the personality run (folder or step folder)")
    e.add_argument("--base", required=True, help="the base run it started from")
    e.add_argument("-o", "--output", required=True, help="gamma .npz to write")
    e.add_argument("--layout", choices=("ours", "reference"), default="ours",
                   help="file layout: ours (float32, metadata) or the reference's COO/float16 (default ours)")
    e.set_defaults(fn=_cmd_extract)

    i = sub.add_parser("inject", help="θ = θ_base + α·gamma → a new run",
                       description="θ = θ_base + α·gamma, written as a params-only run (usable by export, "
                                   "generate, train --init-from).\n\n--cross-depth: base layer i takes gamma layer "
                                   "floor(i·(L_g−1)/(L_b−1) + 1/2).",
                       epilog="examples:\n  python -m nanollama_jax.gamma inject --base runs/base --gamma pirate.npz "
                              "-o runs/pirate2\n  python -m nanollama_jax.gamma inject --base runs/deeper --gamma "
                              "pirate.npz --cross-depth --alpha 0.5 -o runs/deeper-pirate")
    i.add_argument("--base", required=True, help="the base run")
    i.add_argument("--gamma", required=True, help="gamma .npz (ours or the reference's layout)")
    i.add_argument("--alpha", type=float, default=1.0, help="strength (default 1)")
    i.add_argument("--cross-depth", action="store_true", help="map gamma layers onto a base of another depth")
    i.add_argument("-o", "--output", required=True, help="run folder to create")
    i.set_defaults(fn=_cmd_inject)

    c = sub.add_parser("compose", help="Σ wᵢ·gammaᵢ",
                       description="Linear composition of gammas of the same model.",
                       epilog="example:\n  python -m nanollama_jax.gamma compose pirate.npz poet.npz --weights 1 0.5 "
                              "-o mix.npz")
    c.add_argument("gammas", nargs="+", help="gamma files")
    c.add_argument("--weights", type=float, nargs="+", help="one weight per gamma (default all 1)")
    c.add_argument("-o", "--output", required=True)
    c.add_argument("--layout", choices=("ours", "reference"), default="ours")
    c.set_defaults(fn=_cmd_compose)

    k = sub.add_parser("compress", help="low-rank and/or sparse gamma, with a fidelity report",
                       description="With no setting: 20% of the dense size (--budget), shared out automatically "
                                   "over the tensors (weighted by the loss when --base and --data are given). "
                                   "--rank R: truncated SVD of every layer matrix and the output head; --density D: "
                                   "top-|value| fraction of each tensor (the token embedding takes D when given, else "
                                   "R); norms stay dense. With --base --data [--personality]: the share of the "
                                   "personality loss gap kept on the personality validation text.",
                       epilog="examples:\n  python -m nanollama_jax.gamma compress pirate.npz -o pirate-small.npz "
                              "--base runs/base --personality runs/pirate --data data/pirate\n"
                              "  python -m nanollama_jax.gamma compress pirate.npz --rank 8 -o pirate-r8.npz\n"
                              "  python -m nanollama_jax.gamma compress pirate.npz --energy 0.75 --head density:0.25 "
                              "--embedding density:0.01 \\\n      --dtype float16 -o pirate-small.npz --base runs/base "
                              "--personality runs/pirate --data data/pirate")
    k.add_argument("gamma")
    k.add_argument("--rank", type=int, help="truncated-SVD rank of the layer matrices and head")
    k.add_argument("--energy", type=float,
                   help="per-matrix rank: the smallest keeping this fraction of ‖γ‖² (with --rank: at most R)")
    k.add_argument("--density", type=float, help="fraction of entries kept, by |value| (0 <= D <= 1)")
    for grp in GROUPS:
        k.add_argument(f"--{grp}", metavar="SPEC",
                       help=f"override for the {grp} group: rank:R, energy:E, density:D (comma-separated) or dense")
    k.add_argument("--budget", type=float,
                   help=f"size as a fraction of the dense float32 size, shared out automatically over the tensors "
                        f"(the default when no other setting is given: {DEFAULT_BUDGET:g})")
    k.add_argument("--dtype", choices=("float32", "float16"),
                   help="storage of factors and kept values (default float16 with --budget, else float32; "
                        "norms stay float32)")
    k.add_argument("-o", "--output", required=True)
    k.add_argument("--base", help="fidelity report: the base run")
    k.add_argument("--personality", help="fidelity report: the personality run (default base + dense gamma)")
    k.add_argument("--data", help="fidelity report: personality data folder with a val split")
    k.add_argument("--seq-len", type=int, help="evaluation context (default min(model context, 256))")
    k.add_argument("--batch-size", type=int, default=8)
    k.add_argument("--batches", type=int, default=8, help="validation batches (default 8)")
    k.set_defaults(fn=_cmd_compress)

    s = sub.add_parser("stats", help="norms per tensor/layer; cosine with a reference delta; table + PNG",
                       description="Per-tensor and per-layer norms of a gamma; with --base, relative to the base "
                                   "weights; with --base and --reference, the cosine between gamma and the reference "
                                   "delta θ_reference − θ_base (e.g. a second base seed or another base checkpoint).",
                       epilog="example:\n  python -m nanollama_jax.gamma stats pirate.npz --base runs/base "
                              "--reference runs/base-seed1 --plot pirate-stats.png")
    s.add_argument("gamma")
    s.add_argument("--base", help="base run")
    s.add_argument("--reference", help="another run: reference delta = θ_reference − θ_base")
    s.add_argument("--plot", help="PNG to write (default <gamma>.stats.png)")
    s.add_argument("--json", help="also write the numbers as JSON")
    s.set_defaults(fn=_cmd_stats)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    run_cli(f"{PROG} {args.cmd}", lambda: args.fn(args))
