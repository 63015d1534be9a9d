"""Training's set-up, built once from a plan and a mesh and shared by every use of it.

A :class:`TrainingSetup` holds the plan, the mesh, the parameters' and optimizer state's shapes
and shardings (each derived once), the optimizer, and the jitted train and eval steps. Dry-run
compiles its train step against :meth:`TrainingSetup.abstract_state`; pretraining starts from
:meth:`~TrainingSetup.init_state` or :meth:`~TrainingSetup.restore`; evaluation uses only
:attr:`~TrainingSetup.eval_step` (the optimizer is never built for it). Fine-tuning plugs in its
own loss: ``loss_fn(params, batch, config) -> scalar``, where ``batch`` is one micro-batch of
whatever the step is fed (a token array by default; for SFT e.g. ``{"tokens", "mask"}``).

    setup = TrainingSetup.build(config, recipe, "4x1", steps=1000, batch_size=8)
    with setup.activate():
        params, opt_state = setup.init_state()
        params, opt_state, out = setup.train_step(params, opt_state, setup.train_batch(rows))
"""
from __future__ import annotations

import contextlib
import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from . import checkpoint, sharding
from .config import LlamaConfig
from .model import next_token_loss, param_shapes  # the default loss
from .optim import learning_rates, make_optimizer
from .plan import Plan, build_plan, resume_changes


def make_train_step(plan: Plan, tx: optax.GradientTransformation, loss_fn: Callable = next_token_loss):
    """One optimizer step over a batch of `plan.accum` micro-batches (the leading axis of every
    leaf): gradients summed in a scan, averaged, then applied."""
    loss = functools.partial(loss_fn, config=plan.config)

    def step(params, opt_state, batch):
        def micro(grads, micro_batch):
            value, g = jax.value_and_grad(loss)(params, micro_batch)
            return jax.tree_util.tree_map(jnp.add, grads, g), value

        grads, losses = jax.lax.scan(micro, jax.tree_util.tree_map(jnp.zeros_like, params), batch)
        grads = jax.tree_util.tree_map(lambda g: g / plan.accum, grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {"loss": jnp.mean(losses),
                                                                  "grad_norm": optax.tree.norm(grads)}

    return step


class TrainingSetup:
    """The plan, mesh, shardings, optimizer and compiled steps of one training (or evaluation)."""

    def __init__(self, plan: Plan, mesh: Mesh, loss_fn: Callable = next_token_loss):
        if plan.data_parallel != mesh.shape["fsdp"]:
            raise ValueError(f"the plan splits batches {plan.data_parallel} ways but the mesh has "
                             f"fsdp={mesh.shape['fsdp']}; build both with TrainingSetup.build")
        self.plan = plan
        self.config = plan.config
        self.mesh = mesh
        self.loss_fn = loss_fn
        self.param_shapes = param_shapes(self.config)
        self.param_shardings = sharding.param_shardings(self.config, mesh, self.param_shapes)
        self.batch_sharding = sharding.accum_batch_sharding(mesh)  # [accum, micro_batch, T + 1]
        self.eval_batch_sharding = sharding.batch_sharding(mesh)  # [micro_batch, T + 1]

    @classmethod
    def build(cls, config: LlamaConfig, recipe: dict, mesh: Mesh | str | None = None, *,
              loss_fn: Callable = next_token_loss, **overrides) -> "TrainingSetup":
        """From a size's config and recipe, a mesh (or its `FxT` spec; None: every device on fsdp)
        and the plan's overrides (`build_plan`'s keywords: steps, batch_size, seq_len, ...)."""
        mesh = mesh if isinstance(mesh, Mesh) else sharding.make_mesh(mesh)
        return cls(build_plan(config, recipe, mesh.shape["fsdp"], **overrides), mesh, loss_fn)

    # --- the optimizer and its state: built on first use, so evaluation never builds them ---------

    @functools.cached_property
    def optimizer(self) -> optax.GradientTransformation:
        p = self.plan
        return make_optimizer(self.config, p.steps, kind=p.optimizer, lr_scale=p.lr_scale, warmup=p.warmup,
                              weight_decay=p.weight_decay)

    @functools.cached_property
    def opt_shapes(self):
        return jax.eval_shape(self.optimizer.init, self.param_shapes)

    @functools.cached_property
    def opt_shardings(self):
        return sharding.state_shardings(self.opt_shapes, self.param_shapes, self.param_shardings, self.mesh)

    def learning_rate(self, step: int) -> float:
        """The hidden matrices' learning rate at `step` (0-based), for logs."""
        p = self.plan
        return learning_rates(self.config, p.steps, step, kind=p.optimizer, lr_scale=p.lr_scale,
                              warmup=p.warmup)["matrix"]

    # --- state -------------------------------------------------------------------------------------

    def abstract_state(self):
        """(params, opt_state) as ShapeDtypeStructs carrying their shardings: nothing allocated."""
        return (sharding.abstract(self.param_shapes, self.param_shardings),
                sharding.abstract(self.opt_shapes, self.opt_shardings))

    def init_state(self, init_from=None):
        """Fresh (params, opt_state), born sharded; `init_from` (a checkpoint.Run) supplies the
        weights instead of the seed (continued training from an import, a GGUF, a personality)."""
        if init_from is None:
            params = sharding.init_sharded(self.config, self.mesh, self.plan.seed, self.param_shardings)
        else:
            params = checkpoint.load_params(init_from.dir, init_from.step, shardings=self.param_shardings)[1]
        return self.state_from(params)

    def state_from(self, params):
        """(params, a fresh opt_state for them, born sharded): the start of training from given weights."""
        return params, jax.jit(self.optimizer.init, out_shardings=self.opt_shardings)(params)

    def resume_step(self, run_dir, resume: bool, tokenizer, tokenizer_sha256: str, data_fingerprint: str,
                    step: int | None = None) -> int:
        """The step this plan starts from in `run_dir` (`checkpoint.resume_step`: 0 for a new run),
        refusing, one line for all, to resume a run with settings that change what it computes
        (`plan.resume_changes`: optimizer, schedule, learning-rate scale, ...)."""
        if resume and checkpoint.saved_steps(run_dir):
            changes = resume_changes(checkpoint.open_run(run_dir).info.get("train", {}), self.plan)
            if changes:
                raise ValueError(f"{run_dir}: cannot resume, this would change the run: {'; '.join(changes)} "
                                 "(start a new run with --model-tag, or resume with the run's settings)")
        return checkpoint.resume_step(run_dir, resume, self.config, tokenizer, tokenizer_sha256, data_fingerprint,
                                      step)

    def restore(self, mgr, step: int):
        """(params, opt_state) of a checkpoint, placed on this mesh (any mesh may have saved it)."""
        params, opt_state, _ = checkpoint.restore(mgr, step, *self.abstract_state())
        return params, opt_state

    # --- steps -------------------------------------------------------------------------------------

    @functools.cached_property
    def train_step(self):
        """jit((params, opt_state, batch) -> (params, opt_state, {"loss", "grad_norm"})); the state
        is donated and keeps its shardings."""
        return jax.jit(make_train_step(self.plan, self.optimizer, self.loss_fn),
                       out_shardings=(self.param_shardings, self.opt_shardings, None), donate_argnums=(0, 1))

    @functools.cached_property
    def eval_step(self):
        """jit((params, micro_batch) -> mean loss)."""
        return jax.jit(functools.partial(self.loss_fn, config=self.config))

    @contextlib.contextmanager
    def activate(self):
        """The mesh and logical-axis rules the steps are traced under."""
        with jax.set_mesh(self.mesh), sharding.axis_rules():
            yield

    def train_batch(self, local):
        """This process's rows [rows, T+1] of a global batch (an array, or a dict of them such as
        tokens and a loss mask) -> the global [accum, micro_batch, T+1] arrays. Row r of the global
        batch is micro-row r // accum of accumulation step r % accum, so each process's contiguous
        rows land on its own devices."""
        p = self.plan

        def place(rows: np.ndarray) -> jax.Array:
            rows = rows.reshape(rows.shape[0] // p.accum, p.accum, p.seq_len + 1).transpose(1, 0, 2)
            return jax.make_array_from_process_local_data(self.batch_sharding, np.ascontiguousarray(rows),
                                                          (p.accum, p.micro_batch, p.seq_len + 1))

        return jax.tree_util.tree_map(place, local)

    def eval_batch(self, local):
        """This process's rows of a [micro_batch, T+1] validation batch (or a dict of them) -> the
        global arrays."""
        shape = (self.plan.micro_batch, self.plan.seq_len + 1)
        return jax.tree_util.tree_map(
            lambda rows: jax.make_array_from_process_local_data(self.eval_batch_sharding, rows, shape), local)

    # --- reports -----------------------------------------------------------------------------------

    def describe(self) -> str:
        return self.plan.describe(sharding.describe(self.mesh))

    @functools.cached_property
    def compiled_step(self):
        """(the train step compiled ahead of time for this plan's batch, seconds it took); callable
        like `train_step` with concrete arrays. Nothing is allocated to compile it."""
        p = self.plan
        batch = jax.ShapeDtypeStruct((p.accum, p.micro_batch, p.seq_len + 1), jnp.int32, sharding=self.batch_sharding)
        start = time.perf_counter()
        with self.activate():
            compiled = self.train_step.lower(*self.abstract_state(), batch).compile()
        return compiled, time.perf_counter() - start

    @functools.cached_property
    def step_memory(self):
        """(compile seconds, predicted peak bytes per device, XLA's memory analysis), the last two
        None when the backend does not report memory. Peak = arguments + outputs − donated aliases +
        temporaries: what XLA reserves for one step."""
        compiled, seconds = self.compiled_step
        mem = compiled.memory_analysis()
        if mem is None:
            return seconds, None, None
        total = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
        return seconds, total, mem

    def compile_report(self) -> list[str]:
        """Compile the train step without allocating anything; its time and memory per device."""
        seconds, total, mem = self.step_memory
        lines = [f"compiled the training step in {seconds:.1f}s"]
        if mem is None:
            return lines + ["memory per device: not reported by this backend"]
        gib = 1024**3
        lines.append(f"memory per device: {total / gib:.2f} GiB predicted peak (params + optimizer state "
                     f"{mem.argument_size_in_bytes / gib:.2f} GiB, activations and temporaries "
                     f"{mem.temp_size_in_bytes / gib:.2f} GiB)")
        return lines
