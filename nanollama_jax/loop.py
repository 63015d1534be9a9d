"""The training loop: steps, metrics.jsonl, validation, text samples, checkpoints, a clean stop.

It runs whatever a :class:`~nanollama_jax.training_setup.TrainingSetup` compiled, on batches
`batches[k]` (this process's rows of global batch k), so exact resume needs only the step.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from nanollama_base.cli import Progress

from . import checkpoint, faults
from .metrics import MetricsLog
from .plot import PlotRefresher
from .preemption import StopSignals
from .prefetch import DeviceClock, Prefetch

# Dense bf16 peak FLOP/s per device, by device kind (substring match), for MFU.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12,
              "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v4": 275e12, "TPU v6": 918e12}
SAMPLE_PROMPTS = ("The", "In this module,")
PREFETCH_DEPTH = 2  # batches made ahead of the device


def log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """When the loop logs, validates, samples and saves (every N steps; 0 samples = never), and
    where this invocation stops (`stop_after` steps from where it started, None: the plan's end)."""

    log_every: int
    eval_every: int
    save_every: int
    sample_every: int
    stop_after: int | None = None

    @classmethod
    def for_steps(cls, steps: int, *, log_every: int = 10, eval_every: int | None = None,
                  save_every: int | None = None, sample_every: int | None = None, stop_after: int | None = None):
        """Defaults: validate and save 10 times per run, sample twice."""
        every = max(1, steps // 10)
        return cls(log_every, eval_every or every, save_every or every,
                   every * 5 if sample_every is None else sample_every, stop_after)


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


def train_loop(setup, schedule: Schedule, run: checkpoint.Run, mgr, batches, evaluation, state,
               start_step: int) -> int:
    """Train from `start_step` to the plan's end (or `schedule.stop_after` steps, or a signal),
    inside `setup.activate()`; `evaluation` (a train_eval.TrainingEval) runs at each evaluation step.
    Returns the step reached; a checkpoint is saved there."""
    plan, config = setup.plan, setup.config
    params, opt_state = state
    metrics = MetricsLog(run.dir / "metrics.jsonl", start_step, enabled=jax.process_index() == 0)
    plots = PlotRefresher(run.dir, enabled=jax.process_index() == 0, warn=log)
    peak = peak_flops(setup.mesh.devices.flat[0])
    n_dev = setup.mesh.devices.size
    flops_per_token = config.flops_per_token(plan.seq_len)
    last_step = min(plan.steps, start_step + schedule.stop_after) if schedule.stop_after else plan.steps

    window: list[float] = []  # recent device step times, compilation and pauses excluded
    bar = Progress(plan.steps, initial=start_step, desc="train", unit="step", enabled=jax.process_index() == 0)
    step = saved_at = start_step
    clock = DeviceClock()
    # Batch k is made (read, assembled, placed on the devices) on a thread while step k - 1 runs.
    ahead = Prefetch(lambda k: setup.train_batch(batches[k]), start_step, last_step, depth=PREFETCH_DEPTH)

    def report_step(step: int, out) -> None:
        """A step's metrics, read once it completed (while the next step is already queued)."""
        nonlocal window
        loss, grad_norm = float(out["loss"]), float(out["grad_norm"])
        dt = clock.completed()
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise ValueError(f"step {step}: loss {loss}, grad norm {grad_norm} — training diverged; "
                             f"the last good checkpoint (step {saved_at}) is kept. Try a lower --lr-scale.")
        if dt is not None:
            window = (window + [dt])[-20:]
        step_time = sum(window) / len(window) if window else float("nan")
        stop.step_finished(step_time if window else None)
        tok_s = plan.tokens_per_step / step_time
        mfu = tok_s * flops_per_token / (peak * n_dev) if peak else float("nan")
        lr = setup.learning_rate(step - 1)
        metrics.write(step=step, loss=loss, lr=lr, grad_norm=grad_norm, tokens_per_sec=tok_s, mfu=mfu,
                      tokens=step * plan.tokens_per_step)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
        if (step % schedule.log_every == 0 or step == last_step) and jax.process_index() == 0:
            bar.write(f"step {step:5d}/{plan.steps} | loss {loss:.4f} | lr {lr:.2e} | grad norm {grad_norm:.3f} | "
                      f"{tok_s:,.0f} tok/s | MFU {mfu * 100:.1f}% | ETA {format_eta((plan.steps - step) * step_time)}")

    pending = None  # (step, its device scalars): dispatched, not read yet
    # every process reports its own signals: on a multi-host run the preempted one may not be process 0
    with StopSignals(lambda: (checkpoint.saved_steps(run.dir) or [None])[-1]) as stop:
        try:
            while step < last_step:
                # Dispatch step + 1 before reading step's scalars: the device never waits for the host.
                stop.step_started()
                params, opt_state, out = setup.train_step(params, opt_state, ahead.next())
                faults.kill_point("step", step + 1)
                step += 1
                if pending is not None:
                    report_step(*pending)
                pending = (step, out)
                reason = stop.should_stop()  # every process, every step: they all stop at the same one
                sample_now = schedule.sample_every and (step % schedule.sample_every == 0 or step == plan.steps)
                eval_now = step % schedule.eval_every == 0 or step == plan.steps
                save_now = step % schedule.save_every == 0 or step == last_step or reason
                if not (eval_now or sample_now or save_now):
                    continue
                # What follows needs this step's state, which the next step would consume (donated).
                report_step(*pending)
                pending = None
                if eval_now:
                    record, lines = evaluation.evaluate(params, step, checkpoint_meta(plan, batches, step))
                    faults.kill_point("eval", step)
                    metrics.write(step=step, **record)
                    if jax.process_index() == 0:
                        for line in lines:
                            bar.write(line)
                    plots.refresh()
                if sample_now:
                    for text in samples(params, config, run.tokenizer_path, plan.seed):
                        metrics.write(step=step, sample=text)
                        if jax.process_index() == 0:
                            bar.write(f"sample: {text!r}")
                if save_now:
                    checkpoint.save(mgr, step, params, checkpoint_meta(plan, batches, step), opt_state)
                    faults.kill_point("save", step)
                    saved_at = step
                if reason:
                    mgr.wait_until_finished()
                    log(f"\n{reason}: saved a checkpoint at step {step}; continue with --resume")
                    break
                clock.restart()  # the device idled while the host validated, sampled or saved
        finally:
            ahead.close()
            bar.close()
            try:
                mgr.wait_until_finished()
                mgr.close()
            finally:
                plots.close()
                evaluation.close()
    return step


def checkpoint_meta(plan, batches, step: int) -> dict:
    return {"step": step, "seed": plan.seed, "data_fingerprint": batches.fingerprint,
            "tokenizer_sha256": batches.tokenizer_sha256, "tokens": step * plan.tokens_per_step}


def samples(params, config, tokenizer_path: Path, seed: int, max_tokens: int = 40) -> list[str]:
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
