"""LoRA for SFT: low-rank adapters on every layer matrix (q, k, v, o, gate, up, down).

A matrix W [in, out] (our Flax layout, stacked over layers) is used as W + A·B with A [in, r]
(random, scale 1/sqrt(in)) and B [r, out] (zero at the start, so training starts from the base
model exactly). The training state is {"base": the frozen model, "lora": {path: {"a", "b"}}}; only
"lora" gets an optimizer (AdamW), the base gets no gradient (stop_gradient) and no update.

`merge` gives the plain model (W + A·B), `to_gamma` the same delta as a low-rank gamma whose
factors are A and B themselves (so `export.lora` writes them as a llama.cpp adapter at rank r).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from .statedict import LAYER_TENSORS, get_path
from .training_setup import TrainingSetup

LORA_LR = 1e-3  # AdamW peak learning rate of the adapters (times --lr-scale)


def matrix_paths() -> list[tuple[str, ...]]:
    """Paths (inside params["layers"]) of the layer matrices LoRA adapts."""
    return [path for path, _, is_matrix in LAYER_TENSORS if is_matrix]


def _key(path) -> str:
    return "/".join(path)


def lora_shapes(param_shapes, rank: int) -> dict:
    out = {}
    for path in matrix_paths():
        n_layer, d_in, d_out = get_path(param_shapes["layers"], path).shape
        out[_key(path)] = {"a": jax.ShapeDtypeStruct((n_layer, d_in, rank), jnp.float32),
                           "b": jax.ShapeDtypeStruct((n_layer, rank, d_out), jnp.float32)}
    return out


def init_lora(param_shapes, rank: int, seed: int) -> dict:
    key = jax.random.PRNGKey(seed)
    out = {}
    for i, (name, s) in enumerate(lora_shapes(param_shapes, rank).items()):
        d_in = s["a"].shape[1]
        out[name] = {"a": jax.random.normal(jax.random.fold_in(key, i), s["a"].shape) / np.sqrt(d_in),
                     "b": jnp.zeros(s["b"].shape)}
    return out


def merge(base, lora: dict):
    """The model with every adapter added to its matrix (W + A·B), in the base's dtype."""
    layers = dict(base["layers"])

    def add(tree, path, delta):
        if len(path) == 1:
            return {**tree, path[0]: tree[path[0]] + delta.astype(tree[path[0]].dtype)}
        return {**tree, path[0]: add(tree[path[0]], path[1:], delta)}

    for name, ab in lora.items():
        layers = add(layers, tuple(name.split("/")), jnp.einsum("lir,lro->lio", ab["a"], ab["b"]))
    return {**base, "layers": layers}


def to_gamma(lora: dict, config, tokenizer_sha256: str | None = None):
    """The adapters as a low-rank gamma (nanollama names, [out, in]: b = Bᵀ, a = Aᵀ); norms, embedding
    and head unchanged, so they are left out."""
    from .gamma import Gamma, LowRank

    names = {_key(path): name for path, name, _ in LAYER_TENSORS}
    tensors = {}
    for i in range(config.n_layer):
        for key, ab in lora.items():
            a, b = np.asarray(ab["a"][i], np.float32), np.asarray(ab["b"][i], np.float32)
            tensors[f"layers.{i}.{names[key]}"] = LowRank(b.T, a.T)
    rank = next(iter(lora.values()))["a"].shape[-1]
    return Gamma(tensors, config, tokenizer_sha256=tokenizer_sha256, rank=rank, info={"source": "sft --lora"})


def lora_loss(loss_fn):
    """A model loss → the same loss of {"base", "lora"} with the base frozen."""
    def loss(state, batch, config):
        return loss_fn(merge(jax.lax.stop_gradient(state["base"]), state["lora"]), batch, config)

    return loss


class LoraSetup(TrainingSetup):
    """A TrainingSetup whose trained state is {"base", "lora"}: the base sharded like pretraining,
    the (small) adapters replicated; AdamW with warmup and cosine decay on the adapters only."""

    def __init__(self, plan, mesh, rank: int, loss_fn):
        super().__init__(plan, mesh, lora_loss(loss_fn))
        self.rank = rank
        replicated = NamedSharding(mesh, P())
        shapes = lora_shapes(self.param_shapes, rank)
        self.param_shapes = {"base": self.param_shapes, "lora": shapes}
        self.param_shardings = {"base": self.param_shardings,
                                "lora": jax.tree_util.tree_map(lambda _: replicated, shapes)}

    @functools.cached_property
    def schedule(self):
        p = self.plan
        return optax.warmup_cosine_decay_schedule(0.0, LORA_LR * p.lr_scale, p.warmup, p.steps, LORA_LR * p.lr_scale / 10)

    @functools.cached_property
    def optimizer(self) -> optax.GradientTransformation:
        labels = {"base": jax.tree_util.tree_map(lambda _: "frozen", self.param_shapes["base"]),
                  "lora": jax.tree_util.tree_map(lambda _: "lora", self.param_shapes["lora"])}
        return optax.multi_transform({"lora": optax.adamw(self.schedule, weight_decay=0.0),
                                      "frozen": optax.set_to_zero()}, labels)

    @functools.cached_property
    def learning_rates(self) -> np.ndarray:
        """Every step's rate, computed once: a per-step eager read would queue behind the dispatched step."""
        return np.asarray(jax.vmap(self.schedule)(jnp.arange(self.plan.steps)))

    def learning_rate(self, step: int) -> float:
        return float(self.learning_rates[step])

    def init_state(self, base_params):
        params = {"base": base_params, "lora": jax.device_put(init_lora(self.param_shapes["base"], self.rank, self.plan.seed),
                                                              self.param_shardings["lora"])}
        return params, jax.jit(self.optimizer.init, out_shardings=self.opt_shardings)(params)
