"""Decode and prefill speed of the Go engine (go/) next to llama.cpp (llama-cpp-python)
on the same nano-sized GGUF (12 layers, d 384, 6 heads, vocab 32000, random weights)
in F16, Q8_0 and Q4_0, with the same number of threads, in one run.

    python -m benchmarks.go_engine                                   # 2 threads, 128 + 128 tokens
    python -m benchmarks.go_engine --threads 1,2 --repeats 5 --gen 256

Writes benchmarks/results/go_engine.{json,md,png}."""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import gguf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import go_fixtures as F  # noqa: E402
from nanollama_base.cli import ArgumentParser, run_cli  # noqa: E402

NANO = dict(dim=384, n_layer=12, n_head=6, n_kv=6, head_dim=64, ffn=1024)
VOCAB = 32000


def fake_vocab(n: int):
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tokens += [f"\u2581t{i}" for i in range(n - len(tokens))]
    types = [2, 3, 3] + [6] * 256 + [1] * (n - 259)
    scores = [0.0] * 259 + [-float(i) for i in range(n - 259)]
    return tokens, scores, types


def build_models(workdir: Path) -> dict:
    params = F.random_params(vocab=VOCAB, **NANO, seed=0)
    vocab = fake_vocab(VOCAB)
    out = {}
    for qt in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0):
        out[qt.name] = F.write_model(workdir / f"nano-{qt.name}.gguf", params, vocab, qtype=qt,
                                     n_head=NANO["n_head"], n_kv=NANO["n_kv"], ctx=2048)
    return out


def bench_llama_cpp(model: Path, ids: list[int], n_gen: int, threads: int) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(model), n_ctx=1024, n_threads=threads, n_threads_batch=threads,
                          n_batch=512, seed=0, verbose=False)
    try:
        llm.eval(ids[:8])  # warm-up
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        prefill = time.perf_counter() - t0
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        decode = 0.0
        for _ in range(n_gen):
            t0 = time.perf_counter()
            llm.eval([tok])
            decode += time.perf_counter() - t0
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        return {"prefill_tok_s": len(ids) / prefill, "decode_tok_s": n_gen / decode}
    finally:
        llm.close()


STATS = re.compile(r"(\d+) tokens in ([\d.]+)s: ([\d.]+) tok/s \(prefill (\d+) tokens at ([\d.]+) tok/s\)")


def bench_go(binary: Path, model: Path, ids_path: Path, n_gen: int, threads: int) -> dict:
    r = subprocess.run([str(binary), "--model", str(model), "--tokens", str(ids_path), "--max-tokens", str(n_gen),
                        "--temp", "0", "--ignore-eos", "--threads", str(threads), "--ctx", "1024"],
                       capture_output=True, text=True, errors="replace", check=True)
    m = STATS.search(r.stderr)
    assert m, r.stderr
    n = int(m.group(1))
    assert n == n_gen, r.stderr
    return {"prefill_tok_s": float(m.group(5)), "decode_tok_s": float(m.group(3))}


def thread_counts(text: str) -> list[int]:
    try:
        counts = [int(t) for t in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of thread counts, e.g. 1,2")
    return counts


def main(argv=None):
    ap = ArgumentParser(prog="python -m benchmarks.go_engine", description=__doc__)
    ap.add_argument("--threads", type=thread_counts, default=[2], help="comma-separated thread counts, e.g. 1,2")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens (prefill)")
    ap.add_argument("--gen", type=int, default=128, help="generated tokens (decode)")
    ap.add_argument("--repeats", type=int, default=2, help="best of N runs per engine")
    ap.add_argument("--out", type=Path, default=Path("benchmarks") / "results")  # under the working directory
    args = ap.parse_args(argv)
    run_cli(ap.prog, lambda: benchmark(args))


def benchmark(args) -> None:
    start_load = list(os.getloadavg())

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        binary = tmp / "nanollama"
        subprocess.run(["go", "build", "-o", str(binary), "."], cwd=ROOT / "go", check=True)
        models = build_models(tmp)
        rng = np.random.default_rng(0)
        ids = [1] + rng.integers(259, VOCAB, args.prompt - 1).tolist()
        ids_path = tmp / "ids.npy"
        np.save(ids_path, np.array(ids, np.int32))
        rows = []
        for threads, (qt, path) in ((t, m) for t in args.threads for m in models.items()):
            best = {}
            for name, fn in (("llama.cpp", lambda: bench_llama_cpp(path, ids, args.gen, threads)),
                             ("go", lambda: bench_go(binary, path, ids_path, args.gen, threads))):
                runs = [fn() for _ in range(args.repeats)]
                best[name] = {k: max(r[k] for r in runs) for k in runs[0]}
            row = {"type": qt, "threads": threads, "size_mb": round(path.stat().st_size / 2**20, 1),
                   "llama_cpp": best["llama.cpp"], "go": best["go"],
                   "decode_ratio": best["go"]["decode_tok_s"] / best["llama.cpp"]["decode_tok_s"],
                   "prefill_ratio": best["go"]["prefill_tok_s"] / best["llama.cpp"]["prefill_tok_s"]}
            rows.append(row)
            print(f"{qt:5s} {threads} threads  decode go {row['go']['decode_tok_s']:7.1f} tok/s, llama.cpp "
                  f"{row['llama_cpp']['decode_tok_s']:7.1f} tok/s ({row['decode_ratio']:.2f}x)   prefill go "
                  f"{row['go']['prefill_tok_s']:7.1f}, llama.cpp {row['llama_cpp']['prefill_tok_s']:7.1f} "
                  f"({row['prefill_ratio']:.2f}x)", flush=True)

    import llama_cpp

    meta = {"model": {"shape": NANO, "vocab": VOCAB, "weights": "random"}, "threads": args.threads,
            "load_average_at_start": start_load,
            "prompt_tokens": args.prompt, "generated_tokens": args.gen, "repeats": args.repeats,
            "llama_cpp_python": llama_cpp.__version__,
            "go": subprocess.run(["go", "version"], capture_output=True, text=True).stdout.strip(),
            "cpu": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d"),
            "load_average_at_end": list(os.getloadavg()), "cores": os.cpu_count()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "go_engine.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    threads = ",".join(map(str, args.threads))
    lines = [f"# Go engine vs llama.cpp: nano-sized GGUF (12 layers, d 384, vocab 32000), threads {threads}",
             "",
             f"Prompt {args.prompt} tokens, then {args.gen} generated tokens (greedy); best of {args.repeats}. "
             f"llama-cpp-python {meta['llama_cpp_python']}, {meta['go']}; {meta['cores']} cores, "
             f"load average {meta['load_average_at_start'][0]:.1f} at the start and "
             f"{meta['load_average_at_end'][0]:.1f} at the end of the run (other work on the machine slows "
             "llama.cpp's spinning threads more than Go's).",
             "",
             "| type | threads | file MB | decode go tok/s | decode llama.cpp tok/s | decode ratio | "
             "prefill go tok/s | prefill llama.cpp tok/s | prefill ratio |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['type']} | {r['threads']} | {r['size_mb']} | {r['go']['decode_tok_s']:.1f} | "
                     f"{r['llama_cpp']['decode_tok_s']:.1f} | {r['decode_ratio']:.2f}x | "
                     f"{r['go']['prefill_tok_s']:.1f} | {r['llama_cpp']['prefill_tok_s']:.1f} | "
                     f"{r['prefill_ratio']:.2f}x |")
    (args.out / "go_engine.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    x = np.arange(len(rows))
    labels = [f"{r['type']}\n{r['threads']}t" for r in rows]
    for ax, key, title in ((axes[0], "decode_tok_s", "decode"), (axes[1], "prefill_tok_s", "prefill")):
        ax.bar(x - 0.2, [r["go"][key] for r in rows], 0.4, label="Go engine")
        ax.bar(x + 0.2, [r["llama_cpp"][key] for r in rows], 0.4, label="llama.cpp")
        ax.set_xticks(x, labels)
        ax.set_ylabel("tokens / s")
        ax.set_title(f"{title}, nano-sized model")
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "go_engine.png", dpi=120)
    print("wrote", args.out / "go_engine.json", args.out / "go_engine.md", args.out / "go_engine.png")


if __name__ == "__main__":
    main()
