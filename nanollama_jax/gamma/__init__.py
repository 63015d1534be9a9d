"""Personality as a weight delta (gamma): extract, inject, compose, compress, inspect.

One module per concern, imported in this order (each only from the ones above it):
encodings (how a tensor is held) → compat (runs, fingerprints, checks) → layouts (.npz files,
ours and the reference's) → ops (extract, inject, compose)
→ budget (a size budget shared over tensors) → compress (SVD / sparse, fidelity)
→ stats (table, plot) → cli (`python -m nanollama_jax.gamma`; the formats are described there).
"""
from .compat import ARCH_FIELDS, Side, check_compatible, fingerprint, gamma_side, load_state, run_side
from .compress import (DEFAULT_BUDGET, GROUPS, compress, compress_to_budget, default_specs, fidelity, group_of,
                       low_rank, parse_spec, personality_loss_fn, sensitivities, top_entries, top_fraction)
from .encodings import Dense, Gamma, LowRank, Sparse
from .layouts import FORMAT, META_KEY, VERSION, detect_layout, load_gamma, reference_arrays, save_gamma, write_npz
from .ops import apply_gamma, compose, cross_depth_map, extract, inject_into
from .stats import format_stats, plot_stats, stats


def main(argv=None):
    """`python -m nanollama_jax.gamma` (imported on call: the library alone needs no argparse)."""
    from .cli import main as cli_main

    cli_main(argv)


__all__ = ["ARCH_FIELDS", "Side", "check_compatible", "fingerprint", "gamma_side", "load_state", "run_side",
           "DEFAULT_BUDGET", "GROUPS", "compress", "compress_to_budget", "sensitivities", "top_entries",
           "default_specs", "fidelity", "group_of", "low_rank", "parse_spec",
           "personality_loss_fn", "top_fraction", "Dense", "Gamma", "LowRank", "Sparse", "FORMAT", "META_KEY",
           "VERSION", "detect_layout", "load_gamma", "reference_arrays", "save_gamma", "write_npz", "apply_gamma",
           "compose", "cross_depth_map", "extract", "inject_into", "format_stats", "plot_stats", "stats", "main"]
