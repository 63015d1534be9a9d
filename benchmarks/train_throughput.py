"""Training throughput: our jitted JAX step vs the PyTorch path (transformers' LlamaForCausalLM +
AdamW), same shapes, batch, sequence length and threads, side by side in one run; plus loss
curves of both from the same init over the same batches.

    python -m benchmarks.train_throughput              # nano shapes, seq 256, batch 8, fp32
    python -m benchmarks.train_throughput --quick      # fewer steps
    python -m benchmarks.train_throughput --reference ~/src/nanollama   # + the reference's own PyTorch step

With `--reference DIR` (a checkout of nanollama), its model and optimizers are imported from DIR
and run as they are (nothing of it is copied or committed), beside transformers.

Writes benchmarks/results/train_throughput.{json,md,png}.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from nanollama_base.cli import ArgumentParser, run_cli
from nanollama_jax import optim
from nanollama_jax.config import LlamaConfig, load_size
from nanollama_jax.model import init_params
from nanollama_jax.loop import cpu_gemm_flops
from nanollama_jax.plan import Plan
from nanollama_jax.training_setup import make_train_step

RESULTS = Path("benchmarks") / "results"  # under the working directory, never beside an installed file
THREADS = os.cpu_count() or 1


def jax_stepper(config: LlamaConfig, batches: list[np.ndarray], optimizer: str, schedule_steps: int):
    """A function i -> loss that runs our train step on batch i (state kept inside)."""
    b, t1 = batches[0].shape
    plan = Plan(config, schedule_steps, max(1, schedule_steps // 10), t1 - 1, b, 1, 1, 0, optimizer, 1.0, 0.0)
    tx = optim.make_optimizer(config, plan.steps, kind=optimizer, warmup=plan.warmup)
    params = init_params(config, 0)
    state = {"params": params, "opt": tx.init(params)}
    step = jax.jit(make_train_step(plan, tx), donate_argnums=(0, 1))

    def run(i: int) -> float:
        state["params"], state["opt"], out = step(state["params"], state["opt"], jnp.asarray(batches[i % len(batches)])[None])
        return float(out["loss"])

    return run


def torch_stepper(config: LlamaConfig, batches: list[np.ndarray], schedule_steps: int):
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
    rates = optim.group_rates(config, kind="adamw")
    groups = {"embed": [], "head": [], "norm": [], "matrix": []}
    for name, p in model.named_parameters():
        group = ("embed" if "embed_tokens" in name else "head" if "lm_head" in name
                 else "norm" if "norm" in name else "matrix")
        groups[group].append(p)
    opt = torch.optim.AdamW([{"params": ps, "lr": rates[g]} for g, ps in groups.items()],
                            betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)
    mult = optim.wsd_schedule(schedule_steps, max(1, schedule_steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: float(mult(s)))

    def run(i: int) -> float:
        tokens = torch.from_numpy(batches[i % len(batches)]).long()
        logits = model(tokens[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        return loss.item()

    return run


# What --reference needs from a nanollama checkout: its model module and these names in it.
REFERENCE_MODULE = "nanollama.llama"  # v0.1.0 to v0.3.0 alike
REFERENCE_NAMES = ("LlamaConfig", "Llama")


def import_reference(ref_dir: str | Path):
    """The reference's model module, imported from the checkout `ref_dir`; a ValueError naming
    what is missing when the folder is not such a checkout."""
    ref_dir = Path(ref_dir).expanduser().resolve()
    source = ref_dir / (REFERENCE_MODULE.replace(".", "/") + ".py")
    if not source.is_file():
        raise ValueError(f"{ref_dir}: not a nanollama checkout (no {source.relative_to(ref_dir)})")
    package = REFERENCE_MODULE.split(".")[0]
    for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        del sys.modules[name]  # another checkout imported earlier in this process
    sys.path.insert(0, str(ref_dir))
    try:
        module = importlib.import_module(REFERENCE_MODULE)
    except Exception as e:  # its own imports failing: say which
        raise ValueError(f"{source}: cannot import the reference model ({type(e).__name__}: {e})") from None
    finally:
        sys.path.remove(str(ref_dir))
    missing = [n for n in REFERENCE_NAMES if not hasattr(module, n)]
    if missing:
        raise ValueError(f"{source}: no {', '.join(missing)} in the reference model module")
    return module


def reference_stepper(module, config: LlamaConfig, batches: list[np.ndarray]):
    """The reference's own PyTorch path as its scripts/base_train.py takes it: its model with its
    init, and its `setup_optimizer` (one MuonAdamW: Muon for the hidden matrices, AdamW for the
    rest); one step per call."""
    import torch

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    ref_config = module.LlamaConfig(sequence_len=config.sequence_len, vocab_size=config.vocab_size,
                                    n_layer=config.n_layer, n_head=config.n_head, n_kv_head=config.n_kv_head,
                                    n_embd=config.n_embd)
    model = module.Llama(ref_config)
    model.init_weights()
    model.train()
    optimizer = model.setup_optimizer()

    def run(i: int) -> float:
        tokens = torch.from_numpy(batches[i % len(batches)]).long()
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        return loss.item()

    return run


def interleaved_speed(steppers: dict, tokens_per_step: int, rounds: int, warmup: int = 2) -> dict:
    """tokens/s of each stepper from the median step time, the paths taking turns step by step so
    that any other load on the machine falls on all of them alike."""
    times = {name: [] for name in steppers}
    for r in range(warmup + rounds):
        for name, run in steppers.items():
            start = time.perf_counter()
            run(r)
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: tokens_per_step / float(np.median(t)) for name, t in times.items()}


def make_batches(config: LlamaConfig, batch: int, seq: int, count: int) -> list[np.ndarray]:
    from data.prepare import ensure_builtin
    from nanollama_jax.input import Batches

    data = Batches(ensure_builtin(), seq_len=seq, global_batch=batch, seed=0)
    return [np.minimum(data[k], config.vocab_size - 1) for k in range(count)]


def main(argv=None):
    p = ArgumentParser(prog="python -m benchmarks.train_throughput", description=__doc__)
    p.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    p.add_argument("--reference", metavar="DIR", help="a checkout of the reference nanollama: also time its own "
                                                      "PyTorch model + Muon/AdamW step")
    args = p.parse_args(argv)
    run_cli(p.prog, lambda: benchmark(args))


def benchmark(args) -> None:
    reference = import_reference(args.reference) if args.reference else None  # before any long work
    speed_steps, curve_steps = (3, 40) if args.quick else (10, 300)

    # 1. throughput at nano shapes (vocab 32000), seq 256, batch 8, fp32
    nano = dataclasses.replace(load_size("nano")[0], sequence_len=256)
    speed_batches = make_batches(nano, 8, 256, speed_steps)
    gemm = cpu_gemm_flops()
    flops = nano.flops_per_token(256)
    steppers = {"jax_adamw": jax_stepper(nano, speed_batches, "adamw", 1000),
                "jax_muon": jax_stepper(nano, speed_batches, "muon", 1000),
                "torch_adamw": torch_stepper(nano, speed_batches, 1000)}
    if reference is not None:
        steppers["nanollama_muon"] = reference_stepper(reference, nano, speed_batches)
    tok_s = interleaved_speed(steppers, 8 * 256, speed_steps)
    speed = {}
    for name, rate in tok_s.items():
        speed[name] = {"tokens_per_sec": rate, "share_of_gemm_peak": rate * flops / gemm}
        print(f"{name:12s} {rate:8.1f} tok/s  ({100 * rate * flops / gemm:.0f}% of the {gemm / 1e9:.0f} GFLOP/s GEMM peak)")

    # 2. loss curves, tiny shapes, same init and batches
    tiny = dataclasses.replace(load_size("tiny")[0], sequence_len=128)
    curve_batches = make_batches(tiny, 8, 128, curve_steps)
    curves = {}
    for name, run in [("jax_adamw", jax_stepper(tiny, curve_batches, "adamw", curve_steps)),
                      ("jax_muon", jax_stepper(tiny, curve_batches, "muon", curve_steps)),
                      ("torch_adamw", torch_stepper(tiny, curve_batches, curve_steps))]:
        curves[name] = [run(i) for i in range(curve_steps)]

    ratio = speed["jax_adamw"]["tokens_per_sec"] / speed["torch_adamw"]["tokens_per_sec"]
    result = {"machine": {"cpus": os.cpu_count(), "threads": THREADS, "gemm_flops": gemm,
                          "jax": jax.__version__, "backend": jax.default_backend()},
              "throughput": {"shape": "nano (12 x 384, vocab 32000), seq 256, batch 8, fp32", **speed,
                             "ratio_jax_adamw_to_torch_adamw": ratio,
                             "ratio_jax_muon_to_torch_adamw": speed["jax_muon"]["tokens_per_sec"]
                             / speed["torch_adamw"]["tokens_per_sec"],
                             **({"ratio_jax_muon_to_nanollama_muon": speed["jax_muon"]["tokens_per_sec"]
                                 / speed["nanollama_muon"]["tokens_per_sec"]} if "nanollama_muon" in speed else {})},
              "loss_curves": {"shape": "tiny (4 x 256, vocab 4096), seq 128, batch 8", **curves}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    md = ["# Training throughput: JAX vs transformers + AdamW (CPU, fp32)", "",
          f"{os.cpu_count()} CPUs, {THREADS} threads, measured fp32 GEMM peak {gemm / 1e9:.0f} GFLOP/s; "
          "nano shapes, seq 256, batch 8; the paths take turns step by step (so other load falls on all "
          "alike); median step time, compile and first steps excluded."
          + (" nanollama_muon is the reference's own model and MuonAdamW step, imported from --reference."
             if "nanollama_muon" in speed else ""), "",
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
    ax_speed.bar(names, [speed[n]["tokens_per_sec"] for n in names],
                 color=["tab:blue", "tab:green", "tab:orange", "tab:red"][:len(names)])
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
