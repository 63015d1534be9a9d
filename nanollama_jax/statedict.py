"""Our param pytree ⇄ a flat state dict in nanollama's names and torch's [out, in] layout.

Every interchange format (nanollama `.pt`, gamma `.npz`, Hugging Face safetensors) starts from this
one mapping, so the layer unstacking and the kernel transposes live in one place.
"""
from __future__ import annotations

import numpy as np

from .config import LlamaConfig
from .model import Params

# (our path inside params["layers"], nanollama name inside "layers.{i}.", is a matrix to transpose)
LAYER_TENSORS = (
    (("attn_norm", "scale"), "attn_norm.weight", False),
    (("attn", "c_q", "kernel"), "attn.c_q.weight", True),
    (("attn", "c_k", "kernel"), "attn.c_k.weight", True),
    (("attn", "c_v", "kernel"), "attn.c_v.weight", True),
    (("attn", "c_proj", "kernel"), "attn.c_proj.weight", True),
    (("ffn_norm", "scale"), "ffn_norm.weight", False),
    (("ffn", "gate_proj", "kernel"), "ffn.gate_proj.weight", True),
    (("ffn", "up_proj", "kernel"), "ffn.up_proj.weight", True),
    (("ffn", "down_proj", "kernel"), "ffn.down_proj.weight", True),
)
TOP_TENSORS = (
    (("tok_embeddings", "embedding"), "tok_embeddings.weight", False),
    (("norm", "scale"), "norm.weight", False),
    (("output", "kernel"), "output.weight", True),
)


def get_path(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def state_dict_names(config: LlamaConfig) -> list[str]:
    names = [name for _, name, _ in TOP_TENSORS[:1]]
    for i in range(config.n_layer):
        names += [f"layers.{i}.{name}" for _, name, _ in LAYER_TENSORS]
    return names + [name for _, name, _ in TOP_TENSORS[1:]]


def state_dict_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """{nanollama name: [out, in] shape} of a config, in state-dict order (nothing allocated)."""
    from .model import param_shapes

    tree = param_shapes(config)

    def oriented(shape, transpose):
        return tuple(shape[::-1]) if transpose else tuple(shape)

    path, name, t = TOP_TENSORS[0]
    out = {name: oriented(get_path(tree, path).shape, t)}
    for i in range(config.n_layer):
        for path, name, t in LAYER_TENSORS:
            out[f"layers.{i}.{name}"] = oriented(get_path(tree["layers"], path).shape[1:], t)
    for path, name, t in TOP_TENSORS[1:]:
        out[name] = oriented(get_path(tree, path).shape, t)
    return out


def to_state_dict(params: Params) -> dict[str, np.ndarray]:
    """Flat {nanollama name: array [out, in]} from our params (host copies, one tensor at a time)."""
    out = {}
    for path, name, transpose in TOP_TENSORS:
        a = np.asarray(get_path(params, path))
        out[name] = a.T if transpose else a
    layers = params["layers"]
    n_layer = get_path(layers, LAYER_TENSORS[0][0]).shape[0]
    for i in range(n_layer):
        for path, name, transpose in LAYER_TENSORS:
            a = np.asarray(get_path(layers, path)[i])
            out[f"layers.{i}.{name}"] = a.T if transpose else a
    return out


def from_state_dict(state: dict[str, np.ndarray], config: LlamaConfig, source: str = "state dict") -> Params:
    """Our params from a flat nanollama-named state dict; checks every name and shape."""
    from .model import param_shapes

    expected = param_shapes(config)
    params: Params = {}

    def take(name, transpose, want):
        if name not in state:
            raise ValueError(f"{source}: missing tensor {name}")
        a = np.asarray(state[name], dtype=np.float32)
        a = a.T if transpose else a
        if a.shape != tuple(want):
            raise ValueError(f"{source}: tensor {name} has shape {list(a.T.shape if transpose else a.shape)}, "
                             f"expected {list(want[::-1] if transpose else want)}")
        return a

    for path, name, transpose in TOP_TENSORS:
        set_path(params, path, take(name, transpose, get_path(expected, path).shape))
    for path, name, transpose in LAYER_TENSORS:
        want = get_path(expected["layers"], path).shape[1:]
        set_path(params, ("layers",) + path,
             np.stack([take(f"layers.{i}.{name}", transpose, want) for i in range(config.n_layer)]))
    extra = set(state) - set(state_dict_names(config))
    if extra:
        raise ValueError(f"{source}: unexpected tensors {', '.join(sorted(extra)[:5])}"
                         + (" …" if len(extra) > 5 else ""))
    return params
