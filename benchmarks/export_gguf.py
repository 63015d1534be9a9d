"""GGUF export: time, file size and peak memory per --dtype, for a nano-shaped model.

    python -m benchmarks.export_gguf            # writes benchmarks/results/export_gguf.{json,md}
    python -m benchmarks.export_gguf --size tiny --dtypes f32 q8_0   # quicker, for a try

The model is `nano` (12 layers, d 384, 6 heads, vocab 32000: 45.8M parameters) with random
weights (nanollama's init, the zero-initialised projections filled in), saved as a run with a
synthetic 32000-piece SentencePiece vocabulary (unk, <s>, </s>, 256 bytes, then made-up pieces: the
tokenizer's content does not change the export's cost). For each dtype it measures

* `write_gguf` alone, in-process, params already in memory (convert, permute, quantise, write);
* the whole CLI, `python -m export.gguf --checkpoint RUN …`, in a fresh process: wall time
  (JAX start-up and orbax restore included) and peak resident memory, which shows the streaming
  writer holds about one copy of the weights (the restored params), not two;
* the file size, and its ratio to the F32 file.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path("benchmarks") / "results"  # under the working directory, never beside an installed file
ALL_DTYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")

_WRAPPER = """
import runpy, sys, time
t = time.perf_counter()
sys.argv = ["export.gguf"] + sys.argv[1:]
try:
    runpy.run_module("export.gguf", run_name="__main__")
except SystemExit as e:
    if e.code:
        raise
# VmHWM, not ru_maxrss: after fork+exec ru_maxrss still counts the (large) parent's pages
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print("BENCH", time.perf_counter() - t, hwm, file=sys.stderr)
"""

_LOAD_ONLY = """
import sys, time
t = time.perf_counter()
from nanollama_jax import checkpoint
checkpoint.load_params(sys.argv[1])
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print("BENCH", time.perf_counter() - t, hwm, file=sys.stderr)
"""


def _bench_process(args) -> tuple[float, float]:
    """(seconds, peak RSS MB) of a fresh Python process running the given -c script and arguments."""
    r = subprocess.run([sys.executable, "-c", *map(str, args)], capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    if r.returncode:
        raise SystemExit(f"benchmark process failed: {r.stderr.strip()[-500:]}")
    bench = next(line for line in r.stderr.splitlines() if line.startswith("BENCH")).split()
    return float(bench[1]), int(bench[2]) / 1024


def synthetic_tokenizer(path: Path, vocab: int) -> None:
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    for piece, kind in (("<unk>", 2), ("<s>", 3), ("</s>", 3)):
        p = m.pieces.add()
        p.piece, p.type, p.score = piece, kind, 0.0
    for b in range(256):
        p = m.pieces.add()
        p.piece, p.type, p.score = f"<0x{b:02X}>", 6, 0.0
    for i in range(vocab - 259):
        p = m.pieces.add()
        p.piece, p.type, p.score = f"\u2581t{i}", 1, -float(i)
    ts = m.trainer_spec
    ts.model_type, ts.vocab_size, ts.byte_fallback = pb.TrainerSpec.BPE, vocab, True
    ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id = 0, 1, 2, -1
    m.normalizer_spec.name, m.normalizer_spec.add_dummy_prefix = "identity", True
    m.normalizer_spec.escape_whitespaces = True
    path.write_bytes(m.SerializeToString())


def random_params(config, seed=0):
    import jax

    from nanollama_jax import model as M

    p = jax.tree_util.tree_map(np.array, M.init_params(config, seed))
    rng = np.random.default_rng(seed)
    for mod, name in (("attn", "c_proj"), ("ffn", "down_proj")):
        k = p["layers"][mod][name]["kernel"]
        p["layers"][mod][name]["kernel"] = (rng.uniform(-1, 1, k.shape) * np.sqrt(3 / k.shape[1])).astype(np.float32)
    return p


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.export_gguf", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="nano")
    ap.add_argument("--vocab-size", type=int, default=32000)
    ap.add_argument("--dtypes", nargs="+", default=list(ALL_DTYPES), choices=ALL_DTYPES)
    ap.add_argument("--no-write", action="store_true", help="print only; do not write benchmarks/results")
    args = ap.parse_args(argv)

    import dataclasses

    from export import gguf as G
    from nanollama_jax import checkpoint
    from nanollama_jax.config import load_size

    config = dataclasses.replace(load_size(args.size)[0], vocab_size=args.vocab_size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synthetic_tokenizer(tmp / "tokenizer.model", args.vocab_size)
        params = random_params(config)
        run = tmp / args.size
        checkpoint.write_params_run(run, config, params, tmp / "tokenizer.model")
        load_s, load_rss = _bench_process([_LOAD_ONLY, run])
        print(json.dumps({"load_only_seconds": round(load_s, 3), "load_only_peak_rss_mb": round(load_rss, 1)}))
        f32_size = None
        for dtype in args.dtypes:
            out = tmp / f"{args.size}-{dtype}.gguf"
            t0 = time.perf_counter()
            info = G.write_gguf(params, config, tmp / "tokenizer.model", out, dtype, name=args.size, progress=False)
            write_s = time.perf_counter() - t0
            size = out.stat().st_size
            out.unlink()
            cli_s, cli_rss = _bench_process([_WRAPPER, "--checkpoint", run, "--output", out, "--dtype", dtype,
                                             "--quiet"])
            if out.stat().st_size != size:
                raise SystemExit(f"{dtype}: the CLI wrote {out.stat().st_size} bytes, write_gguf {size}")
            out.unlink()
            if dtype == "f32":
                f32_size = size
            row = {"dtype": dtype, "write_seconds": round(write_s, 3), "cli_seconds": round(cli_s, 3),
                   "cli_peak_rss_mb": round(cli_rss, 1), "cli_rss_over_load_mb": round(cli_rss - load_rss, 1), "bytes": size,
                   "vs_f32": round(size / f32_size, 4) if f32_size else None, "fallbacks": info["fallbacks"]}
            rows.append(row)
            print(json.dumps(row), flush=True)

    result = {
        "benchmark": "export_gguf", "command": "python -m benchmarks.export_gguf " + " ".join(argv or sys.argv[1:]),
        "model": {"size": args.size, **config.to_dict(), "parameters": config.param_count(),
                  "f32_weights_mb": round(config.param_count() * 4 / 2**20, 1)},
        "machine": {"cpus": os.cpu_count(), "platform": platform.machine(), "python": platform.python_version(),
                    "note": "2 CPUs shared with other jobs while measured"},
        "load_only": {"seconds": round(load_s, 3), "peak_rss_mb": round(load_rss, 1)},
        "results": rows,
    }
    if args.no_write:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "export_gguf.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["model"]
    lines = [
        "# GGUF export: time, size and memory per dtype", "",
        f"Model: `{args.size}` shape ({m['n_layer']} layers, d {m['n_embd']}, {m['n_head']} heads, "
        f"{m['n_kv_head']} KV heads, vocab {m['vocab_size']}), {m['parameters']:,} parameters "
        f"({m['f32_weights_mb']} MB as float32), random weights.",
        f"Machine: {os.cpu_count()} CPUs ({platform.machine()}), Python {platform.python_version()}, shared with "
        "other jobs while measured. Command: `python -m benchmarks.export_gguf`.", "",
        "`write_gguf` = the export itself, params in memory. CLI = `python -m export.gguf` in a fresh process "
        "(JAX start-up, orbax restore, export); peak RSS is that process's maximum resident memory.", "",
        f"Baseline: a fresh process that only restores the params (`checkpoint.load_params`, JAX + orbax) takes "
        f"{load_s:.2f} s and peaks at {load_rss:.0f} MB. The last column is the CLI's peak above that baseline: "
        "the streaming writer adds at most about one tensor and its conversion temporaries (the largest tensor, "
        f"token_embd or output, is {m['vocab_size'] * m['n_embd'] * 4 / 2**20:.0f} MB as float32), never a second "
        f"copy of the weights ({m['f32_weights_mb']} MB). Negative values are measurement noise.", "",
        "| dtype | file size | vs F32 | write_gguf | CLI wall | CLI peak RSS | above load-only |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['bytes'] / 2**20:.1f} MB | {r['vs_f32']:.3f} | {r['write_seconds']:.2f} s "
                     f"| {r['cli_seconds']:.2f} s | {r['cli_peak_rss_mb']:.0f} MB | {r['cli_rss_over_load_mb']:+.0f} MB |")
    lines += ["", "Norms stay F32 in every file; all nano row lengths (384, 1024) fit every block size, so no "
              "tensor fell back. Times are single runs on shared CPUs, so expect ±30% noise; F32 writes the most "
              "bytes, the Q types spend their time in gguf-py's numpy quantisers (`gguf.quants.quantize`)."]
    (RESULTS / "export_gguf.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / 'export_gguf.json'} and .md")


if __name__ == "__main__":
    main()
