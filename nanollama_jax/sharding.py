"""The device mesh and the one table that maps logical axis names to it.

Mesh axes are ("fsdp", "tensor"): batch, and every parameter's `embed` axis, split along fsdp
(ZeRO-3: params and optimizer state are partitioned, gathered per layer by XLA); heads, mlp and
vocab along tensor. The model never mentions devices; this file is the only place that does.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from .config import LlamaConfig
from .model import Params, init_params, param_logical_axes, param_shapes

MESH_AXES = ("fsdp", "tensor")

# logical axis -> mesh axis (None: replicated). One table for params and activations.
RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "fsdp"),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    ("length", None),
    ("act_embed", None),
)


def parse_mesh(spec: str | None, n_devices: int) -> tuple[int, int]:
    """'FxT' -> (F, T); None -> all devices on fsdp. A single process may use fewer devices than it
    has; several processes must use them all."""
    if spec is None:
        return n_devices, 1
    try:
        fsdp, tensor = (int(s) for s in spec.lower().split("x"))
    except ValueError:
        raise ValueError(f"--mesh takes FSDPxTENSOR, e.g. 4x1 or 2x2; got {spec!r}") from None
    if fsdp < 1 or tensor < 1 or fsdp * tensor > n_devices or (jax.process_count() > 1 and fsdp * tensor != n_devices):
        raise ValueError(f"--mesh {spec} needs {fsdp * tensor} devices but {n_devices} are available")
    return fsdp, tensor


def make_mesh(spec: str | None = None, devices=None) -> Mesh:
    """The ("fsdp", "tensor") mesh through `jax.make_mesh` (which orders devices for the fastest
    links), over the first fsdp·tensor of `devices` (default: all devices). Axes are Auto: XLA
    propagates shardings from the parameters and the logical constraints, as a Mesh did."""
    devices = jax.devices() if devices is None else list(devices)
    shape = parse_mesh(spec, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices[: shape[0] * shape[1]])


def mesh_spec(logical: P, shape: tuple[int, ...], mesh: Mesh, name: str = "array") -> P:
    """Map a logical PartitionSpec to mesh axes. A dimension that its mesh axis does not divide is
    an error naming the parameter: silently replicating it would cost the memory the mesh is for."""
    rules = dict(RULES)
    axes = []
    for dim, logical_name in zip(shape, logical):
        axis = rules.get(logical_name) if logical_name else None
        if axis is not None and dim % mesh.shape[axis]:
            raise ValueError(f"{name}: dimension {logical_name} of size {dim} does not divide over mesh axis "
                             f"{axis} of size {mesh.shape[axis]}; choose a mesh whose {axis} size divides {dim}")
        axes.append(axis)
    return P(*axes)


def param_shardings(config: LlamaConfig, mesh: Mesh, shapes: Params | None = None) -> Params:
    """Each parameter's NamedSharding (`shapes`: the params' abstract shapes, when already known)."""
    shapes = param_shapes(config) if shapes is None else shapes
    logical = param_logical_axes(config)
    return jax.tree_util.tree_map_with_path(
        lambda path, spec, s: NamedSharding(mesh, mesh_spec(spec, s.shape, mesh, param_name(path))),
        logical, shapes, is_leaf=lambda x: isinstance(x, P))


def param_name(path) -> str:
    """'layers/attn/c_q/kernel' from a pytree path."""
    return "/".join(str(getattr(k, "key", k)) for k in path)


def state_shardings(state_shapes, params_shapes: Params, params_shardings: Params, mesh: Mesh):
    """Shardings for optimizer state: a leaf that mirrors a parameter (same path suffix, same shape:
    moments, momentum) is sharded like it; anything else (step counts, scalars) is replicated."""
    by_path = {jax.tree_util.keystr(path): (shape.shape, sh) for (path, shape), sh in zip(
        jax.tree_util.tree_leaves_with_path(params_shapes), jax.tree_util.tree_leaves(params_shardings))}
    replicated = NamedSharding(mesh, P())

    def pick(path, leaf):
        key = jax.tree_util.keystr(path)
        for param_path, (shape, sh) in by_path.items():
            if key.endswith(param_path) and shape == leaf.shape:
                return sh
        return replicated

    return jax.tree_util.tree_map_with_path(pick, state_shapes)


def abstract(shapes, shardings):
    """ShapeDtypeStructs carrying their shardings: what `jit(...).lower` and orbax restore take."""
    return jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def accum_batch_sharding(mesh: Mesh) -> NamedSharding:
    """A step's tokens [accumulation, micro-batch, T + 1]: micro-batch rows split along fsdp."""
    return NamedSharding(mesh, P(None, "fsdp", None))


def shard_like(tree, shardings):
    """Place a pytree of host or device arrays onto the given shardings."""
    return jax.tree_util.tree_map(jax.device_put, tree, shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Token batches [B, T]: rows split along fsdp, replicated along tensor."""
    return NamedSharding(mesh, P("fsdp", None))


def init_sharded(config: LlamaConfig, mesh: Mesh, seed: int = 0, shardings: Params | None = None) -> Params:
    """Parameters born sharded: each device computes only its own shards, nothing is
    materialised whole on one device."""
    shardings = param_shardings(config, mesh) if shardings is None else shardings
    return jax.jit(lambda: init_params(config, seed), out_shardings=shardings)()


def axis_rules():
    """Context for `nn.with_logical_constraint` on activations inside the model."""
    return nn.logical_axis_rules(RULES)


def bytes_per_device(tree) -> int:
    """Largest number of bytes any single device holds for a sharded pytree."""
    per_device: dict = {}
    for leaf in jax.tree_util.tree_leaves(tree):
        for shard in leaf.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values()) if per_device else 0


def describe(mesh: Mesh) -> str:
    kinds = sorted({d.platform for d in mesh.devices.flat})
    return (f"mesh fsdp={mesh.shape['fsdp']} x tensor={mesh.shape['tensor']} over "
            f"{math.prod(mesh.devices.shape)} {'/'.join(kinds)} device(s), {jax.process_count()} process(es)")
