"""Runs as state dicts, fingerprints, and the compatibility check made before any arithmetic:
model config, tokenizer sha256, tensor names and shapes."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from ..config import LlamaConfig
from ..statedict import state_dict_shapes
from .encodings import Gamma

# Config fields that decide the parameter shapes and what they compute; the rest (sequence_len,
# dtype, remat) may differ between a base and a personality run.
ARCH_FIELDS = ("n_layer", "n_embd", "n_head", "n_kv_head", "vocab_size", "head_dim", "norm_eps", "rope_theta",
               "ffn_hidden", "use_qk_norm", "softcap")


def load_state(run_path) -> tuple:
    """(Run, {nanollama name: float32 [out, in]}) of a run's latest (or given step's) params."""
    from ..checkpoint import load_params
    from ..statedict import to_state_dict

    run, params = load_params(run_path)
    return run, to_state_dict(params)


def fingerprint(state: dict) -> str:
    """sha256 over names, shapes and float32 bytes of a state dict, in its order."""
    h = hashlib.sha256()
    for k, a in state.items():
        a = np.ascontiguousarray(a, dtype=np.float32)
        h.update(f"{k}:{list(a.shape)};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _arch(config: LlamaConfig) -> dict:
    return {f: getattr(config, f) for f in ARCH_FIELDS}


@dataclass
class Side:
    """What a compatibility check needs to know of one input."""
    label: str
    config: LlamaConfig | None
    tokenizer_sha256: str | None
    shapes: dict  # name -> shape


def run_side(label, run) -> Side:
    return Side(label, run.config, run.info.get("tokenizer_sha256"), state_dict_shapes(run.config))


def gamma_side(label, g: Gamma) -> Side:
    return Side(label, g.config, g.tokenizer_sha256, g.shapes())


def _short(items, n=6):
    items = list(items)
    return ", ".join(items[:n]) + (f" … ({len(items)} in all)" if len(items) > n else "")


def layer_of(name):
    parts = name.split(".", 2)
    if parts[0] == "layers" and len(parts) == 3 and parts[1].isdigit():
        return int(parts[1]), parts[2]
    return None, name


def check_compatible(sides: list[Side], *, cross_depth: bool = False, what: str = "combine") -> list[str]:
    """Raise ValueError listing every difference between the first side and each other one
    (config, tokenizer, missing/extra tensors, shapes). With cross_depth the layer count may differ
    and layer tensors are compared by kind. Returns notes (checks that could not be made)."""
    ref = sides[0]
    diffs, notes = [], []
    for other in sides[1:]:
        pair = f"{ref.label} vs {other.label}"
        config_differs = False
        if ref.config is not None and other.config is not None:
            a, b = _arch(ref.config), _arch(other.config)
            bad = [f"{k} {a[k]} vs {b[k]}" for k in ARCH_FIELDS if a[k] != b[k] and not (cross_depth and k == "n_layer")]
            if bad:
                config_differs = True
                diffs.append(f"config differs ({pair}): {', '.join(bad)}"
                             + (" (use --cross-depth to map layers)" if bad == [f"n_layer {a['n_layer']} vs {b['n_layer']}"]
                                and what == "inject" else ""))
        else:
            notes.append(f"{pair}: {'(' + (ref.label if ref.config is None else other.label) + ' carries no config)'} "
                         "config not compared, only tensor names and shapes")
        if ref.tokenizer_sha256 and other.tokenizer_sha256:
            if ref.tokenizer_sha256 != other.tokenizer_sha256:
                diffs.append(f"tokenizer differs ({pair}): sha256 {ref.tokenizer_sha256[:12]}… vs "
                             f"{other.tokenizer_sha256[:12]}…")
        else:
            notes.append(f"{pair}: tokenizer not compared (no tokenizer hash on one side)")
        if cross_depth:
            def kinds(shapes):
                out = {}
                for k, s in shapes.items():
                    i, rest = layer_of(k)
                    out.setdefault(rest if i is not None else k, set()).add(s)
                return out
            ka, kb = kinds(ref.shapes), kinds(other.shapes)
        else:
            ka, kb = ({k: {s} for k, s in ref.shapes.items()}, {k: {s} for k, s in other.shapes.items()})
        missing = [k for k in ka if k not in kb]
        extra = [k for k in kb if k not in ka]
        if missing:
            diffs.append(f"{other.label} is missing {len(missing)} tensor(s) {ref.label} has: {_short(missing)}")
        if extra:
            diffs.append(f"{other.label} has {len(extra)} tensor(s) {ref.label} lacks: {_short(extra)}")
        shape_bad = [f"{k} {sorted(ka[k])[0]} vs {sorted(kb[k])[0]}" for k in ka if k in kb and ka[k] != kb[k]]
        if shape_bad and not config_differs:  # shapes follow from the config: its difference says it
            diffs.append(f"shapes differ ({pair}): {_short(shape_bad)}")
    if diffs:
        raise ValueError(f"cannot {what}: " + "; ".join(diffs))
    return notes
