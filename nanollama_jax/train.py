"""Train a Llama 3 model: sharded over a device mesh, Muon + AdamW, exact resume, validation.

    python -m nanollama_jax.train --size tiny                          # built-in corpus, CPU, minutes
    python -m nanollama_jax.train --size small --mesh 4x1 --data data/fineweb --model-tag small
    python -m nanollama_jax.train --size big --vocab-size 32000 --dry-run   # params, FLOPs, memory, recipe
    python -m nanollama_jax.train --size small --dtype bfloat16 --dry-run --device-memory 24   # what fits 24 GiB
    python -m nanollama_jax.train --size nano --data data/fineweb --eval-tasks eval_bundle --eval-every 500

A run lives in runs/<tag>/ (config.json, tokenizer.model, checkpoints/, metrics.jsonl, plots), and
runs/<tag>/best/ holds the weights of the step with the lowest validation loss (a run of its own:
`--checkpoint runs/<tag>/best` wherever a run is taken). Each evaluation logs validation loss, bits
per byte and, with --eval-tasks, task accuracy; the run warns when validation loss rises past its best.
Batch k is a pure function of (seed, k), so `--resume` continues exactly where the last
checkpoint left off (`--resume-step N`: from an earlier one). Ctrl-C (or SIGTERM) saves a
checkpoint at the end of the current step and says when; a second one exits at once.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from pathlib import Path

import jax

from nanollama_base.cli import ArgumentParser, run_cli

from . import checkpoint, sharding, xla_flags
from .config import DTYPE_CHOICES, REMAT_POLICIES, load_size, size_names
from .loop import Schedule, log, train_loop
from .memory_fit import GIB, fit_report
from .recipe import explain as explain_recipe
from .training_setup import TrainingSetup


def number_flag(kind, test, wanted: str):
    """An argparse type: `kind(text)` that passes `test`, else a usage error saying what is wanted."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not test(value):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}")
        return value

    parse.__name__ = wanted  # argparse names the type in some messages
    return parse


positive_int = number_flag(int, lambda v: v >= 1, "a positive integer")
non_negative_int = number_flag(int, lambda v: v >= 0, "an integer >= 0")
positive_float = number_flag(float, lambda v: v > 0 and v != float("inf"), "a positive number")
ratio = number_flag(float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m nanollama_jax.train", description=__doc__)
    p.add_argument("--size", default="tiny", help=f"named size: {', '.join(size_names())} (default tiny)")
    p.add_argument("--mesh", help="FSDPxTENSOR device mesh, e.g. 4x1 (default: all devices on fsdp)")
    p.add_argument("--data", help="prepared data folder (python -m data.prepare); default: the built-in corpus")
    p.add_argument("--personality-dir", help="personality shards (python -m data.prepare_personality)")
    p.add_argument("--personality-ratio", type=ratio, default=0.2, help="share of each batch from --personality-dir")
    p.add_argument("--model-tag", help="run name: runs/<tag>/ (default: the size)")
    p.add_argument("--runs-dir", default="runs", help="where run folders live (default ./runs)")
    p.add_argument("--steps", type=positive_int, help="optimizer steps (default: the size's recipe)")
    p.add_argument("--tokens-per-step", type=positive_int,
                   help="tokens per optimizer step; accumulation makes up the rest")
    p.add_argument("--seq-len", type=positive_int, help="sequence length (default: the size's context)")
    p.add_argument("--batch-size", type=positive_int, help="sequences per data-parallel shard per micro-step")
    p.add_argument("--vocab-size", type=positive_int, help="with --dry-run: vocabulary to size the model for")
    p.add_argument("--optimizer", choices=("muon", "adamw"), default="muon")
    p.add_argument("--lr-scale", type=positive_float, default=1.0, help="multiplies every group's learning rate")
    p.add_argument("--dtype", choices=DTYPE_CHOICES,
                   help="compute dtype (default bf16 on GPU/TPU, fp32 on CPU)")
    p.add_argument("--remat", choices=REMAT_POLICIES, help="activation rematerialisation policy (default: qkv with "
                   "bfloat16, the accelerator default that fits every size in 80 GB; none with float32)")
    p.add_argument("--doc-mask", action="store_true",
                   help="packed documents: a token attends only within its own document (each starts at BOS)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="init and data order (default 0)")
    p.add_argument("--resume", action="store_true", help="continue the run from its last checkpoint")
    p.add_argument("--resume-step", type=positive_int,
                   help="with --resume: continue from this checkpoint instead (e.g. when the last one is damaged)")
    p.add_argument("--init-from", help="start from another run's weights (an import, a GGUF read back, an "
                                       "injected personality): continued pretraining with a fresh optimizer")
    p.add_argument("--stop-after", type=positive_int,
                   help="stop (with a checkpoint) after this many steps of this invocation")
    p.add_argument("--eval-every", type=positive_int, help="validation every N steps (default: 10 times per run)")
    p.add_argument("--eval-batches", type=positive_int, default=4, help="validation batches per evaluation")
    p.add_argument("--eval-tasks", nargs="+", metavar="PATH",
                   help="tasks scored at each evaluation: an eval bundle, folders of .jsonl tasks or .jsonl files "
                        "(the formats of python -m nanollama_jax.eval)")
    p.add_argument("--eval-max-items", type=positive_int, default=100,
                   help="with --eval-tasks: items per task at each evaluation (default 100)")
    p.add_argument("--sample-every", type=non_negative_int,
                   help="text samples every N steps and at the end (0 = never)")
    p.add_argument("--save-every", type=positive_int, help="checkpoint every N steps (default: 10 times per run)")
    p.add_argument("--keep", type=positive_int, default=3, help="checkpoints to keep")
    p.add_argument("--log-every", type=positive_int, default=10, help="a log line every N steps (default 10)")
    p.add_argument("--deterministic", action="store_true",
                   help="bit-exact reruns on GPU (XLA's deterministic kernels, a few %% slower): a killed and resumed "
                        "run equals a straight one; CPU is always deterministic")
    p.add_argument("--dry-run", action="store_true", help="print the plan and compile the step; train nothing")
    p.add_argument("--device-memory", type=positive_float, metavar="GIB",
                   help="with --dry-run: memory per device to fit (default: what the accelerator reports); when the "
                        "step does not fit, the cheapest --batch-size / --remat that does is searched for")
    p.add_argument("--no-compile", action="store_true", help="with --dry-run: skip compiling")
    p.add_argument("--coordinator", help="multi-host: coordinator address host:port (or JAX_COORDINATOR_ADDRESS)")
    p.add_argument("--num-processes", type=positive_int, help="multi-host: number of processes")
    p.add_argument("--process-id", type=non_negative_int, help="multi-host: this process's index")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    # orbax logs a failed background save as ERROR tracebacks; the loop reports it as one line
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    if args.resume_step and not args.resume:
        p.error("--resume-step needs --resume")
    run_cli(p.prog, lambda: train(args))


def train(args) -> None:
    # 1. the XLA runtime (before the backend starts), processes, model and mesh
    runtime = xla_flags.set_up_runtime(deterministic=args.deterministic)
    init_distributed(args)  # before anything asks jax for devices (log does)
    config, recipe = load_size(args.size)
    init_run = checkpoint.open_run(args.init_from) if args.init_from else None
    if init_run:  # continued training: the model is the one in that run, whatever its origin
        config = init_run.config  # (dtype and remat come from the flags: the plan sets both)
    if args.vocab_size:
        config = dataclasses.replace(config, vocab_size=args.vocab_size)
    if args.doc_mask:
        config = dataclasses.replace(config, doc_mask=True)
    mesh = sharding.make_mesh(args.mesh)
    if args.dry_run:
        setup = TrainingSetup.build(config, recipe, mesh, **plan_flags(args))
        print(runtime)
        print(setup.describe())
        print("\n".join(explain_recipe(setup.plan, recipe, plan_flags(args), f"configs/{args.size}.json")))
        if not args.no_compile:
            print("\n".join(setup.compile_report()), flush=True)
            limit = args.device_memory * GIB if args.device_memory else device_memory_limit(mesh)
            if limit:
                fit_report(setup, recipe, plan_flags(args), limit, say=lambda line: print(line, flush=True))
        return

    # 2. data (the vocabulary is the data's) and the evaluation tasks
    from . import input as input_data
    from .tasks import load_tasks
    from .train_eval import BEST, TrainingEval, epochs_lines

    tasks = load_tasks(args.eval_tasks) if args.eval_tasks else []

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
    if config.doc_mask:  # documents start at the data's own BOS
        config = dataclasses.replace(config, bos_id=meta["bos_id"])
    setup = TrainingSetup.build(config, recipe, mesh, **plan_flags(args))
    plan = setup.plan
    if plan.global_batch % jax.process_count():
        raise ValueError(f"global batch {plan.global_batch} does not split over {jax.process_count()} processes")
    batches = input_data.Batches(data_dir, seq_len=plan.seq_len, global_batch=plan.global_batch, seed=plan.seed,
                                 process_index=jax.process_index(), process_count=jax.process_count(),
                                 personality_dir=args.personality_dir,
                                 personality_ratio=args.personality_ratio if args.personality_dir else 0.0)
    validation = input_data.validation_batches(data_dir, seq_len=plan.seq_len, batch_size=plan.micro_batch,
                                               max_batches=args.eval_batches)

    # 3. the run folder: new, or resumed with the same model, tokenizer and data
    run_dir = Path(args.runs_dir) / (args.model_tag or args.size)
    sections = {"train": plan.settings(),
                "data": {"dir": str(Path(data_dir).resolve()), "fingerprint": batches.fingerprint,
                         "personality_dir": args.personality_dir}}
    start_step = setup.resume_step(run_dir, args.resume, batches.tokenizer_path, batches.tokenizer_sha256,
                                   batches.fingerprint, args.resume_step)
    if jax.process_index() == 0:
        checkpoint.create_run(run_dir, plan.config, batches.tokenizer_path, **sections)
    multihost_barrier("run folder")
    run = checkpoint.open_run(run_dir)
    mgr = checkpoint.manager(run, keep=args.keep)

    # 4. state and the loop (said once the inputs are known good: a bad one is the only line)
    log(runtime)
    log(setup.describe())
    log(f"data: {data_dir} ({meta['train']['tokens']:,} training tokens, {meta['val']['tokens']:,} held out)")
    for line in epochs_lines(batches, plan.steps, run.dir / BEST):
        log(line)
    evaluation = TrainingEval(setup, run, batches, validation, tasks=tasks, max_items=args.eval_max_items,
                              start_step=start_step)
    schedule = Schedule.for_steps(plan.steps, log_every=args.log_every, eval_every=args.eval_every,
                                  save_every=args.save_every, sample_every=args.sample_every,
                                  stop_after=args.stop_after)
    with setup.activate():
        if start_step:
            state = setup.restore(mgr, start_step)
            log(f"resumed {run_dir} at step {start_step}")
        else:
            state = setup.init_state(init_run)
            if init_run:
                log(f"initialised from {init_run.dir} (step {init_run.step})")
        step = train_loop(setup, schedule, run, mgr, batches, evaluation, state, start_step)
    if step == plan.steps:
        log(f"done: {run.dir} (step {step}); curves in {run.dir / 'curves.png'}")


def device_memory_limit(mesh) -> int | None:
    """What the backend says one device may use (accelerators report it; CPUs do not)."""
    return (mesh.devices.flat[0].memory_stats() or {}).get("bytes_limit")


def plan_flags(args) -> dict:
    """The flags that override a size's recipe (None: the recipe's value)."""
    return dict(seq_len=args.seq_len, batch_size=args.batch_size, tokens_per_step=args.tokens_per_step,
                steps=args.steps, dtype=args.dtype, remat=args.remat, seed=args.seed, optimizer=args.optimizer,
                lr_scale=args.lr_scale)


def init_distributed(args) -> None:
    coordinator = args.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if coordinator or args.num_processes or int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)


def multihost_barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


if __name__ == "__main__":
    main()
