"""Gamma files: our `.npz` layout (JSON metadata + dense / low-rank / sparse tensors), the reference's
(nanollama) COO float16 layout, and plain dense state-dict `.npz` files; the layout is detected from the keys."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..config import LlamaConfig
from .encodings import Dense, Gamma, LowRank, Sparse

FORMAT = "nanollama-jax-gamma"
VERSION = 1
META_KEY = "__gamma__"
REF_META = ("_metadata.layer_names", "_metadata.total_norm")


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
