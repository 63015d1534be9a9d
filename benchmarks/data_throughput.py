"""Data pipeline throughput on the built-in corpus.

    python -m benchmarks.data_throughput            # writes benchmarks/results/data_throughput.{json,md,png}

Measures:
* preparing the built-in corpus from nothing (``ensure_builtin``, vocab 4096), wall time;
* tokenisation throughput (tokens/s) of ``data.prepare``'s worker path with 1 and 2
  processes, on the built-in corpus repeated to ~20 MB so pool start-up does not dominate;
* loader throughput (batches/s and tokens/s) of ``nanollama_jax.input.Batches`` for a few
  shapes, plain and with a personality mix, reading random batch indices (as a resumed run
  would) from the memory-mapped shards.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

import numpy as np

RESULTS = pathlib.Path("benchmarks") / "results"  # under the working directory, never beside an installed file


def bench_prepare_builtin(home: pathlib.Path) -> dict:
    from data.prepare import ensure_builtin
    from nanollama_base.shards import load_meta

    t0 = time.perf_counter()
    path = ensure_builtin(4096, home=home, log=lambda m: None)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    ensure_builtin(4096, home=home, log=lambda m: None)
    warm = time.perf_counter() - t0
    meta = load_meta(path)
    return {"path": str(path), "cold_seconds": cold, "cached_seconds": warm,
            "train_tokens": meta["train"]["tokens"], "val_tokens": meta["val"]["tokens"],
            "train_bytes": meta["train"]["bytes"], "val_bytes": meta["val"]["bytes"]}


def _cpu() -> float:
    """CPU seconds used by this process and its (finished) children."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _burn(n: int) -> int:
    x = 0
    for i in range(n):
        x += i * i
    return x


def machine_parallelism(n: int = 5_000_000) -> float:
    """Speed-up of 2 processes of pure-Python work over 1 on this machine right now (2.0 on
    two idle cores; less when other jobs share them): the ceiling for the 2-process row."""
    import multiprocessing

    t0 = time.perf_counter()
    _burn(n)
    one = time.perf_counter() - t0
    with multiprocessing.get_context("fork").Pool(2) as pool:
        t0 = time.perf_counter()
        pool.map(_burn, [n, n])
        two = time.perf_counter() - t0
    return 2 * one / two


def bench_tokenize(model: bytes, repeat: int, workers_list) -> list[dict]:
    from data import builtin
    from data.encode import document_chunks, encode_chunk, ordered_map

    docs = list(builtin.documents()) * repeat
    chunks = list(document_chunks(((d, 0) for d in docs), val_fraction=0.0))
    nbytes = sum(len(d.encode()) for d in docs)
    out = []
    for workers in workers_list:
        best = cpu_best = None
        for _ in range(2):
            c0 = _cpu()
            t0 = time.perf_counter()
            tokens = sum(len(r[0]) + len(r[1]) for r in ordered_map(encode_chunk, chunks, workers, model))
            dt = time.perf_counter() - t0
            cpu = _cpu() - c0
            best = dt if best is None else min(best, dt)
            cpu_best = cpu if cpu_best is None else min(cpu_best, cpu)
        out.append({"workers": workers, "seconds": best, "tokens": tokens, "bytes": nbytes,
                    "tokens_per_s": tokens / best, "mb_per_s": nbytes / best / 1e6,
                    "cpu_seconds": cpu_best, "tokens_per_cpu_s": tokens / cpu_best})
    return out


def bench_loader(path: pathlib.Path, personality: pathlib.Path) -> list[dict]:
    from nanollama_jax.input import Batches

    shapes = [(256, 32, 0.0), (1024, 8, 0.0), (2048, 32, 0.0), (256, 32, 0.2)]
    rng = np.random.default_rng(0)
    out = []
    for seq_len, batch, ratio in shapes:
        b = Batches(path, seq_len=seq_len, global_batch=batch, seed=0,
                    personality_dir=personality if ratio else None, personality_ratio=ratio)
        ks = rng.integers(0, 10**6, size=400)
        b[int(ks[0])]
        t0 = time.perf_counter()
        for k in ks:
            b[int(k)]
        dt = time.perf_counter() - t0
        out.append({"seq_len": seq_len, "global_batch": batch, "personality_ratio": ratio,
                    "batches_per_s": len(ks) / dt, "tokens_per_s": len(ks) * batch * seq_len / dt})
    return out


def write_results(res: dict, outdir: pathlib.Path) -> None:
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "data_throughput.json").write_text(json.dumps(res, indent=2) + "\n")
    p = res["prepare_builtin"]
    lines = [
        "# Data pipeline throughput",
        "",
        f"Machine: {res['machine']['cpus']} CPUs ({res['machine']['processor']}), Python {res['machine']['python']}, "
        f"shared with other jobs while measured (1-minute load average {res['machine']['load_average_1min_at_start']:.1f} "
        f"at start, {res['machine']['load_average_1min_at_end']:.1f} at end: numbers are lower bounds, and the "
        f"2-process tokenisation cannot show its scaling on a saturated 2-core machine). "
        f"Command: `python -m benchmarks.data_throughput`.",
        "",
        "## Built-in corpus, prepared from nothing (`ensure_builtin(4096)`)",
        "",
        f"- cold: **{p['cold_seconds']:.1f} s** (read stdlib docstrings + pydoc topics, train 4096-piece BPE, tokenise, write shards)",
        f"- cached: {p['cached_seconds'] * 1000:.0f} ms",
        f"- {p['train_tokens']:,} training tokens, {p['val_tokens']:,} validation tokens, "
        f"{(p['train_bytes'] + p['val_bytes']) / 1e6:.2f} MB of text "
        f"({(p['val_bytes'] / p['val_tokens']):.2f} bytes/token on val)",
        "",
        f"## Tokenisation (corpus repeated {res['tokenize_repeat']}x, 4096-piece BPE)",
        "",
        "| processes | tokens/s (wall) | MB/s | seconds | CPU seconds | tokens per CPU-second |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for t in res["tokenize"]:
        lines.append(f"| {t['workers']} | {t['tokens_per_s']:,.0f} | {t['mb_per_s']:.2f} | {t['seconds']:.2f} | "
                     f"{t['cpu_seconds']:.2f} | {t['tokens_per_cpu_s']:,.0f} |")
    sp = res["machine_2proc_speedup"]
    lines += ["", f"Available parallelism while measuring: 2 processes of pure-Python work ran "
              f"{sp[0]:.2f}x / {sp[1]:.2f}x (before / after) the speed of one (2.0 on two idle cores). "
              "Tokens per CPU-second staying level from 1 to 2 processes means the work splits without "
              "overhead: on an idle machine wall-clock throughput scales with the processes the cores can run."]
    lines += ["", "## Loader (`Batches[k]`, random k, memory-mapped shards)", "",
              "| seq_len | global batch | personality | batches/s | tokens/s |", "| --- | --- | --- | --- | --- |"]
    for l in res["loader"]:
        lines.append(f"| {l['seq_len']} | {l['global_batch']} | {l['personality_ratio']:.0%} | "
                     f"{l['batches_per_s']:,.0f} | {l['tokens_per_s']:,.0f} |")
    lines.append("")
    (outdir / "data_throughput.md").write_text("\n".join(lines))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    t = res["tokenize"]
    xs = np.arange(len(t))
    axes[0].bar(xs - 0.2, [x["tokens_per_s"] / 1e6 for x in t], 0.4, color="#4c72b0", label="wall clock")
    axes[0].bar(xs + 0.2, [x["tokens_per_cpu_s"] / 1e6 for x in t], 0.4, color="#8172b2", label="per CPU-second")
    axes[0].set_xticks(xs, [str(x["workers"]) for x in t])
    axes[0].set_xlabel(f"tokeniser processes (machine's 2-process speed-up now: {sp[0]:.2f}x)")
    axes[0].set_ylabel("million tokens / s")
    axes[0].set_title("Tokenisation (built-in corpus)")
    axes[0].legend()
    l = res["loader"]
    labels = [f"{x['seq_len']}x{x['global_batch']}" + (" +pers" if x["personality_ratio"] else "") for x in l]
    axes[1].bar(labels, [x["tokens_per_s"] / 1e6 for x in l], color="#55a868")
    axes[1].set_ylabel("million tokens / s")
    axes[1].set_title("Loader: Batches[k] (seq_len x batch)")
    fig.tight_layout()
    fig.savefig(outdir / "data_throughput.png", dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.data_throughput", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(RESULTS), help="results folder (default benchmarks/results)")
    ap.add_argument("--repeat", type=int, default=9, help="repeat the built-in corpus this many times for tokenisation")
    args = ap.parse_args(argv)
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        print("preparing the built-in corpus from nothing …", flush=True)
        prep = bench_prepare_builtin(tmp)
        path = pathlib.Path(prep["path"])
        print(f"  {prep['cold_seconds']:.1f}s", flush=True)
        print("tokenisation, 1 and 2 processes …", flush=True)
        par_before = machine_parallelism()
        tokenize = bench_tokenize((path / "tokenizer.model").read_bytes(), args.repeat, [1, 2])
        par_after = machine_parallelism()
        for t in tokenize:
            print(f"  {t['workers']} process(es): {t['tokens_per_s']:,.0f} tokens/s", flush=True)
        from data.prepare_personality import prepare_personality
        pfile = tmp / "persona.jsonl"
        pfile.write_text("\n".join(json.dumps({"user": f"Question {i}?", "assistant": f"Answer number {i}, kindly."})
                                   for i in range(200)) + "\n")
        pers = prepare_personality([pfile], path, tmp / "persona", progress=False, log=lambda m: None)
        print("loader …", flush=True)
        loader = bench_loader(path, pers)
        for x in loader:
            print(f"  seq {x['seq_len']} batch {x['global_batch']} pers {x['personality_ratio']}: "
                  f"{x['batches_per_s']:,.0f} batches/s", flush=True)
        prep.pop("path")
    res = {"machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                       "load_average_1min_at_end": os.getloadavg()[0], "load_average_1min_at_start": load0,
                       "python": platform.python_version(), "platform": platform.platform()},
           "prepare_builtin": prep, "tokenize_repeat": args.repeat,
           "machine_2proc_speedup": [par_before, par_after], "tokenize": tokenize, "loader": loader}
    write_results(res, pathlib.Path(args.out))
    print(f"wrote {args.out}/data_throughput.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
