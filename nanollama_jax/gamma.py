"""Personality as a weight delta (gamma): extract, inject, compose, compress, inspect.

    python -m nanollama_jax.gamma extract --personality runs/pirate --base runs/base -o pirate.npz
    python -m nanollama_jax.gamma inject --base runs/base --gamma pirate.npz --alpha 0.8 -o runs/base+pirate
    python -m nanollama_jax.gamma compose pirate.npz poet.npz --weights 1 0.5 -o mix.npz
    python -m nanollama_jax.gamma compress pirate.npz --rank 8 -o pirate-r8.npz \\
        --base runs/base --personality runs/pirate --data data/pirate      # + fidelity report
    python -m nanollama_jax.gamma stats pirate.npz --base runs/base --reference runs/base-seed1

gamma = θ_personality − θ_base over the whole param pytree; inject gives θ = θ_base + α·gamma.
A gamma is held as a flat state dict in nanollama's names and torch's [out, in] orientation
(`nanollama_jax.statedict`), so it is the same object in every file format:

* our `.npz` (written by this module): key `__gamma__` holds JSON metadata (format, kind
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

compress: three groups — layers (the 2-D matrices inside the layers), head (output), embedding.
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
loss_personality) on the personality validation text.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import LlamaConfig
from .statedict import state_dict_shapes

FORMAT = "nanollama-jax-gamma"
VERSION = 1
META_KEY = "__gamma__"
REF_META = ("_metadata.layer_names", "_metadata.total_norm")
# Config fields that decide the parameter shapes and what they compute; the rest (sequence_len,
# dtype, remat) may differ between a base and a personality run.
ARCH_FIELDS = ("n_layer", "n_embd", "n_head", "n_kv_head", "vocab_size", "head_dim", "norm_eps", "rope_theta",
               "ffn_hidden", "use_qk_norm", "softcap")


# ---------------------------------------------------------------- tensors of a gamma

class Dense:
    kind = "dense"

    def __init__(self, a):
        self.a = np.asarray(a, dtype=np.float32)
        self.shape = tuple(self.a.shape)

    def dense(self) -> np.ndarray:
        return self.a

    def arrays(self, key):
        return {key: self.a}


class LowRank:
    """K = b @ a, b [out, r], a [r, in]."""
    kind = "lowrank"

    def __init__(self, b, a, dtype=None):
        dtype = np.dtype(dtype or (np.float16 if np.asarray(b).dtype == np.float16 else np.float32))
        self.b = np.asarray(b, dtype=dtype)
        self.a = np.asarray(a, dtype=dtype)
        self.shape = (self.b.shape[0], self.a.shape[1])
        self.rank = self.b.shape[1]

    def dense(self) -> np.ndarray:
        return self.b.astype(np.float32) @ self.a.astype(np.float32)

    def arrays(self, key):
        return {f"{key}.lora_b": self.b, f"{key}.lora_a": self.a}


class Sparse:
    """Flat positions and their values; everything else zero."""
    kind = "sparse"

    def __init__(self, shape, index, value, dtype=None):
        self.shape = tuple(int(s) for s in shape)
        size = int(np.prod(self.shape))
        # positions in the smallest unsigned type that addresses the whole tensor
        self.index = np.asarray(index, dtype=np.uint16 if size <= 2**16 else np.uint32 if size <= 2**32 else np.uint64)
        dtype = np.dtype(dtype or (np.float16 if np.asarray(value).dtype == np.float16 else np.float32))
        self.value = np.asarray(value, dtype=dtype)

    def dense(self) -> np.ndarray:
        out = np.zeros(int(np.prod(self.shape)), np.float32)
        out[self.index] = self.value.astype(np.float32)
        return out.reshape(self.shape)

    def arrays(self, key):
        return {f"{key}.sparse_index": self.index, f"{key}.sparse_value": self.value}


def _nbytes(entry) -> int:
    return sum(a.nbytes for a in entry.arrays("k").values())


@dataclass
class Gamma:
    tensors: dict  # nanollama name -> Dense | LowRank | Sparse, in state-dict order
    config: LlamaConfig | None = None
    tokenizer_sha256: str | None = None
    base_fingerprint: str | None = None
    rank: int | None = None
    density: float | None = None
    info: dict = field(default_factory=dict)  # provenance, fidelity report, …
    source: str = "gamma"
    layout: str = "ours"  # where it was read from: ours | reference

    @property
    def kind(self) -> str:
        kinds = {e.kind for e in self.tensors.values() if len(e.shape) > 1} or {"dense"}
        return kinds.pop() if len(kinds) == 1 else "mixed"

    def shapes(self) -> dict:
        return {k: e.shape for k, e in self.tensors.items()}

    def dense(self, name) -> np.ndarray:
        return self.tensors[name].dense()

    def dense_state(self) -> dict:
        return {k: e.dense() for k, e in self.tensors.items()}

    def nbytes(self) -> int:
        return sum(_nbytes(e) for e in self.tensors.values())

    def dense_nbytes(self) -> int:
        return sum(4 * int(np.prod(e.shape)) for e in self.tensors.values())


# ---------------------------------------------------------------- runs and fingerprints

def load_state(run_path) -> tuple:
    """(Run, {nanollama name: float32 [out, in]}) of a run's latest (or given step's) params."""
    from .checkpoint import load_params
    from .statedict import to_state_dict

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


def run_side(label, run, state=None) -> Side:
    if state is not None:
        shapes = {k: tuple(v.shape) for k, v in state.items()}
    else:
        shapes = state_dict_shapes(run.config)
    return Side(label, run.config, run.info.get("tokenizer_sha256"), shapes)


def gamma_side(label, g: Gamma) -> Side:
    return Side(label, g.config, g.tokenizer_sha256, g.shapes())


def _short(items, n=6):
    items = list(items)
    return ", ".join(items[:n]) + (f" … ({len(items)} in all)" if len(items) > n else "")


def _layer_of(name):
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
                    i, rest = _layer_of(k)
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


# ---------------------------------------------------------------- file formats

def _meta_of(g: Gamma) -> dict:
    return {"format": FORMAT, "version": VERSION, "kind": g.kind, "rank": g.rank, "density": g.density,
            "config": g.config.to_dict() if g.config else None, "tokenizer_sha256": g.tokenizer_sha256,
            "base_fingerprint": g.base_fingerprint, "tensors": list(g.tensors),
            "shapes": {k: list(e.shape) for k, e in g.tensors.items()},
            "encodings": {k: e.kind for k, e in g.tensors.items()}, "info": g.info}


def save_gamma(g: Gamma, path, layout: str = "ours") -> int:
    """Write atomically; returns the file size in bytes."""
    from nanollama_base.files import atomic_path

    if layout == "ours":
        arrays = {META_KEY: np.array(json.dumps(_meta_of(g)))}
        for k, e in g.tensors.items():
            arrays.update(e.arrays(k))
    elif layout == "reference":
        arrays = reference_arrays(g)
    else:
        raise ValueError(f"unknown layout {layout!r} (ours | reference)")
    path = Path(path)
    with atomic_path(path) as tmp:
        write_npz(tmp, arrays)
    return path.stat().st_size


def write_npz(path, arrays: dict) -> None:
    """An .npz numpy reads as usual: tensors stored as they are, the metadata (JSON text) deflated."""
    import io
    import zipfile

    with zipfile.ZipFile(path, "w", allowZip64=True) as zf:
        for k, a in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(a), allow_pickle=False)
            method = zipfile.ZIP_DEFLATED if k == META_KEY else zipfile.ZIP_STORED
            zf.writestr(zipfile.ZipInfo(k + ".npy", date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue(),
                        compress_type=method)


def reference_arrays(g: Gamma) -> dict:
    """The reference's layout: COO per key (int32 indices per dim, float16 values, int64 shape)."""
    arrays, total = {}, 0.0
    for k, e in g.tensors.items():
        d = e.dense()
        nz = np.nonzero(d)
        for i, ix in enumerate(nz):
            arrays[f"{k}.indices_{i}"] = ix.astype(np.int32)
        arrays[f"{k}.values"] = d[nz].astype(np.float16)
        arrays[f"{k}.shape"] = np.asarray(d.shape, dtype=np.int64)
        total += float(np.sum(np.square(d, dtype=np.float64)))
    arrays["_metadata.layer_names"] = np.array(list(g.tensors))
    arrays["_metadata.total_norm"] = np.asarray(np.sqrt(total), dtype=np.float32)
    return arrays


def detect_layout(keys) -> str:
    keys = set(keys)
    if META_KEY in keys:
        return "ours"
    if any(k.endswith(".values") for k in keys) or any(k in keys for k in REF_META):
        return "reference"
    return "state"  # a plain dense {name: array} npz


def _strip(name: str) -> str:
    return name[len("_orig_mod."):] if name.startswith("_orig_mod.") else name


def load_gamma(path) -> Gamma:
    """Any gamma file: ours, the reference's layout (detected from its keys), or a plain dense npz."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such gamma file")
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:
        raise ValueError(f"{path}: not a readable .npz file ({e})") from None
    with z:
        keys = list(z.files)
        layout = detect_layout(keys)
        try:
            if layout == "ours":
                return _load_ours(z, path)
            if layout == "reference":
                return _load_reference(z, keys, path)
            return Gamma({_strip(k): Dense(z[k]) for k in keys}, source=str(path), layout="state")
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: malformed gamma file ({e})") from None


def _load_ours(z, path) -> Gamma:
    meta = json.loads(str(z[META_KEY]))
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown gamma format {meta.get('format')!r}")
    if meta.get("version", 0) > VERSION:
        raise ValueError(f"{path}: gamma format version {meta['version']} is newer than this reader ({VERSION})")
    tensors = {}
    for k in meta["tensors"]:
        enc, shape = meta["encodings"][k], tuple(meta["shapes"][k])
        if enc == "dense":
            e = Dense(z[k])
        elif enc == "lowrank":
            e = LowRank(z[f"{k}.lora_b"], z[f"{k}.lora_a"])
        elif enc == "sparse":
            e = Sparse(shape, z[f"{k}.sparse_index"], z[f"{k}.sparse_value"])
        else:
            raise ValueError(f"{path}: tensor {k} has unknown encoding {enc!r}")
        if e.shape != shape:
            raise ValueError(f"{path}: tensor {k} has shape {list(e.shape)}, its metadata says {list(shape)}")
        tensors[k] = e
    config = LlamaConfig.from_dict(meta["config"]) if meta.get("config") else None
    return Gamma(tensors, config, meta.get("tokenizer_sha256"), meta.get("base_fingerprint"), meta.get("rank"),
                 meta.get("density"), meta.get("info") or {}, str(path), "ours")


def _load_reference(z, keys, path) -> Gamma:
    names = [k[: -len(".values")] for k in keys if k.endswith(".values")]
    order = None
    if "_metadata.layer_names" in keys:
        try:
            order = [str(x) for x in np.asarray(z["_metadata.layer_names"]).ravel()]
        except ValueError:  # an object array (pickled): not loaded, for safety; key order is used instead
            order = None
    if order and set(order) == set(names):
        names = order
    tensors = {}
    for k in names:
        shape = tuple(int(s) for s in np.asarray(z[f"{k}.shape"]).ravel())
        value = np.asarray(z[f"{k}.values"]).astype(np.float32).ravel()
        idx = [np.asarray(z[f"{k}.indices_{i}"]).astype(np.int64).ravel() for i in range(len(shape))]
        if any(len(ix) != len(value) for ix in idx):
            raise ValueError(f"{path}: tensor {k}: index and value counts differ")
        dense = np.zeros(shape, np.float32)
        if len(value):
            if any((ix < 0).any() or (ix >= n).any() for ix, n in zip(idx, shape)):
                raise ValueError(f"{path}: tensor {k}: an index is outside its shape {list(shape)}")
            dense[tuple(idx)] = value
        tensors[_strip(k)] = Dense(dense)
    if not tensors:
        raise ValueError(f"{path}: no tensors in the reference layout (no *.values keys)")
    return Gamma(tensors, source=str(path), layout="reference")


# ---------------------------------------------------------------- operations

def extract(personality_run, base_run) -> Gamma:
    from .checkpoint import open_run

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
    """For each base layer i, the gamma layer it takes: floor(i·(L_g−1)/(L_b−1) + 1/2)."""
    if n_base == 1:
        return [0]
    return [int(np.floor(i * (n_gamma - 1) / (n_base - 1) + 0.5)) for i in range(n_base)]


def _n_layers(names) -> int:
    idx = [_layer_of(k)[0] for k in names]
    return max((i for i in idx if i is not None), default=-1) + 1


def apply_gamma(base_state: dict, g: Gamma, alpha: float = 1.0, cross_depth: bool = False) -> dict:
    """θ_base + α·gamma as a new state dict (names and shapes assumed checked)."""
    n_base, n_gamma = _n_layers(base_state), _n_layers(g.tensors)
    mapping = cross_depth_map(n_base, n_gamma) if cross_depth else list(range(n_base))
    out = {}
    for k, a in base_state.items():
        i, rest = _layer_of(k)
        src = k if i is None else f"layers.{mapping[i]}.{rest}"
        out[k] = np.asarray(a, np.float32) + np.float32(alpha) * g.dense(src)
    return out


def inject_into(base_run, g: Gamma, alpha: float = 1.0, cross_depth: bool = False):
    """(Run, params, notes): θ_base + α·gamma, after every check."""
    from .checkpoint import open_run
    from .statedict import from_state_dict

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
    flat = np.asarray(a, np.float32).ravel()
    n = int(round(density * flat.size))
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


# ---------------------------------------------------------------- evaluation

def personality_loss_fn(config: LlamaConfig, data_dir, seq_len: int, batch_size: int, batches: int):
    """A function params -> mean loss on the val split of `data_dir` (fixed batches)."""
    import jax

    from .input import validation_batches
    from .model import cross_entropy, forward

    vb = validation_batches(data_dir, seq_len=seq_len, batch_size=batch_size, max_batches=batches)

    @jax.jit
    def loss(params, tokens):
        return cross_entropy(forward(params, tokens[:, :-1], config), tokens[:, 1:])

    def fn(params):
        return float(np.mean([float(loss(params, b)) for b in vb]))

    return fn


def fidelity(base_state: dict, pers_state: dict, compressed: Gamma, config: LlamaConfig, loss_fn) -> dict:
    from .statedict import from_state_dict

    lb = loss_fn(from_state_dict(base_state, config))
    lp = loss_fn(from_state_dict(pers_state, config))
    lc = loss_fn(from_state_dict(apply_gamma(base_state, compressed), config))
    gap = lb - lp
    return {"loss_base": lb, "loss_personality": lp, "loss_compressed": lc,
            "share_kept": (lb - lc) / gap if gap else float("nan")}


# ---------------------------------------------------------------- stats

def _cos(a, b) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(np.dot(a.ravel(), b.ravel()) / (na * nb)) if na and nb else float("nan")


def stats(g: Gamma, base_state: dict | None = None, ref_delta: dict | None = None) -> dict:
    rows = []
    for k, e in g.tensors.items():
        d = e.dense().astype(np.float64)
        row = {"tensor": k, "shape": list(e.shape), "norm": float(np.linalg.norm(d)), "encoding": e.kind}
        if base_state is not None:
            row["base_norm"] = float(np.linalg.norm(base_state[k]))
            row["relative"] = row["norm"] / row["base_norm"] if row["base_norm"] else float("nan")
        if ref_delta is not None:
            r = ref_delta[k].astype(np.float64)
            row["ref_norm"] = float(np.linalg.norm(r))
            row["cosine"] = _cos(d, r)
        rows.append(row)
    layers = {}
    for row in rows:
        i, _ = _layer_of(row["tensor"])
        key = "top" if i is None else i
        agg = layers.setdefault(key, {"layer": key, "sq": 0.0, "ref_sq": 0.0, "dot": 0.0})
        agg["sq"] += row["norm"] ** 2
    if ref_delta is not None:
        for k, e in g.tensors.items():
            i, _ = _layer_of(k)
            agg = layers["top" if i is None else i]
            d, r = e.dense().astype(np.float64).ravel(), ref_delta[k].astype(np.float64).ravel()
            agg["ref_sq"] += float(r @ r)
            agg["dot"] += float(d @ r)
    per_layer = []
    for agg in layers.values():
        out = {"layer": agg["layer"], "norm": agg["sq"] ** 0.5}
        if ref_delta is not None:
            out["ref_norm"] = agg["ref_sq"] ** 0.5
            den = out["norm"] * out["ref_norm"]
            out["cosine"] = agg["dot"] / den if den else float("nan")
        per_layer.append(out)
    total = sum(r["norm"] ** 2 for r in rows) ** 0.5
    result = {"tensors": rows, "layers": per_layer, "total_norm": total}
    if ref_delta is not None:
        dot = sum(a["dot"] for a in layers.values())
        rn = sum(a["ref_sq"] for a in layers.values()) ** 0.5
        result["ref_total_norm"] = rn
        result["cosine"] = dot / (total * rn) if total and rn else float("nan")
    return result


def format_stats(s: dict) -> str:
    has_base = "base_norm" in s["tensors"][0]
    has_ref = "cosine" in s["tensors"][0]
    head = f"{'tensor':<34} {'shape':>13} {'‖γ‖':>10}"
    head += f" {'‖θ_base‖':>10} {'‖γ‖/‖θ‖':>9}" if has_base else ""
    head += f" {'‖ref‖':>10} {'cos(γ,ref)':>10}" if has_ref else ""
    lines = [head, "-" * len(head)]
    for r in s["tensors"]:
        line = f"{r['tensor']:<34} {'x'.join(map(str, r['shape'])):>13} {r['norm']:>10.4g}"
        if has_base:
            line += f" {r['base_norm']:>10.4g} {r['relative']:>9.3g}"
        if has_ref:
            line += f" {r['ref_norm']:>10.4g} {r['cosine']:>10.4f}"
        lines.append(line)
    lines += ["", f"{'layer':<8} {'‖γ‖':>10}" + (f" {'‖ref‖':>10} {'cos(γ,ref)':>10}" if has_ref else "")]
    for r in s["layers"]:
        line = f"{str(r['layer']):<8} {r['norm']:>10.4g}"
        if has_ref:
            line += f" {r['ref_norm']:>10.4g} {r['cosine']:>10.4f}"
        lines.append(line)
    lines.append(f"total ‖γ‖ = {s['total_norm']:.6g}")
    if has_ref:
        lines.append(f"total ‖ref‖ = {s['ref_total_norm']:.6g}; cosine(γ, reference delta) over all tensors = "
                     f"{s['cosine']:.4f}")
    return "\n".join(lines)


def plot_stats(s: dict, output, title: str = "gamma") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nanollama_base.files import atomic_path

    has_ref = "cosine" in s["layers"][0]
    fig, axes = plt.subplots(1, 3 if has_ref else 2, figsize=(15 if has_ref else 10, 4))
    layers = [r for r in s["layers"]]
    labels = [str(r["layer"]) for r in layers]
    x = np.arange(len(layers))
    ax = axes[0]
    ax.bar(x - 0.2 if has_ref else x, [r["norm"] for r in layers], 0.4 if has_ref else 0.8, label="‖γ‖")
    if has_ref:
        ax.bar(x + 0.2, [r["ref_norm"] for r in layers], 0.4, label="‖reference delta‖")
    ax.set_xticks(x, labels)
    if has_ref:
        ax.set_yscale("log")  # a reference delta (another seed) can be orders of magnitude larger
    ax.set_xlabel("layer ('top': embedding, final norm, head)")
    ax.set_title("norm per layer")
    ax.legend()
    ax = axes[1]
    rows = s["tensors"]
    ax.barh(np.arange(len(rows)), [r["norm"] for r in rows])
    ax.set_yticks(np.arange(len(rows)), [r["tensor"] for r in rows], fontsize=6)
    ax.invert_yaxis()
    ax.set_title("‖γ‖ per tensor")
    if has_ref:
        ax = axes[2]
        ax.barh(np.arange(len(rows)), [r["cosine"] for r in rows])
        ax.set_yticks(np.arange(len(rows)), [r["tensor"] for r in rows], fontsize=6)
        ax.invert_yaxis()
        ax.axvline(0, color="k", lw=0.5)
        ax.set_title(f"cos(γ, reference delta); all tensors {s['cosine']:.3f}")
    fig.suptitle(title)
    fig.tight_layout()
    output = Path(output)
    with atomic_path(output) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return output


# ---------------------------------------------------------------- CLI

def _write_run(out, run, params, **sections):
    from .checkpoint import write_params_run
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
        print(f"layers: base ← gamma {cross_depth_map(run.config.n_layer, _n_layers(g.tensors))}")
    print(f"wrote {a.output} (base {a.base} + {a.alpha:g}·{a.gamma})")


def _cmd_compose(a):
    weights = a.weights if a.weights is not None else [1.0] * len(a.gammas)
    g = compose([load_gamma(p) for p in a.gammas], weights)
    size = save_gamma(g, a.output, a.layout)
    print(f"wrote {a.output} ({' + '.join(f'{w:g}·{p}' for w, p in zip(weights, a.gammas))}, {_fmt_bytes(size)})")


def _cmd_compress(a):
    g = load_gamma(a.gamma)
    # check everything the fidelity report needs before any work
    report_wanted = a.base is not None or a.data is not None or a.personality is not None
    if report_wanted and (a.base is None or a.data is None):
        raise ValueError("the fidelity report needs --base and --data (and --personality unless the gamma is dense)")
    if report_wanted and a.personality is None and g.kind != "dense":
        raise ValueError(f"{a.gamma} is already compressed: give --personality to measure the personality effect")
    if report_wanted:
        from .checkpoint import open_run

        rb = open_run(a.base)
        sides = [run_side(f"base {a.base}", rb), gamma_side(f"gamma {a.gamma}", g)]
        if a.personality:
            sides.append(run_side(f"personality {a.personality}", open_run(a.personality)))
        for n in check_compatible(sides, what="measure fidelity"):
            print(f"note: {n}", file=sys.stderr)
    specs = {grp: parse_spec(getattr(a, grp), f"--{grp}") for grp in GROUPS if getattr(a, grp)}
    c = compress(g, a.rank, a.density, a.energy, a.dtype, specs)
    dense_bytes, size = c.dense_nbytes(), c.nbytes()
    plan = c.info["compressed_from"]["plan"]
    print(f"compressed {a.gamma} ({a.dtype}): " + "; ".join(
        f"{grp} {', '.join(f'{k} {v}' for k, v in plan[grp].items()) or 'dense'}" for grp in GROUPS))
    if c.info["ranks"]:
        print("ranks: " + ", ".join(f"{k} {r}" for k, r in c.info["ranks"].items()))
    print(f"size: {_fmt_bytes(size)} of tensor data vs {_fmt_bytes(dense_bytes)} dense float32 "
          f"({100 * size / dense_bytes:.1f}%)")
    c.info["size"] = {"bytes": size, "dense_bytes": dense_bytes, "ratio": size / dense_bytes}
    if report_wanted:
        rb, base = load_state(a.base)
        pers = load_state(a.personality)[1] if a.personality else apply_gamma(base, g)
        seq = a.seq_len or min(rb.config.sequence_len, 256)
        loss_fn = personality_loss_fn(rb.config, a.data, seq, a.batch_size, a.batches)
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
        from .checkpoint import open_run

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


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    p = _Parser(prog="python -m nanollama_jax.gamma", description=__doc__, formatter_class=raw)
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    e = sub.add_parser("extract", help="gamma = θ_personality − θ_base", formatter_class=raw,
                       description="gamma = θ_personality − θ_base over the whole param pytree.",
                       epilog="example:\n  python -m nanollama_jax.gamma extract --personality runs/pirate "
                              "--base runs/base -o pirate.npz")
    e.add_argument("--personality", required=True, help="the personality run (folder or step folder)")
    e.add_argument("--base", required=True, help="the base run it started from")
    e.add_argument("-o", "--output", required=True, help="gamma .npz to write")
    e.add_argument("--layout", choices=("ours", "reference"), default="ours",
                   help="file layout: ours (float32, metadata) or the reference's COO/float16 (default ours)")
    e.set_defaults(fn=_cmd_extract)

    i = sub.add_parser("inject", help="θ = θ_base + α·gamma → a new run", formatter_class=raw,
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

    c = sub.add_parser("compose", help="Σ wᵢ·gammaᵢ", formatter_class=raw,
                       description="Linear composition of gammas of the same model.",
                       epilog="example:\n  python -m nanollama_jax.gamma compose pirate.npz poet.npz --weights 1 0.5 "
                              "-o mix.npz")
    c.add_argument("gammas", nargs="+", help="gamma files")
    c.add_argument("--weights", type=float, nargs="+", help="one weight per gamma (default all 1)")
    c.add_argument("-o", "--output", required=True)
    c.add_argument("--layout", choices=("ours", "reference"), default="ours")
    c.set_defaults(fn=_cmd_compose)

    k = sub.add_parser("compress", help="low-rank and/or sparse gamma, with a fidelity report", formatter_class=raw,
                       description="--rank R: truncated SVD of every layer matrix and the output head; --density D: "
                                   "top-|value| fraction of each tensor (the token embedding takes D when given, else "
                                   "R); norms stay dense. With --base --data [--personality]: the share of the "
                                   "personality loss gap kept on the personality validation text.",
                       epilog="examples:\n  python -m nanollama_jax.gamma compress pirate.npz --rank 8 -o pirate-r8.npz\n"
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
    k.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="storage of factors and kept values (default float32; norms stay float32)")
    k.add_argument("-o", "--output", required=True)
    k.add_argument("--base", help="fidelity report: the base run")
    k.add_argument("--personality", help="fidelity report: the personality run (default base + dense gamma)")
    k.add_argument("--data", help="fidelity report: personality data folder with a val split")
    k.add_argument("--seq-len", type=int, help="evaluation context (default min(model context, 256))")
    k.add_argument("--batch-size", type=int, default=8)
    k.add_argument("--batches", type=int, default=8, help="validation batches (default 8)")
    k.set_defaults(fn=_cmd_compress)

    s = sub.add_parser("stats", help="norms per tensor/layer; cosine with a reference delta; table + PNG",
                       formatter_class=raw,
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
    from nanollama_base.cli import run_cli

    args = build_parser().parse_args(argv)
    run_cli(lambda: args.fn(args))


if __name__ == "__main__":
    main()
