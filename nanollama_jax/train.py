"""Train a Llama 3 model: sharded over a device mesh, Muon + AdamW, exact resume, validation.

    python -m nanollama_jax.train --size tiny                          # built-in corpus, CPU, minutes
    python -m nanollama_jax.train --size small --mesh 4x1 --data data/fineweb --model-tag small
    python -m nanollama_jax.train --size big --vocab-size 32000 --dry-run   # params, FLOPs, memory

A run lives in runs/<tag>/ (config.json, tokenizer.model, checkpoints/, metrics.jsonl, plots).
Batch k is a pure function of (seed, k), so `--resume` continues exactly where the last
checkpoint left off. Ctrl-C (or SIGTERM) saves a checkpoint before exiting.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import checkpoint, model, sharding
from .config import REMAT_POLICIES, LlamaConfig, default_remat, load_size, size_names
from .model import attention_implementation, param_shapes

# Dense bf16 peak FLOP/s per device, by device kind (substring match), for MFU.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12,
              "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v4": 275e12, "TPU v6": 918e12}
SAMPLE_PROMPTS = ("The", "In this module,")


def log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything derived from the flags: what one optimizer step is made of."""

    config: LlamaConfig
    steps: int
    warmup: int
    seq_len: int
    batch_size: int  # rows per data-parallel shard per micro-step
    data_parallel: int
    accum: int
    seed: int
    optimizer: str
    lr_scale: float
    weight_decay: float

    @property
    def micro_batch(self) -> int:
        return self.batch_size * self.data_parallel

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.accum

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len


def peak_flops(device) -> float | None:
    """The device's peak FLOP/s: from the table for accelerators; measured for CPUs (an fp32 GEMM
    of the kind the model runs, so CPU MFU reads as a share of what this machine's BLAS reaches)."""
    if device.platform == "cpu":
        return cpu_gemm_flops()
    kind = getattr(device, "device_kind", "")
    return next((v for k, v in PEAK_FLOPS.items() if k in kind), None)


@functools.lru_cache(maxsize=1)
def cpu_gemm_flops(n: int = 1024) -> float:
    a = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    reps, start = 5, time.perf_counter()
    for _ in range(reps):
        mm(a).block_until_ready()
    return 2 * n**3 * reps / (time.perf_counter() - start)


def next_token_loss(params, tokens, config: LlamaConfig):
    """Mean cross-entropy of predicting tokens[:, 1:] from tokens[:, :-1] (chunked: model.py)."""
    return model.next_token_loss(params, tokens, config)


def make_train_step(plan: Plan, tx: optax.GradientTransformation):
    loss_fn = functools.partial(next_token_loss, config=plan.config)

    def step(params, opt_state, batch):  # batch [accum, micro_batch, seq_len + 1]
        def micro(grads, tokens):
            loss, g = jax.value_and_grad(loss_fn)(params, tokens)
            return jax.tree_util.tree_map(jnp.add, grads, g), loss

        grads, losses = jax.lax.scan(micro, jax.tree_util.tree_map(jnp.zeros_like, params), batch)
        grads = jax.tree_util.tree_map(lambda g: g / plan.accum, grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {"loss": jnp.mean(losses),
                                                                  "grad_norm": optax.tree.norm(grads)}

    return step


def state_shardings(plan: Plan, tx, mesh):
    p_shapes = param_shapes(plan.config)
    p_sh = sharding.param_shardings(plan.config, mesh)
    o_shapes = jax.eval_shape(tx.init, p_shapes)
    by_path = {jax.tree_util.keystr(p): (s.shape, sh) for (p, s), sh in zip(
        jax.tree_util.tree_leaves_with_path(p_shapes), jax.tree_util.tree_leaves(p_sh))}
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def pick(path, leaf):
        key = jax.tree_util.keystr(path)
        for ppath, (shape, sh) in by_path.items():
            if key.endswith(ppath) and shape == leaf.shape:
                return sh
        return replicated

    o_sh = jax.tree_util.tree_map_with_path(pick, o_shapes)
    return p_shapes, p_sh, o_shapes, o_sh


def build_plan(args, config: LlamaConfig, recipe: dict, data_parallel: int) -> Plan:
    seq_len = args.seq_len or config.sequence_len
    dtype = args.dtype or default_dtype()
    config = dataclasses.replace(config, sequence_len=seq_len, dtype=dtype, remat=args.remat or default_remat(dtype))
    batch_size = args.batch_size or recipe.get("batch_size", 32)
    micro = batch_size * data_parallel * seq_len
    tokens = args.tokens_per_step or recipe.get("tokens_per_step", 524288)
    accum = max(1, tokens // micro)
    if tokens > micro and tokens % micro:
        raise ValueError(f"--tokens-per-step {tokens} is not a multiple of batch {batch_size} x data-parallel "
                         f"{data_parallel} x seq {seq_len} = {micro} tokens; try --tokens-per-step {accum * micro}")
    steps = args.steps or recipe.get("steps") or max(1000, 10 * config.param_count() // (accum * micro))
    warmup = min(recipe.get("warmup_steps", 100), max(1, steps // 10))
    return Plan(config, steps, warmup, seq_len, batch_size, data_parallel, accum, args.seed, args.optimizer,
                args.lr_scale, recipe.get("weight_decay", 0.0))


def default_dtype() -> str:
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def describe_plan(plan: Plan, mesh) -> str:
    c = plan.config
    return "\n".join([
        f"model: {c.n_layer} layers, d {c.n_embd}, {c.n_head} heads ({c.n_kv_head} kv), ffn {c.ffn_hidden}, "
        f"vocab {c.vocab_size} (padded {c.padded_vocab}), context {c.sequence_len}, dtype {c.dtype}, remat {c.remat}"
        f"{f' (the {c.dtype} default)' if c.remat == default_remat(c.dtype) else ''}, attention {attention_implementation(c)}",
        f"{c.param_count():,} parameters",
        f"FLOPs/token: {c.flops_per_token(plan.seq_len):.4g} (causal; nanollama's non-causal figure "
        f"{c.flops_per_token(plan.seq_len, causal=False):.4g})",
        sharding.describe(mesh),
        f"batch: {plan.batch_size} rows x {plan.data_parallel} data-parallel x {plan.accum} accumulation "
        f"= {plan.global_batch} sequences of {plan.seq_len} = {plan.tokens_per_step:,} tokens per step",
        f"steps: {plan.steps} (warmup {plan.warmup}, decay from {plan.steps // 2}), optimizer {plan.optimizer}, "
        f"lr scale {plan.lr_scale}",
    ])


def dry_run(plan: Plan, mesh, compile_step: bool) -> None:
    print(describe_plan(plan, mesh))
    if not compile_step:
        return
    from .optim import make_optimizer

    tx = make_optimizer(plan.config, plan.steps, kind=plan.optimizer, lr_scale=plan.lr_scale, warmup=plan.warmup)
    p_shapes, p_sh, o_shapes, o_sh = state_shardings(plan, tx, mesh)
    batch_sh = sharding.accum_batch_sharding(mesh)

    def abstract(shapes, shardings):
        return jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)

    batch = jax.ShapeDtypeStruct((plan.accum, plan.micro_batch, plan.seq_len + 1), jnp.int32, sharding=batch_sh)
    start = time.perf_counter()
    with jax.set_mesh(mesh), sharding.axis_rules():
        compiled = jax.jit(make_train_step(plan, tx), out_shardings=(p_sh, o_sh, None), donate_argnums=(0, 1)).lower(
            abstract(p_shapes, p_sh), abstract(o_shapes, o_sh), batch).compile()
    mem = compiled.memory_analysis()
    print(f"compiled the training step in {time.perf_counter() - start:.1f}s")
    if mem is None:
        print("memory per device: not reported by this backend")
        return
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    gib = 1024**3
    print(f"memory per device: {total / gib:.2f} GiB (params + optimizer state {mem.argument_size_in_bytes / gib:.2f} GiB, "
          f"activations and temporaries {mem.temp_size_in_bytes / gib:.2f} GiB)")
    stats = mesh.devices.flat[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    if limit:
        verdict = "fits" if total <= 0.95 * limit else "does NOT fit"
        print(f"device memory {limit / gib:.1f} GiB: {verdict}")
        if total > 0.95 * limit:
            if plan.config.remat != "full":
                print("suggestion: --remat full (recompute activations in the backward pass)")
            if plan.batch_size > 1:
                print(f"suggestion: --batch-size {plan.batch_size // 2} (accumulation doubles, tokens per step unchanged)")


def init_distributed(args) -> None:
    coordinator = args.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if coordinator or args.num_processes or int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)


class Metrics:
    """metrics.jsonl, written by process 0; on resume, lines past the restored step are dropped."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        self.enabled = jax.process_index() == 0
        if self.enabled and path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, **record) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def global_batch_array(local: np.ndarray, plan: Plan, batch_sh) -> jax.Array:
    """This process's rows [rows, T+1] → the global [accum, micro_batch, T+1] array. Row r of the
    global batch is micro-row r // accum of accumulation step r % accum, so each process's
    contiguous rows land on its own devices."""
    rows = local.shape[0]
    local = local.reshape(rows // plan.accum, plan.accum, plan.seq_len + 1).transpose(1, 0, 2)
    return jax.make_array_from_process_local_data(batch_sh, np.ascontiguousarray(local),
                                                  (plan.accum, plan.micro_batch, plan.seq_len + 1))


def main(argv=None):
    from .cli import run_cli

    p = argparse.ArgumentParser(prog="python -m nanollama_jax.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny", help=f"named size: {', '.join(size_names())} (default tiny)")
    p.add_argument("--mesh", help="FSDPxTENSOR device mesh, e.g. 4x1 (default: all devices on fsdp)")
    p.add_argument("--data", help="prepared data folder (python -m data.prepare); default: the built-in corpus")
    p.add_argument("--personality-dir", help="personality shards (python -m data.prepare_personality)")
    p.add_argument("--personality-ratio", type=float, default=0.2, help="share of each batch from --personality-dir")
    p.add_argument("--model-tag", help="run name: runs/<tag>/ (default: the size)")
    p.add_argument("--runs-dir", default="runs", help="where run folders live (default ./runs)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: the size's recipe)")
    p.add_argument("--tokens-per-step", type=int, help="tokens per optimizer step; accumulation makes up the rest")
    p.add_argument("--seq-len", type=int, help="sequence length (default: the size's context)")
    p.add_argument("--batch-size", type=int, help="sequences per data-parallel shard per micro-step")
    p.add_argument("--vocab-size", type=int, help="with --dry-run: vocabulary to size the model for")
    p.add_argument("--optimizer", choices=("muon", "adamw"), default="muon")
    p.add_argument("--lr-scale", type=float, default=1.0, help="multiplies every group's learning rate")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="compute dtype (default bf16 on GPU/TPU, fp32 on CPU)")
    p.add_argument("--remat", choices=REMAT_POLICIES, help="activation rematerialisation policy (default: qkv with "
                   "bfloat16, the accelerator default that fits every size in 80 GB; none with float32)")
    p.add_argument("--seed", type=int, default=0, help="init and data order (default 0)")
    p.add_argument("--resume", action="store_true", help="continue the run from its last checkpoint")
    p.add_argument("--init-from", help="start from another run's weights (an import, a GGUF read back, an "
                                       "injected personality): continued pretraining with a fresh optimizer")
    p.add_argument("--stop-after", type=int, help="stop (with a checkpoint) after this many steps of this invocation")
    p.add_argument("--eval-every", type=int, help="validation every N steps (default: 10 times per run)")
    p.add_argument("--eval-batches", type=int, default=4, help="validation batches per evaluation")
    p.add_argument("--sample-every", type=int, help="text samples every N steps and at the end (0 = never)")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps (default: 10 times per run)")
    p.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--dry-run", action="store_true", help="print the plan and compile the step; train nothing")
    p.add_argument("--no-compile", action="store_true", help="with --dry-run: skip compiling")
    p.add_argument("--coordinator", help="multi-host: coordinator address host:port (or JAX_COORDINATOR_ADDRESS)")
    p.add_argument("--num-processes", type=int, help="multi-host: number of processes")
    p.add_argument("--process-id", type=int, help="multi-host: this process's index")
    args = p.parse_args(argv)
    run_cli(lambda: train(args))


def train(args) -> None:
    init_distributed(args)
    config, recipe = load_size(args.size)
    init_run = checkpoint.open_run(args.init_from) if args.init_from else None
    if init_run:  # continued training: the model is the one in that run, whatever its origin
        config = dataclasses.replace(init_run.config, dtype=config.dtype, remat=config.remat)
    if args.vocab_size:
        config = dataclasses.replace(config, vocab_size=args.vocab_size)
    mesh = sharding.make_mesh(args.mesh)
    dp = mesh.shape["fsdp"]
    if args.dry_run:
        dry_run(build_plan(args, config, recipe, dp), mesh, not args.no_compile)
        return

    from . import data as input_data

    data_dir = Path(args.data) if args.data else None
    if data_dir is None:
        from data.prepare import ensure_builtin

        data_dir = ensure_builtin(progress=jax.process_index() == 0)
    meta = input_data.load_meta(data_dir)
    if init_run and meta["tokenizer_sha256"] != init_run.info.get("tokenizer_sha256"):
        raise ValueError(f"--init-from {init_run.dir}: its tokenizer differs from the data's ({meta['tokenizer_path']}); "
                         "prepare the data with --tokenizer " + str(init_run.tokenizer_path))
    if meta["vocab_size"] != config.vocab_size:
        log(f"vocabulary: {meta['vocab_size']} from {data_dir} (the size's default is {config.vocab_size})")
        config = dataclasses.replace(config, vocab_size=meta["vocab_size"])
    plan = build_plan(args, config, recipe, dp)
    config = plan.config
    if plan.global_batch % jax.process_count():
        raise ValueError(f"global batch {plan.global_batch} does not split over {jax.process_count()} processes")
    batches = input_data.Batches(data_dir, seq_len=plan.seq_len, global_batch=plan.global_batch, seed=plan.seed,
                                 process_index=jax.process_index(), process_count=jax.process_count(),
                                 personality_dir=args.personality_dir,
                                 personality_ratio=args.personality_ratio if args.personality_dir else 0.0)
    val = input_data.validation_batches(data_dir, seq_len=plan.seq_len, batch_size=plan.micro_batch,
                                        max_batches=args.eval_batches)
    bpt = input_data.bytes_per_token(data_dir)

    run_dir = Path(args.runs_dir) / (args.model_tag or args.size)
    sections = {"train": {k: v for k, v in dataclasses.asdict(plan).items() if k != "config"},
                "data": {"dir": str(Path(data_dir).resolve()), "fingerprint": batches.fingerprint,
                         "personality_dir": args.personality_dir}}
    start_step = prepare_run(run_dir, args.resume, config, batches, sections)
    if jax.process_index() == 0:
        checkpoint.create_run(run_dir, config, batches.tokenizer_path, **sections)
    multihost_barrier("run folder")
    run = checkpoint.open_run(run_dir)

    from .optim import make_optimizer

    tx = make_optimizer(config, plan.steps, kind=plan.optimizer, lr_scale=plan.lr_scale, warmup=plan.warmup,
                        weight_decay=plan.weight_decay)
    p_shapes, p_sh, o_shapes, o_sh = state_shardings(plan, tx, mesh)
    batch_sh = sharding.accum_batch_sharding(mesh)
    eval_sh = sharding.batch_sharding(mesh)
    mgr = checkpoint.manager(run, keep=args.keep)

    log(describe_plan(plan, mesh))
    log(f"data: {data_dir} ({meta['train']['tokens']:,} training tokens, {meta['val']['tokens']:,} held out)")
    with jax.set_mesh(mesh), sharding.axis_rules():
        if start_step:
            params, opt_state, _ = checkpoint.restore(mgr, start_step, p_shapes, p_sh, o_shapes, o_sh)
            log(f"resumed {run_dir} at step {start_step}")
        else:
            if init_run:
                params = checkpoint.load_params(init_run.dir, init_run.step, shardings=p_sh)[1]
                log(f"initialised from {init_run.dir} (step {init_run.step})")
            else:
                params = sharding.init_sharded(config, mesh, plan.seed)
            opt_state = jax.jit(tx.init, out_shardings=o_sh)(params)
        train_step = jax.jit(make_train_step(plan, tx), out_shardings=(p_sh, o_sh, None), donate_argnums=(0, 1))
        eval_step = jax.jit(functools.partial(next_token_loss, config=config))
        loop(plan, args, run, mgr, batches, val, bpt, params, opt_state, train_step, eval_step, batch_sh, eval_sh,
             start_step, mesh)


def prepare_run(run_dir: Path, resume: bool, config: LlamaConfig, batches, sections) -> int:
    """The step to start from; refuses to overwrite a run or to resume it with other data."""
    steps = checkpoint.saved_steps(run_dir)
    if not steps:
        return 0
    if not resume:
        raise ValueError(f"{run_dir} already has checkpoints (steps {steps[0]}…{steps[-1]}); "
                         "pass --resume to continue it or --model-tag for a new run")
    run = checkpoint.open_run(run_dir)
    if run.config != config:
        diff = [f"{k} {v} → {getattr(config, k)}" for k, v in run.config.to_dict().items() if getattr(config, k) != v]
        raise ValueError(f"{run_dir}: cannot resume with a different model ({', '.join(diff)})")
    if run.info.get("tokenizer_sha256") != batches.tokenizer_sha256:
        raise ValueError(f"{run_dir}: cannot resume with a different tokenizer "
                         f"({batches.tokenizer_path} differs from the run's tokenizer.model)")
    if run.info.get("data", {}).get("fingerprint") != batches.fingerprint:
        raise ValueError(f"{run_dir}: cannot resume with different data (corpus, seed, sequence length, "
                         "global batch or personality mix differ from the run's)")
    return steps[-1]


def multihost_barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def loop(plan, args, run, mgr, batches, val, bpt, params, opt_state, train_step, eval_step, batch_sh, eval_sh,
         start_step, mesh):
    from tqdm import tqdm

    from .optim import learning_rates

    config = plan.config
    every = max(1, plan.steps // 10)
    eval_every, save_every = args.eval_every or every, args.save_every or every
    sample_every = args.sample_every if args.sample_every is not None else every * 5
    metrics = Metrics(run.dir / "metrics.jsonl", start_step)
    n_dev = mesh.devices.size
    peak = peak_flops(mesh.devices.flat[0])
    flops_per_token = config.flops_per_token(plan.seq_len)
    last_step = plan.steps if not args.stop_after else min(plan.steps, start_step + args.stop_after)

    stop = {"signal": None}

    def on_signal(signum, _):
        stop["signal"] = signal.Signals(signum).name

    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    val_local = [local_rows(v) for v in val]
    window: list[float] = []  # recent step times, compilation excluded
    bar = tqdm(total=plan.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
               disable=jax.process_index() != 0, file=sys.stderr)
    step = start_step
    saved_at = start_step
    try:
        while step < last_step:
            batch = global_batch_array(batches[step], plan, batch_sh)
            t0 = time.perf_counter()
            params, opt_state, out = train_step(params, opt_state, batch)
            loss, grad_norm = float(out["loss"]), float(out["grad_norm"])
            dt = time.perf_counter() - t0
            step += 1
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                raise ValueError(f"step {step}: loss {loss}, grad norm {grad_norm} — training diverged; "
                                 f"the last good checkpoint (step {saved_at}) is kept. Try a lower --lr-scale.")
            if step > start_step + 1:  # the first step of an invocation includes compilation
                window = (window + [dt])[-20:]
            step_time = sum(window) / len(window) if window else float("nan")
            tok_s = plan.tokens_per_step / step_time
            mfu = tok_s * flops_per_token / (peak * n_dev) if peak else float("nan")
            lr = learning_rates(config, plan.steps, step - 1, kind=plan.optimizer, lr_scale=plan.lr_scale,
                                warmup=plan.warmup)["matrix"]
            metrics.write(step=step, loss=loss, lr=lr, grad_norm=grad_norm, tokens_per_sec=tok_s, mfu=mfu,
                          tokens=step * plan.tokens_per_step)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if step % args.log_every == 0 or step == last_step:
                eta = (plan.steps - step) * step_time
                if jax.process_index() == 0:
                    bar.write(f"step {step:5d}/{plan.steps} | loss {loss:.4f} | lr {lr:.2e} | grad norm {grad_norm:.3f} | "
                              f"{tok_s:,.0f} tok/s | MFU {mfu * 100:.1f}% | ETA {format_eta(eta)}")
            if step % eval_every == 0 or step == plan.steps:
                val_loss = float(np.mean([float(eval_step(params, jax.make_array_from_process_local_data(
                    eval_sh, v, (plan.micro_batch, plan.seq_len + 1)))) for v in val_local]))
                bpb = val_loss / math.log(2) / bpt
                metrics.write(step=step, val_loss=val_loss, val_bpb=bpb)
                if jax.process_index() == 0:
                    bar.write(f"step {step:5d} | validation loss {val_loss:.4f} | {bpb:.3f} bits per byte")
            if sample_every and (step % sample_every == 0 or step == plan.steps):
                for text in samples(params, config, run.tokenizer_path, plan.seed):
                    metrics.write(step=step, sample=text)
                    if jax.process_index() == 0:
                        bar.write(f"sample: {text!r}")
            if step % save_every == 0 or step == last_step or stop["signal"]:
                checkpoint.save(mgr, step, params, checkpoint_meta(plan, batches, step), opt_state)
                saved_at = step
            if stop["signal"]:
                log(f"\n{stop['signal']}: saved a checkpoint at step {step}; continue with --resume")
                break
    finally:
        bar.close()
        mgr.wait_until_finished()
        mgr.close()
        for s, h in handlers.items():
            signal.signal(s, h)
    if step == plan.steps:
        log(f"done: {run.dir} (step {step}); plot with python -m nanollama_jax.plot {run.dir}")
        if jax.process_index() == 0:
            from .plot import plot_run

            plot_run(run.dir)


def local_rows(batch: np.ndarray) -> np.ndarray:
    n = batch.shape[0] // jax.process_count()
    return batch[jax.process_index() * n:(jax.process_index() + 1) * n]


def checkpoint_meta(plan: Plan, batches, step: int) -> dict:
    return {"step": step, "seed": plan.seed, "data_fingerprint": batches.fingerprint,
            "tokenizer_sha256": batches.tokenizer_sha256, "tokens": step * plan.tokens_per_step}


def samples(params, config: LlamaConfig, tokenizer_path: Path, seed: int, max_tokens: int = 40) -> list[str]:
    import sentencepiece as spm

    from .generate import generate

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    out = []
    for prompt in SAMPLE_PROMPTS:
        ids = sp.encode(prompt)
        ids += generate(params, config, [sp.bos_id()] + ids, max_tokens, temperature=0.8, top_k=50, top_p=0.9,
                        seed=seed, stop_id=sp.eos_id())
        out.append(sp.decode(ids))
    return out


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "–"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


if __name__ == "__main__":
    main()
