"""Training throughput: our jitted JAX step vs the PyTorch path (transformers' LlamaForCausalLM +
AdamW), same shapes, batch, sequence length and threads, side by side in one run; plus loss
curves of both from the same init over the same batches.

    python -m benchmarks.train_throughput              # nano shapes, seq 256, batch 8, fp32
    python -m benchmarks.train_throughput --quick      # fewer steps

Writes benchmarks/results/train_throughput.{json,md,png}.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from nanollama_jax import optim
from nanollama_jax.config import LlamaConfig, load_size
from nanollama_jax.model import init_params
from nanollama_jax.train import Plan, cpu_gemm_flops, make_train_step

RESULTS = Path(__file__).parent / "results"
THREADS = os.cpu_count() or 1


def jax_run(config: LlamaConfig, batches: list[np.ndarray], optimizer: str, steps: int, warmup_steps: int,
            schedule_steps: int):
    """Per-step losses and tokens/s (compile excluded) of our train step."""
    b, t1 = batches[0].shape
    plan = Plan(config, schedule_steps, max(1, schedule_steps // 10), t1 - 1, b, 1, 1, 0, optimizer, 1.0, 0.0)
    tx = optim.make_optimizer(config, plan.steps, kind=optimizer, warmup=plan.warmup)
    params = init_params(config, 0)
    opt_state = tx.init(params)
    step = jax.jit(make_train_step(plan, tx), donate_argnums=(0, 1))
    losses, times = [], []
    for i in range(steps):
        batch = jnp.asarray(batches[i % len(batches)])[None]
        start = time.perf_counter()
        params, opt_state, out = step(params, opt_state, batch)
        losses.append(float(out["loss"]))
        times.append(time.perf_counter() - start)
    return losses, b * (t1 - 1) / float(np.median(times[warmup_steps:]))


def torch_run(config: LlamaConfig, batches: list[np.ndarray], steps: int, warmup_steps: int, schedule_steps: int):
    """The same model (our init, through the HF export) trained by transformers + torch AdamW with
    nanollama's AdamW groups and the same WSD schedule and clipping."""
    import torch
    from transformers import LlamaForCausalLM

    from export.hf import save_hf

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(init_params(config, 0), config, tmp)
        model = LlamaForCausalLM.from_pretrained(tmp, torch_dtype=torch.float32)
    model.train()
    rates = optim.group_rates(config)
    rates["matrix"] = 10 * rates["head"]  # as our --optimizer adamw
    groups = {"embed": [], "head": [], "norm": [], "matrix": []}
    for name, p in model.named_parameters():
        group = ("embed" if "embed_tokens" in name else "head" if "lm_head" in name
                 else "norm" if "norm" in name else "matrix")
        groups[group].append(p)
    opt = torch.optim.AdamW([{"params": ps, "lr": rates[g]} for g, ps in groups.items()],
                            betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)
    mult = optim.wsd_schedule(schedule_steps, max(1, schedule_steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: float(mult(s)))
    losses, times = [], []
    for i in range(steps):
        tokens = torch.from_numpy(batches[i % len(batches)]).long()
        start = time.perf_counter()
        logits = model(tokens[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        times.append(time.perf_counter() - start)
    return losses, tokens.shape[0] * (tokens.shape[1] - 1) / float(np.median(times[warmup_steps:]))


def make_batches(config: LlamaConfig, batch: int, seq: int, count: int) -> list[np.ndarray]:
    from data.prepare import ensure_builtin
    from nanollama_jax.data import Batches

    data = Batches(ensure_builtin(), seq_len=seq, global_batch=batch, seed=0)
    return [np.minimum(data[k], config.vocab_size - 1) for k in range(count)]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    args = p.parse_args(argv)
    speed_steps, curve_steps = (4, 40) if args.quick else (8, 300)

    # 1. throughput at nano shapes (vocab 32000), seq 256, batch 8, fp32
    nano = dataclasses.replace(load_size("nano")[0], sequence_len=256)
    speed_batches = make_batches(nano, 8, 256, speed_steps)
    gemm = cpu_gemm_flops()
    flops = nano.flops_per_token(256)
    speed = {}
    for name, fn in [("jax_adamw", lambda: jax_run(nano, speed_batches, "adamw", speed_steps, 2, 1000)),
                     ("jax_muon", lambda: jax_run(nano, speed_batches, "muon", speed_steps, 2, 1000)),
                     ("torch_adamw", lambda: torch_run(nano, speed_batches, speed_steps, 2, 1000))]:
        _, tok_s = fn()
        speed[name] = {"tokens_per_sec": tok_s, "share_of_gemm_peak": tok_s * flops / gemm}
        print(f"{name:12s} {tok_s:8.1f} tok/s  ({100 * tok_s * flops / gemm:.0f}% of the {gemm / 1e9:.0f} GFLOP/s GEMM peak)")

    # 2. loss curves, tiny shapes, same init and batches
    tiny = dataclasses.replace(load_size("tiny")[0], sequence_len=128)
    curve_batches = make_batches(tiny, 8, 128, curve_steps)
    curves = {"jax_adamw": jax_run(tiny, curve_batches, "adamw", curve_steps, 1, curve_steps)[0],
              "jax_muon": jax_run(tiny, curve_batches, "muon", curve_steps, 1, curve_steps)[0],
              "torch_adamw": torch_run(tiny, curve_batches, curve_steps, 1, curve_steps)[0]}

    ratio = speed["jax_adamw"]["tokens_per_sec"] / speed["torch_adamw"]["tokens_per_sec"]
    result = {"machine": {"cpus": os.cpu_count(), "threads": THREADS, "gemm_flops": gemm,
                          "jax": jax.__version__, "backend": jax.default_backend()},
              "throughput": {"shape": "nano (12 x 384, vocab 32000), seq 256, batch 8, fp32", **speed,
                             "ratio_jax_adamw_to_torch_adamw": ratio,
                             "ratio_jax_muon_to_torch_adamw": speed["jax_muon"]["tokens_per_sec"]
                             / speed["torch_adamw"]["tokens_per_sec"]},
              "loss_curves": {"shape": "tiny (4 x 256, vocab 4096), seq 128, batch 8", **curves}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "train_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    md = ["# Training throughput: JAX vs transformers + AdamW (CPU, fp32)", "",
          f"{os.cpu_count()} CPUs, {THREADS} threads, measured fp32 GEMM peak {gemm / 1e9:.0f} GFLOP/s; "
          "nano shapes, seq 256, batch 8; median step time, compile / first steps excluded.", "",
          "| path | tok/s | share of GEMM peak | ratio to torch |", "| --- | --- | --- | --- |"]
    for name, row in speed.items():
        md.append(f"| {name} | {row['tokens_per_sec']:.1f} | {100 * row['share_of_gemm_peak']:.0f}% | "
                  f"{row['tokens_per_sec'] / speed['torch_adamw']['tokens_per_sec']:.2f}x |")
    md += ["", f"Final losses after {curve_steps} steps on the built-in corpus (tiny shapes, same init and batches): "
           + ", ".join(f"{k} {np.mean(v[-10:]):.3f}" for k, v in curves.items()), ""]
    (RESULTS / "train_throughput.md").write_text("\n".join(md) + "\n")
    plot(speed, curves)
    print(json.dumps(result["throughput"], indent=2))


def plot(speed: dict, curves: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_speed, ax_loss) = plt.subplots(1, 2, figsize=(12, 4))
    names = list(speed)
    ax_speed.bar(names, [speed[n]["tokens_per_sec"] for n in names], color=["tab:blue", "tab:green", "tab:orange"])
    ax_speed.set(title="training tokens/s, nano shapes (CPU, fp32)", ylabel="tokens/s")
    for name, losses in curves.items():
        smooth = np.convolve(losses, np.ones(5) / 5, mode="valid")
        ax_loss.plot(np.arange(len(smooth)) + 3, smooth, label=name)
    ax_loss.set(title="training loss, tiny shapes, same init and batches", xlabel="step", ylabel="loss")
    ax_loss.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "train_throughput.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
