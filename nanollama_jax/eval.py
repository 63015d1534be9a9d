"""Evaluate any model: accuracy on CORE-style tasks (multiple choice, schema, language modelling)
and bits per byte on held-out text.

    python -m nanollama_jax.eval --checkpoint runs/nano --tasks eval_bundle
    python -m nanollama_jax.eval --checkpoint runs/chat --tasks my_tasks/ --num-fewshot 3 --max-items 200
    python -m nanollama_jax.eval --checkpoint runs/nano/checkpoints/2000 --tasks arc_easy.jsonl --scoring sum
    python -m nanollama_jax.eval --checkpoint runs/nano --bpb-text held_out.txt

--checkpoint takes a run folder (latest step) or one of its step folders: pretrained, fine-tuned,
or imported (`python -m export.hf --from-hf DIR --output runs/x`, `python -m export.gguf_read
m.gguf --output runs/x`).
--tasks takes an eval bundle (the folder holding core.yaml, eval_meta_data.csv and eval_data/;
nanochat's CORE uses the DCLM one), a folder of task JSONL files, or JSONL files; see
nanollama_jax/tasks.py for the formats. Results go to a JSON file (default: RUN/eval/step_N.json) and are
printed as a table.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import sys
from pathlib import Path

import jax

from . import sharding
from .config import DTYPE_CHOICES, LlamaConfig
from .model import Params



@dataclasses.dataclass
class LoadedModel:
    config: LlamaConfig
    params: Params
    tokenizer: object  # sentencepiece.SentencePieceProcessor
    source: dict  # what was loaded, for the results file


def _sentencepiece(model: bytes | Path, where: str):
    import sentencepiece as spm

    try:
        if isinstance(model, Path):
            return spm.SentencePieceProcessor(model_file=str(model))
        return spm.SentencePieceProcessor(model_proto=model)
    except (OSError, RuntimeError) as e:
        raise ValueError(f"{where}: not a readable SentencePiece tokenizer ({e})") from None


def load_any(path: str | Path, mesh, *, tokenizer: str | None = None, dtype: str | None = None) -> LoadedModel:
    """A run folder or one of its step folders (pretrained, fine-tuned, imported from HF with
    `export.hf --from-hf`, read back from a GGUF with `export.gguf_read`), with its params placed on
    the mesh (sharded like training) and its SentencePiece tokenizer. Reading other formats belongs
    to export/, which sits above this layer: an HF folder or a GGUF is refused with the import command."""
    from . import checkpoint

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run")
    if path.suffix == ".gguf":
        raise ValueError(f"{path}: a GGUF file; read it into a run first: python -m export.gguf_read {path} "
                         f"--output runs/{path.stem}")
    if _is_hf_folder(path):
        raise ValueError(f"{path}: a Hugging Face model folder; import it as a run first: python -m export.hf "
                         f"--from-hf {path} --output runs/{path.name}")
    run = checkpoint.open_run(path)
    if run.step is None:
        raise ValueError(f"{run.dir}: the run has no checkpoint yet")
    config = dataclasses.replace(run.config, dtype=dtype) if dtype else run.config  # refused before any loading
    _, params = checkpoint.load_params(run.dir, run.step, shardings=sharding.param_shardings(config, mesh))
    tok = Path(tokenizer) if tokenizer else run.tokenizer_path
    sp = _sentencepiece(tok, str(tok))
    if sp.get_piece_size() != config.vocab_size:
        raise ValueError(f"{path}: the tokenizer has {sp.get_piece_size()} pieces but the model's vocabulary "
                         f"is {config.vocab_size}")
    return LoadedModel(config, params, sp, {"kind": "run", "path": str(run.dir.resolve()), "step": run.step})


def _is_hf_folder(path: Path) -> bool:
    cfg = path / "config.json"
    if not (path.is_dir() and cfg.is_file() and any(path.glob("*.safetensors"))):
        return False
    try:
        return "model" not in json.loads(cfg.read_text())  # a run's config.json has a "model" section
    except json.JSONDecodeError:
        return False


def default_output(source: dict) -> Path:
    return Path(source["path"]) / "eval" / f"step_{source['step']}.json"


def format_table(results: dict) -> str:
    lines = [f"{'task':<32} {'kind':<18} {'shots':>5} {'items':>6} {'accuracy':>9} {'random':>7} {'centred':>8}"]
    for label, r in results.get("tasks", {}).items():
        lines.append(f"{label:<32} {r['kind']:<18} {r['num_fewshot']:>5} {r['items']:>6} {r['accuracy']:>9.4f} "
                     f"{r['random_baseline']:>7.4f} {r['centred']:>8.4f}")
    if results.get("tasks"):
        lines.append(f"{'mean centred accuracy':<74} {results['centred_mean']:>8.4f}")
    if "bpb" in results:
        b = results["bpb"]
        lines.append(f"bits per byte: {b['bpb']:.4f} ({b['bytes']:,} bytes of {', '.join(b['files'])})")
    return "\n".join(lines)


def main(argv=None):
    from nanollama_base.cli import ArgumentParser, run_cli

    p = ArgumentParser(prog="python -m nanollama_jax.eval", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="run folder or one of its step folders")
    p.add_argument("--tasks", nargs="+", help="eval bundle folder or core.yaml, folders of .jsonl tasks, .jsonl files")
    p.add_argument("--bpb-text", nargs="+", help="UTF-8 text files (one document each) to measure bits per byte on")
    p.add_argument("--max-items", type=int, help="items per task (the first of each task's fixed shuffle)")
    p.add_argument("--num-fewshot", type=int, default=0, help="few-shot examples for plain .jsonl tasks (default 0; "
                                                               "a bundle's core.yaml sets its own)")
    p.add_argument("--delimiter", default=" ", help="text between prompt and answer for plain .jsonl tasks")
    p.add_argument("--scoring", choices=("mean", "sum"), default="mean",
                   help="pick the option with the lowest mean token loss (nanochat CORE, default) or the highest "
                        "summed log-likelihood (lm-evaluation-harness acc)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per device and forward pass (fewer for long rows)")
    p.add_argument("--mesh", help="FSDPxTENSOR device mesh, e.g. 4x1 (default: all devices on fsdp)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, help="compute dtype (default: the model's)")
    p.add_argument("--tokenizer", help="a SentencePiece tokenizer.model to use instead of the model's own")
    p.add_argument("--details", action="store_true", help="record every item's gold, prediction and option scores")
    p.add_argument("--output", help="results JSON (default: RUN/eval/step_N.json)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    run_cli(p.prog, lambda: evaluate(args))


def evaluate(args) -> None:
    from nanollama_base.files import atomic_path
    from .scoring import bits_per_byte, evaluate_tasks, rows_per_pass, text_windows, token_byte_table
    from .tasks import load_tasks

    if not args.tasks and not args.bpb_text:
        raise ValueError("nothing to evaluate: give --tasks and/or --bpb-text")
    if args.max_items is not None and args.max_items < 1:
        raise ValueError("--max-items must be at least 1")
    if args.num_fewshot < 0 or args.batch_size < 1:
        raise ValueError("--num-fewshot must be at least 0 and --batch-size at least 1")
    tasks = load_tasks(args.tasks, args.num_fewshot, args.delimiter) if args.tasks else []
    documents = []
    for f in args.bpb_text or []:
        try:
            documents.append(Path(f).read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{f}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    mesh = sharding.make_mesh(args.mesh)
    model = load_any(args.checkpoint, mesh, tokenizer=args.tokenizer, dtype=args.dtype)
    print(f"{model.source['kind']} {model.source['path']}: {model.config.param_count():,} parameters, "
          f"{sharding.describe(mesh)}", file=sys.stderr)
    results = {"model": model.source, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "settings": {"max_items": args.max_items, "scoring": args.scoring, "dtype": model.config.dtype}}
    if tasks:
        results.update(evaluate_tasks(model.params, model.config, model.tokenizer, tasks, max_items=args.max_items,
                                      scoring=args.scoring, mesh=mesh, batch_size=args.batch_size,
                                      progress=not args.quiet, details=args.details))
    if documents:
        seq = model.config.sequence_len
        rows = rows_per_pass(mesh, args.batch_size, seq)
        windows = text_windows(model.tokenizer, documents, seq, rows)
        bpb = bits_per_byte(model.params, model.config, windows, token_byte_table(model.tokenizer), mesh=mesh)
        results["bpb"] = {**bpb, "files": [str(f) for f in args.bpb_text]}
    out = Path(args.output) if args.output else default_output(model.source)
    if jax.process_index() == 0:
        with atomic_path(out) as tmp:
            tmp.write_text(json.dumps(results, indent=2) + "\n")
        print(format_table(results))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
