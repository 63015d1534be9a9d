"""Evaluation tasks in the CORE / DCLM eval-bundle formats: reading, few-shot prompts, token rows.

Three kinds of JSONL item (one JSON object a line), as in the DCLM eval bundle that nanochat's CORE
score runs on:

    multiple_choice    {"query": str, "choices": [str, ...], "gold": int}
    schema             {"context_options": [str, ...], "continuation": str, "gold": int}
    language_modeling  {"context": str, "continuation": str}

`--tasks` takes an eval bundle (a folder with `core.yaml`, `eval_meta_data.csv` and `eval_data/`,
or the `core.yaml` itself: labels, few-shot counts, delimiters and random baselines come from it),
a folder of JSONL files, or JSONL files; for plain JSONL the kind is read from the items' fields and
the random baseline is the mean of 1 / number of options (0 for language modelling).

Prompts follow nanochat's core_eval: each few-shot example is rendered with its gold answer and
followed by a blank line; the item comes last. Items are shuffled with a fixed seed (so a per-task
cap takes a fair sample) and item i draws its few-shot examples with `random.Random(1234 + i)` from
the other items, never itself. Each prompt becomes one token row, BOS first, with the span of
tokens to score: for multiple choice the tokens after the choices' common prefix, for schema the
common suffix (the shared continuation), for language modelling the continuation. Rows longer
than the model's context keep their last tokens.
"""
from __future__ import annotations

import csv
import dataclasses
import pathlib
import random
from typing import Sequence

import numpy as np

from data.sources import jsonl_objects

KINDS = ("multiple_choice", "schema", "language_modeling")
SHUFFLE_SEED = 1337
FEWSHOT_SEED = 1234
BUNDLE_CONFIG = "core.yaml"
BUNDLE_META = "eval_meta_data.csv"
BUNDLE_DATA = "eval_data"


@dataclasses.dataclass(frozen=True)
class Task:
    label: str
    kind: str  # one of KINDS
    items: tuple  # the JSON objects, in evaluation order (shuffled with SHUFFLE_SEED)
    num_fewshot: int = 0
    delimiter: str = " "
    random_baseline: float = 0.0  # accuracy of guessing, as a fraction
    source: str = ""


@dataclasses.dataclass(frozen=True)
class Row:
    """One sequence to run: tokens (BOS first) and the span [start, end) of tokens to score."""

    tokens: np.ndarray
    start: int
    end: int


# ------------------------------------------------------------------------------------ reading

def _kind_of(item: dict, where: str) -> str:
    if "query" in item and "choices" in item:
        return "multiple_choice"
    if "context_options" in item:
        return "schema"
    if "context" in item and "continuation" in item:
        return "language_modeling"
    raise ValueError(f"{where}: not a task item (expected query/choices/gold, context_options/continuation/gold "
                     f"or context/continuation; got keys {', '.join(sorted(item)) or 'none'})")


def _check_item(item, kind: str, where: str) -> None:
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(item).__name__}")
    options_key = {"multiple_choice": "choices", "schema": "context_options"}.get(kind)
    text_keys = {"multiple_choice": ("query",), "schema": ("continuation",),
                 "language_modeling": ("context", "continuation")}[kind]
    for key in text_keys:
        if not isinstance(item.get(key), str):
            raise ValueError(f"{where}: {kind} item needs a string {key!r}")
    if options_key:
        options = item.get(options_key)
        if not (isinstance(options, list) and len(options) >= 2 and all(isinstance(o, str) for o in options)):
            raise ValueError(f"{where}: {kind} item needs {options_key!r}: a list of at least two strings")
        gold = item.get("gold")
        if not (isinstance(gold, int) and not isinstance(gold, bool) and 0 <= gold < len(options)):
            raise ValueError(f"{where}: 'gold' must be an index into {options_key!r} (0..{len(options) - 1}), "
                             f"got {gold!r}")


def read_items(path: pathlib.Path, kind: str | None = None) -> tuple[str, list[dict]]:
    """(kind, items) of a task JSONL file; the kind is inferred from the first item when not given."""
    items = []
    for lineno, item in jsonl_objects(path):
        where = f"{path}:{lineno}"
        if kind is None:
            if not isinstance(item, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(item).__name__}")
            kind = _kind_of(item, where)
        _check_item(item, kind, where)
        items.append(item)
    if not items:
        raise ValueError(f"{path}: no task items")
    return kind, items


def _shuffled(items: list[dict]) -> tuple:
    items = list(items)
    random.Random(SHUFFLE_SEED).shuffle(items)  # many task files are sorted; a capped run needs a fair sample
    return tuple(items)


def random_baseline(kind: str, items: Sequence[dict]) -> float:
    """The expected accuracy of a uniform guess: mean of 1 / options; 0 for language modelling."""
    if kind == "language_modeling":
        return 0.0
    key = "choices" if kind == "multiple_choice" else "context_options"
    return float(np.mean([1.0 / len(item[key]) for item in items]))


def jsonl_task(path: pathlib.Path, num_fewshot: int = 0, delimiter: str = " ") -> Task:
    kind, items = read_items(path)
    return Task(path.stem, kind, _shuffled(items), num_fewshot, delimiter, random_baseline(kind, items), str(path))


def bundle_tasks(config_path: pathlib.Path) -> list[Task]:
    """The tasks of a DCLM / nanochat eval bundle from its core.yaml (data under eval_data/ beside it,
    random baselines in percent from eval_meta_data.csv when present)."""
    import yaml

    root = config_path.parent
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        entries = config["icl_tasks"]
    except (yaml.YAMLError, KeyError, TypeError) as e:
        raise ValueError(f"{config_path}: not an eval-bundle config with an icl_tasks list ({e})") from None
    baselines = {}
    meta = root / BUNDLE_META
    if meta.is_file():
        with open(meta, encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f):
                try:
                    baselines[row["Eval Task"]] = float(row["Random baseline"]) / 100.0
                except (KeyError, TypeError, ValueError):
                    raise ValueError(f"{meta}: expected columns 'Eval Task' and 'Random baseline' (percent)") from None
    tasks = []
    for i, entry in enumerate(entries):
        try:
            label, kind, uri = entry["label"], entry["icl_task_type"], entry["dataset_uri"]
            shots = entry.get("num_fewshot", [0])
            shots = int(shots[0] if isinstance(shots, list) else shots)
            delimiter = entry.get("continuation_delimiter", " ")
        except (KeyError, TypeError, ValueError, IndexError):
            raise ValueError(f"{config_path}: icl_tasks[{i}] needs label, icl_task_type, dataset_uri "
                             "(and num_fewshot as a list of integers)") from None
        if kind not in KINDS:
            raise ValueError(f"{config_path}: task {label}: icl_task_type {kind!r} is not one of {', '.join(KINDS)}")
        path = root / BUNDLE_DATA / uri
        if not path.is_file():
            raise ValueError(f"{config_path}: task {label}: data file {path} is missing")
        _, items = read_items(path, kind)
        baseline = baselines.get(label, random_baseline(kind, items))
        tasks.append(Task(label, kind, _shuffled(items), shots, delimiter, baseline, str(path)))
    if not tasks:
        raise ValueError(f"{config_path}: icl_tasks is empty")
    return tasks


def load_tasks(paths: Sequence[str | pathlib.Path], num_fewshot: int = 0, delimiter: str = " ") -> list[Task]:
    """Tasks from eval bundles (folder or core.yaml), folders of JSONL files, or JSONL files.
    `num_fewshot` and `delimiter` apply to plain JSONL tasks (a bundle states its own)."""
    tasks: list[Task] = []
    for p in map(pathlib.Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such task file or folder")
        if p.is_dir() and (p / BUNDLE_CONFIG).is_file():
            tasks += bundle_tasks(p / BUNDLE_CONFIG)
        elif p.suffix in (".yaml", ".yml"):
            tasks += bundle_tasks(p)
        elif p.is_dir():
            files = sorted(f for f in p.rglob("*.jsonl") if f.is_file())
            if not files:
                raise ValueError(f"{p}: no .jsonl task files (nor a {BUNDLE_CONFIG}) in this folder")
            tasks += [jsonl_task(f, num_fewshot, delimiter) for f in files]
        else:
            tasks.append(jsonl_task(p, num_fewshot, delimiter))
    labels = [t.label for t in tasks]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise ValueError(f"two tasks share the label {dupes[0]!r}; give their files distinct names")
    return tasks


# ------------------------------------------------------------------------------------ prompts

def fewshot_examples(task: Task, index: int) -> list[dict]:
    """Item `index`'s few-shot examples: a fixed draw from the task's other items."""
    n = min(task.num_fewshot, len(task.items) - 1)
    if n <= 0:
        return []
    others = [i for i in range(len(task.items)) if i != index]
    return [task.items[i] for i in random.Random(FEWSHOT_SEED + index).sample(others, n)]


def render(task: Task, index: int) -> list[str]:
    """The prompts of item `index`: one per choice (multiple choice), one per context option (schema),
    or [without continuation, with continuation] (language modelling)."""
    item, d = task.items[index], task.delimiter
    shots = fewshot_examples(task, index)
    if task.kind == "multiple_choice":
        prefix = "".join(f"{ex['query']}{d}{ex['choices'][ex['gold']]}\n\n" for ex in shots)
        return [f"{prefix}{item['query']}{d}{choice}" for choice in item["choices"]]
    if task.kind == "schema":
        prefix = "".join(f"{ex['context_options'][ex['gold']]}{d}{ex['continuation']}\n\n" for ex in shots)
        return [f"{prefix}{option}{d}{item['continuation']}" for option in item["context_options"]]
    prefix = "".join(f"{ex['context'].strip()}{d}{ex['continuation']}\n\n" for ex in shots)
    without = f"{prefix}{item['context'].strip()}{d}"
    # a trailing delimiter space would be absorbed into the continuation's first token
    return [without.strip(), without + item["continuation"]]


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return n


def _common_suffix(seqs: Sequence[Sequence[int]]) -> int:
    return _common_prefix([s[::-1] for s in seqs])


def item_rows(task: Task, index: int, tokenizer, max_len: int) -> list[Row]:
    """The token rows of one item (BOS first), each with its scored span, cut to `max_len` tokens."""
    prompts = render(task, index)
    bos = tokenizer.bos_id()
    seqs = [[bos] + ids for ids in tokenizer.encode(prompts)]
    if task.kind == "multiple_choice":
        start = _common_prefix(seqs)
        spans = [(min(start, len(s) - 1), len(s)) for s in seqs]
    elif task.kind == "schema":
        suffix = min(_common_suffix(seqs), min(len(s) for s in seqs) - 1)
        spans = [(len(s) - suffix, len(s)) for s in seqs]
    else:
        without, with_ = seqs
        start = min(_common_prefix([without, with_]), len(with_) - 1)
        seqs, spans = [with_], [(start, len(with_))]
    rows = []
    for s, (start, end) in zip(seqs, spans):
        start = max(start, 1)  # BOS is never a target
        cut = max(0, len(s) - max_len)
        rows.append(Row(np.asarray(s[cut:], np.int32), max(1, start - cut), end - cut))
    return rows


def task_rows(task: Task, tokenizer, max_len: int, max_items: int | None = None) -> list[list[Row]]:
    """Rows of the task's first `max_items` items (all when None)."""
    n = len(task.items) if max_items is None else min(max_items, len(task.items))
    return [item_rows(task, i, tokenizer, max_len) for i in range(n)]
