"""The accelerator benchmark: one prepared script a single GPU runs in under 8 minutes.

    python -m benchmarks.accelerator                       # GPU: nano and small at their recipes
    python -m benchmarks.accelerator --cpu --out /tmp/acc  # shrunken (pico shapes): the suite runs it

It measures, and writes to <out>/accelerator.{md,json} (default benchmarks/results/):
1. tok/s and MFU of the train step for nano and small at their recipes (bf16, the default remat,
   the recipe's rows per device and accumulation; random tokens), beside the reference's published
   per-GPU H100 figures;
2. peak device memory measured (memory_stats' peak_bytes_in_use) against --dry-run's prediction;
3. bf16 against float32: per-step training loss over 50 steps from the same init and batches;
4. kill-and-resume with --deterministic: a run SIGKILLed after a checkpoint and resumed logs the
   same per-step losses, bit for bit, as a straight run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from nanollama_base.cli import ArgumentParser, run_cli
from nanollama_jax.config import load_size
from nanollama_jax.loop import peak_flops
from nanollama_jax.training_setup import TrainingSetup

GIB = 1024**3
# The reference's published per-GPU H100 figures (REFERENCE.md: nanollama v0.2.0).
REFERENCE = {"nano": {"tok_s": 1.04e6, "mfu": 0.285, "gpus": 1}, "small": {"tok_s": 162e3, "mfu": 0.361, "gpus": 4}}
# What each mode runs: sizes for throughput (with overrides shrinking them on CPU), the size for the
# precision and resume checks, and step counts.
MODES = {
    "gpu": {"sizes": {"nano": {}, "small": {}}, "timed_steps": {"nano": 10, "small": 5},
            "check_size": "tiny", "check_overrides": {}, "precision_steps": 50, "resume_steps": 200},
    "cpu": {"sizes": {"pico": dict(batch_size=1, tokens_per_step=512)}, "timed_steps": {"pico": 3},
            "check_size": "pico", "check_overrides": dict(batch_size=1), "precision_steps": 12, "resume_steps": 24},
}


def throughput(size: str, overrides: dict, timed_steps: int) -> dict:
    """tok/s, MFU (ours: causal FLOPs; nanollama's convention: non-causal) and memory of the train
    step at the size's recipe on every local device."""
    config, recipe = load_size(size)
    setup = TrainingSetup.build(config, recipe, None, seed=0, **overrides)
    plan = setup.plan
    compiled, compile_s = setup.compiled_step
    predicted = setup.step_memory[1]
    rng = np.random.default_rng(0)
    with setup.activate():
        params, opt_state = setup.init_state()
        batches = [setup.train_batch(rng.integers(0, config.vocab_size, (plan.global_batch, plan.seq_len + 1),
                                                  dtype=np.int32)) for _ in range(2)]
        params, opt_state, out = compiled(params, opt_state, batches[0])  # warm-up
        float(out["loss"])
        start = time.perf_counter()
        for i in range(timed_steps):
            params, opt_state, out = compiled(params, opt_state, batches[i % 2])
        float(out["loss"])
        seconds = (time.perf_counter() - start) / timed_steps
    device = setup.mesh.devices.flat[0]
    n_dev = setup.mesh.devices.size
    peak = peak_flops(device)
    tok_s = plan.tokens_per_step / seconds
    stats = device.memory_stats() or {}
    return {"size": size, "device": getattr(device, "device_kind", device.platform), "devices": n_dev,
            "dtype": plan.config.dtype, "remat": plan.config.remat,
            "attention": plan.config.attention, "rows_per_device": plan.batch_size, "accum": plan.accum,
            "seq_len": plan.seq_len, "tokens_per_step": plan.tokens_per_step, "compile_s": compile_s,
            "step_s": seconds, "tok_s_per_device": tok_s / n_dev,
            "mfu": tok_s * plan.config.flops_per_token(plan.seq_len) / (peak * n_dev) if peak else None,
            "mfu_nanollama_convention": (tok_s * plan.config.flops_per_token(plan.seq_len, causal=False)
                                         / (peak * n_dev)) if peak else None,
            "predicted_peak_gib": predicted / GIB if predicted else None,
            "measured_peak_gib": stats["peak_bytes_in_use"] / GIB if "peak_bytes_in_use" in stats else None}


def precision(size: str, overrides: dict, data_dir: Path, steps: int) -> dict:
    """Per-step loss of bf16 and float32 training from the same init over the same batches."""
    from nanollama_jax.input import Batches, load_meta

    config, recipe = load_size(size)
    config = dataclasses.replace(config, vocab_size=load_meta(data_dir)["vocab_size"])
    curves = {}
    for dtype in ("float32", "bfloat16"):
        setup = TrainingSetup.build(config, recipe, None, steps=steps, dtype=dtype, seed=0, **overrides)
        data = Batches(data_dir, seq_len=setup.plan.seq_len, global_batch=setup.plan.global_batch, seed=0)
        with setup.activate():
            params, opt_state = setup.init_state()
            losses = []
            for k in range(steps):
                params, opt_state, out = setup.train_step(params, opt_state, setup.train_batch(data[k]))
                losses.append(float(out["loss"]))
        curves[dtype] = losses
    gap = np.abs(np.asarray(curves["bfloat16"]) - np.asarray(curves["float32"]))
    return {"size": size, "steps": steps, "curves": curves, "max_abs_gap": float(gap.max()),
            "final_gap": float(gap[-1])}


def kill_and_resume(size: str, data_dir: Path, steps: int, workdir: Path) -> dict:
    """A --deterministic run SIGKILLed after its first checkpoint and resumed, against a straight one."""
    save_every = max(1, steps // 4)
    base = [sys.executable, "-m", "nanollama_jax.train", "--size", size, "--data", str(data_dir), "--runs-dir",
            str(workdir), "--steps", str(steps), "--save-every", str(save_every), "--sample-every", "0",
            "--eval-batches", "1", "--eval-every", str(steps), "--log-every", str(steps), "--deterministic"]

    def losses(tag: str) -> dict:
        path = workdir / tag / "metrics.jsonl"
        rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    # children share the GPU with this process: no preallocation (JAX's default takes 75% of it)
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    straight = subprocess.Popen([*base, "--model-tag", "straight"], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)  # runs beside the killed one
    proc = subprocess.Popen([*base, "--model-tag", "killed"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if max(losses("killed"), default=0) > save_every:  # a checkpoint is behind it
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(losses("killed"), default=0)
    subprocess.run([*base, "--model-tag", "killed", "--resume"], env=env, check=True, capture_output=True)
    if straight.wait() != 0:
        raise RuntimeError(f"the straight run failed: {straight.stderr.read()[-2000:]}")
    straight, resumed = losses("straight"), losses("killed")
    return {"size": size, "steps": steps, "killed_after_step": killed_at, "saved_every": save_every,
            "bit_exact": straight == resumed and len(straight) == steps,
            "max_abs_diff": max((abs(straight[s] - resumed.get(s, np.inf)) for s in straight), default=None)}


def report(result: dict) -> str:
    md = ["# Accelerator benchmark", "",
          f"{result['mode']} mode on {result['device']} (jax {result['jax']}); {result['seconds']:.0f}s in all.", "",
          "## Throughput at the recipes (bf16, default remat, random tokens)", "",
          "| size | devices | rows x accum | tok/s per device | MFU (causal) | MFU (nanollama's count) | "
          "compile s | predicted peak GiB | measured peak GiB |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    pct = lambda v: f"{100 * v:.1f}%" if v is not None else "–"  # noqa: E731
    num = lambda v: f"{v:.2f}" if v is not None else "–"  # noqa: E731
    for r in result["throughput"]:
        md.append(f"| {r['size']} | {r['devices']} | {r['rows_per_device']} x {r['accum']} | {r['tok_s_per_device']:,.0f} | "
                  f"{pct(r['mfu'])} | {pct(r['mfu_nanollama_convention'])} | {r['compile_s']:.1f} | "
                  f"{num(r['predicted_peak_gib'])} | {num(r['measured_peak_gib'])} |")
    refs = [r for r in result["throughput"] if r["size"] in REFERENCE]
    if refs:
        md += ["", "Against the reference's published per-GPU H100 figures (nanollama, PyTorch; MFU in its own "
               "non-causal count):", "", "| size | reference tok/s per GPU | ours | ratio | reference MFU | ours |",
               "| --- | --- | --- | --- | --- | --- |"]
        for r in refs:
            ref = REFERENCE[r["size"]]
            md.append(f"| {r['size']} | {ref['tok_s']:,.0f} ({ref['gpus']} GPU) | {r['tok_s_per_device']:,.0f} | "
                      f"{r['tok_s_per_device'] / ref['tok_s']:.2f}x | {pct(ref['mfu'])} | "
                      f"{pct(r['mfu_nanollama_convention'])} |")
    p = result["precision"]
    md += ["", f"## bf16 against float32 ({p['size']}, {p['steps']} steps, same init and batches)", "",
           f"largest per-step loss gap {p['max_abs_gap']:.4f} nats; at the last step {p['final_gap']:.4f} "
           f"(float32 {p['curves']['float32'][-1]:.4f}, bf16 {p['curves']['bfloat16'][-1]:.4f})"]
    k = result["resume"]
    mid_run = k["saved_every"] < k["killed_after_step"] < k["steps"]
    md += ["", f"## Kill and resume with --deterministic ({k['size']}, {k['steps']} steps)", "",
           f"SIGKILLed after step {k['killed_after_step']}{'' if mid_run else ' (NOT mid-run: the check proves nothing)'}"
           ", resumed from its last checkpoint: per-step losses "
           f"{'bit-identical to' if k['bit_exact'] else 'DIFFERENT from'} a straight run "
           f"(largest difference {k['max_abs_diff']})"]
    return "\n".join(md) + "\n"


def run(args) -> None:
    start = time.perf_counter()
    mode = "cpu" if args.cpu else "gpu"
    if mode == "gpu" and jax.default_backend() != "gpu":
        raise ValueError(f"no GPU (jax's backend is {jax.default_backend()}); use --cpu for the shrunken mode")
    m = MODES[mode]
    if args.data:
        data_dir = Path(args.data)
    else:
        from data.prepare import ensure_builtin

        data_dir = ensure_builtin()
    rows = []
    for size, overrides in m["sizes"].items():
        print(f"throughput: {size} …", file=sys.stderr, flush=True)
        rows.append(throughput(size, overrides, m["timed_steps"][size]))
    print("bf16 vs float32 …", file=sys.stderr, flush=True)
    prec = precision(m["check_size"], m["check_overrides"], data_dir, m["precision_steps"])
    print("kill and resume …", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        resume = kill_and_resume(m["check_size"], data_dir, m["resume_steps"], Path(tmp))
    device = jax.devices()[0]
    result = {"mode": mode, "device": getattr(device, "device_kind", device.platform), "jax": jax.__version__,
              "seconds": time.perf_counter() - start, "throughput": rows, "precision": prec, "resume": resume,
              "reference": REFERENCE}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "accelerator.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "accelerator.md").write_text(report(result))
    print(report(result))


def main(argv=None):
    p = ArgumentParser(prog="python -m benchmarks.accelerator", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="the shrunken mode (pico shapes, a few steps): runs anywhere")
    p.add_argument("--data", help="prepared data for the precision and resume checks (default: the built-in corpus)")
    p.add_argument("--out", default="benchmarks/results", help="where accelerator.{md,json} go")
    args = p.parse_args(argv)
    run_cli(p.prog, lambda: run(args))


if __name__ == "__main__":
    main()
