"""The soak run behind benchmarks/soak.py and its short version in tests/test_robust.py: a tiny
training run SIGKILLed at chosen moments, resumed each time, compared with an uninterrupted run.

Kills land during a step, during a save, during a metrics write and during an evaluation: half
of them at a moment the watching parent picks (a random delay into the run, or the instant a
checkpoint's temporary folder appears), half at an exact point inside the child
(NANOLLAMA_KILL_AT, see nanollama_jax/faults.py; the metrics one tears the line it is writing).
After every kill each checkpoint left on disk must restore (and verify), and the next run resumes
from the newest one. The final run's training and validation losses must equal the
uninterrupted run's bit for bit.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from nanollama_base.cli import Progress

PHASES = ("step", "save", "metrics", "eval")


def train_cmd(data: Path, runs: Path, tag: str, steps: int, every: int) -> list[str]:
    return [sys.executable, "-m", "nanollama_jax.train", "--size", "pico", "--mesh", "1x1", "--data", str(data),
            "--runs-dir", str(runs), "--model-tag", tag, "--steps", str(steps), "--save-every", str(every),
            "--eval-every", str(every), "--eval-batches", "2", "--sample-every", "0", "--log-every", "1000",
            "--resume"]


def curves(run_dir: Path) -> dict:
    from nanollama_jax.metrics import read_metrics

    path = run_dir / "metrics.jsonl"
    rows = read_metrics(path, warn=lambda _: None) if path.exists() else []
    return {"loss": {r["step"]: r["loss"] for r in rows if "loss" in r},
            "val_loss": {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}}


def reached(run_dir: Path) -> int:
    return max(curves(run_dir)["loss"], default=0)


def all_checkpoints_restore(run_dir: Path) -> tuple[list[int], list[str]]:
    """The saved steps, and a line for each one that does not restore."""
    from nanollama_jax import checkpoint

    steps, bad = checkpoint.saved_steps(run_dir), []
    for step in steps:
        try:
            checkpoint.load_params(run_dir, step)
        except Exception as e:  # any failure to read is what the soak exists to find
            bad.append(f"step {step}: {type(e).__name__}: {e}")
    return steps, bad


def redone_bound(reached: int, every: int) -> int:
    """The most steps a kill after step `reached` may cost: those since the last save began (a
    kill during the evaluation or metrics of a save step lands before that step's save), plus the
    interval an async save still in flight was writing."""
    return reached - ((reached - 1) // every) * every + every if reached else 0


def one_kill(cmd: list[str], run_dir: Path, phase: str, how: str, target: int, rng: random.Random) -> str:
    """Run `cmd` until the planned kill; returns what happened ('killed' or 'finished')."""
    env = dict(os.environ)
    if how == "inject":
        env["NANOLLAMA_KILL_AT"] = f"{phase}@{target}"
    start = reached(run_dir)
    ckpt = run_dir / "checkpoints"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if how == "inject":
            proc.wait(timeout=900)
            return "killed" if proc.returncode == -signal.SIGKILL else f"exited {proc.returncode}"
        if how == "timer":  # once the loop runs: a random moment within the next second or so
            while proc.poll() is None and reached(run_dir) <= start:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 1.5))
        else:  # "watch": the instant orbax starts writing a checkpoint past the resume point
            while proc.poll() is None and not any(p.name.split(".")[0].isdigit() and int(p.name.split(".")[0]) > start
                                                  and "tmp" in p.name for p in ckpt.glob("*")):
                time.sleep(0.002)
        if proc.poll() is not None:
            return "finished" if proc.returncode == 0 else f"exited {proc.returncode}"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return "killed"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def soak(data: Path, workdir: Path, kills: int = 20, steps: int = 80, every: int = 5, seed: int = 0,
         reference: Path | None = None, log=print) -> dict:
    """Run the soak; returns its figures (see the module docstring)."""
    from nanollama_jax import checkpoint

    rng = random.Random(seed)
    if reference is None:
        subprocess.run(train_cmd(data, workdir, "uninterrupted", steps, every), check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        reference = workdir / "uninterrupted"
    run_dir = workdir / "soaked"
    cmd = train_cmd(data, workdir, "soaked", steps, every)
    plan = [PHASES[i % len(PHASES)] for i in range(kills)]
    rng.shuffle(plan)
    records, unreadable = [], []
    bar = Progress(kills, desc="kills", unit="kill", log=log)
    for i, phase in enumerate(plan):
        resume = max(checkpoint.saved_steps(run_dir), default=0)
        how = "inject" if i % 2 else {"step": "timer", "save": "watch"}.get(phase, "inject")
        if phase == "eval" or (phase == "save" and how == "inject"):  # those happen every `every` steps
            aligned = [s for s in range(resume + 1, steps) if s % every == 0] or [resume + 1]
            target = aligned[min(rng.randint(0, 1), len(aligned) - 1)]
        else:
            target = min(resume + rng.randint(1, 2 * every), steps - 1)
        outcome = one_kill(cmd, run_dir, phase, how, target, rng)
        last = reached(run_dir)
        saved, bad = all_checkpoints_restore(run_dir)
        unreadable += bad
        new_resume = saved[-1] if saved else 0
        bound = redone_bound(last, every)
        records.append({"kill": i + 1, "phase": phase, "how": how, "target_step": target if how == "inject" else None,
                        "outcome": outcome, "resumed_from": resume, "reached": last, "checkpoint_after": new_resume,
                        "redone_next": last - new_resume, "redone_bound": bound, "checkpoints": saved})
        bar.update(1)
        if outcome == "finished":
            break
    final = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if final.returncode:
        raise RuntimeError(f"the final resume failed: {final.stderr[-2000:]}")
    ours, ref = curves(run_dir), curves(reference)
    mismatches = sum(ours[k].get(s) != v for k in ref for s, v in ref[k].items())
    mismatches += sum(s not in ref[k] for k in ours for s in ours[k])
    killed = sum(r["outcome"] == "killed" for r in records)
    return {"kills_planned": kills, "kills_survived": killed, "steps": steps, "save_every": every,
            "by_phase": {p: sum(r["phase"] == p and r["outcome"] == "killed" for r in records) for p in PHASES},
            "steps_redone_total": sum(r["redone_next"] for r in records),
            "steps_redone_max": max((r["redone_next"] for r in records), default=0),
            "redone_over_bound": sum(r["redone_next"] > r["redone_bound"] for r in records),
            "unreadable_checkpoints": unreadable, "loss_mismatches": mismatches,
            "steps_compared": sum(len(v) for v in ref.values()), "kills": records}
