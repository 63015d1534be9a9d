"""Scoring a model: bits per byte on held-out text, and accuracy on multiple-choice, schema and
language-modelling tasks. Batched (rows padded, scored spans masked) and sharded like training:
rows split along the mesh's fsdp axis, parameters wherever the caller placed them.

Bits per byte counts each target token's UTF-8 bytes from the tokenizer's pieces, not from decoded
text: '▁' is one byte (a space), a byte-fallback piece <0xNN> one byte, control, unknown and unused
pieces none — those targets are left out of both sums, so BOS/EOS predictions do not count. The
space SentencePiece adds in front of a document (add_dummy_prefix) is not in the text, so it is not
counted for the first token after a BOS. bpb = Σ −log2 p(target) / Σ bytes, comparable across
tokenizers.

Task scoring follows nanochat's CORE evaluation: a multiple-choice or schema item is answered by
the option whose scored tokens have the lowest mean loss (`scoring="mean"`); `scoring="sum"` uses
the summed log-likelihood instead, which is lm-evaluation-harness's `acc`. A language-modelling
item is right when greedy decoding reproduces the whole continuation. Centred accuracy is
(accuracy − random baseline) / (1 − random baseline); its mean over tasks is the CORE score when
the tasks are the 22 CORE tasks.

    from nanollama_jax.scoring import bits_per_byte, evaluate_tasks, token_byte_table
    results = evaluate_tasks(params, config, sp, load_tasks(["eval_bundle"]), max_items=100)
    bpb = bits_per_byte(params, config, val_batches, token_byte_table(sp))["bpb"]
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from . import sharding
from nanollama_base.cli import Progress
from .config import LlamaConfig
from .model import Params, forward
from .tasks import Row, Task, task_rows

SCORINGS = ("mean", "sum")
MIN_LENGTH = 32
TOKENS_PER_DEVICE = 16384  # per forward pass and fsdp shard: bounds the float32 logits held at once


# ------------------------------------------------------------------------------ bits per byte

@dataclasses.dataclass(frozen=True)
class TokenBytes:
    """Per token id: its UTF-8 byte count, and 1 where its leading '▁' is the dummy-prefix space."""

    bytes: np.ndarray  # int32 [vocab]
    dummy_space: np.ndarray  # int32 [vocab]
    bos_id: int


def token_byte_table(tokenizer) -> TokenBytes:
    """Byte lengths of a SentencePiece tokenizer's pieces (see the module docstring)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(tokenizer.serialized_model_proto())
    no_bytes = {pb.ModelProto.SentencePiece.CONTROL, pb.ModelProto.SentencePiece.UNKNOWN,
                pb.ModelProto.SentencePiece.UNUSED}
    counts, lead = [], []
    for piece in proto.pieces:
        if piece.type in no_bytes:
            counts.append(0)
        elif piece.type == pb.ModelProto.SentencePiece.BYTE:
            counts.append(1)
        else:
            counts.append(len(piece.piece.replace("\u2581", " ").encode("utf-8")))
        lead.append(int(counts[-1] > 0 and piece.piece.startswith("\u2581")))
    dummy = proto.normalizer_spec.add_dummy_prefix
    return TokenBytes(np.asarray(counts, np.int32), np.asarray(lead, np.int32) * int(dummy), tokenizer.bos_id())


def _bpb_sums(params, tokens, table, dummy, bos, config: LlamaConfig):
    """Per row: nats over targets that carry bytes, and their bytes. tokens [B, T+1]."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    logits = forward(params, inputs, config)
    nats = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    nbytes = table[targets] - dummy[targets] * (inputs == bos)
    return jnp.sum(jnp.where(nbytes > 0, nats, 0.0), axis=1), jnp.sum(nbytes, axis=1)


@functools.lru_cache(maxsize=8)
def _jitted(fn, config: LlamaConfig, mesh: Mesh):
    """`fn` compiled once per model and mesh, its per-row results gathered on every device."""
    return jax.jit(functools.partial(fn, config=config), out_shardings=NamedSharding(mesh, P()))


def rows_per_pass(mesh: Mesh, batch_size: int, length: int) -> int:
    """Rows of `length` tokens per forward pass: `batch_size` per fsdp shard, fewer when a shard would
    hold more than TOKENS_PER_DEVICE tokens (their float32 logits are held whole)."""
    return mesh.shape["fsdp"] * max(1, min(batch_size, TOKENS_PER_DEVICE // length))


def bits_per_byte(params: Params, config: LlamaConfig, batches: Iterable[np.ndarray], table: TokenBytes, *,
                  mesh: Mesh | None = None) -> dict:
    """Bits per byte over token windows [B, T+1] (each row predicts tokens[1:] from tokens[:-1]).
    Rows are padded to the mesh's fsdp size with BOS, which carries no bytes."""
    mesh = mesh or sharding.make_mesh()
    step = _jitted(_bpb_sums, config, mesh)
    nats, nbytes, rows = 0.0, 0, 0
    consts = [jnp.asarray(table.bytes), jnp.asarray(table.dummy_space), jnp.int32(table.bos_id)]
    with jax.set_mesh(mesh), sharding.axis_rules():
        for batch in batches:
            batch = np.asarray(batch, np.int32)
            rows += batch.shape[0]
            batch = _pad_rows(batch, mesh.shape["fsdp"], table.bos_id)
            row_nats, row_bytes = step(params, _put(batch, mesh), *consts)
            nats += float(np.sum(np.asarray(row_nats, np.float64)))
            nbytes += int(np.sum(np.asarray(row_bytes, np.int64)))
    if nbytes == 0:
        raise ValueError("bits per byte: the text has no bytes to score")
    return {"bpb": nats / math.log(2) / nbytes, "nats": nats, "bytes": nbytes, "rows": rows}


def text_windows(tokenizer, documents: Sequence[str], seq_len: int, batch_size: int) -> list[np.ndarray]:
    """Documents as one token stream (BOS before each), cut into windows of seq_len + 1 tokens that
    overlap by one, so every token is a target once; the last window is padded with BOS (no bytes)."""
    bos = tokenizer.bos_id()
    stream = np.concatenate([np.asarray([bos] + ids, np.int32) for ids in tokenizer.encode(list(documents))])
    n = max(1, math.ceil((len(stream) - 1) / seq_len))
    padded = np.full(n * seq_len + 1, bos, np.int32)
    padded[: len(stream)] = stream
    windows = np.stack([padded[i * seq_len: i * seq_len + seq_len + 1] for i in range(n)])
    return [windows[i: i + batch_size] for i in range(0, n, batch_size)]


# ------------------------------------------------------------------------------ tasks

def _row_stats(params, tokens, mask, config: LlamaConfig):
    """Per row: summed loss over the masked targets, their count, and whether greedy decoding
    reproduces all of them. tokens, mask [B, L]; mask marks target positions of `tokens`."""
    inputs, targets, m = tokens[:, :-1], tokens[:, 1:], mask[:, 1:]
    logits = forward(params, inputs, config)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    hit = jnp.argmax(logits, axis=-1) == targets
    return jnp.sum(jnp.where(m, loss, 0.0), axis=1), jnp.sum(m, axis=1), jnp.all(hit | ~m, axis=1)


def _pad_rows(batch: np.ndarray, multiple: int, fill: int) -> np.ndarray:
    extra = -batch.shape[0] % multiple
    if not extra:
        return batch
    return np.concatenate([batch, np.full((extra,) + batch.shape[1:], fill, batch.dtype)])


def _put(batch: np.ndarray, mesh: Mesh) -> jax.Array:
    """A host batch (the same on every process) onto the mesh, rows split along fsdp."""
    sh = sharding.batch_sharding(mesh)
    n, count, index = batch.shape[0], jax.process_count(), jax.process_index()
    local = batch[index * n // count:(index + 1) * n // count]
    return jax.make_array_from_process_local_data(sh, np.ascontiguousarray(local), batch.shape)


def _bucket(length: int) -> int:
    """Padded length: a power of two from MIN_LENGTH, so a task run compiles a handful of shapes."""
    return max(MIN_LENGTH, 1 << (length - 1).bit_length())


def score_rows(params: Params, config: LlamaConfig, rows: Sequence[Row], *, mesh: Mesh, batch_size: int,
               on_batch=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(summed loss, scored tokens, greedy match) for every row. Longest rows first, each batch
    padded to its longest row's bucket, with up to `batch_size` rows per fsdp shard and at most
    TOKENS_PER_DEVICE tokens per shard (the logits of a batch are held whole)."""
    step = _jitted(_row_stats, config, mesh)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].tokens))
    loss, count, match = np.zeros(len(rows)), np.zeros(len(rows), np.int64), np.zeros(len(rows), bool)
    b = 0
    with jax.set_mesh(mesh), sharding.axis_rules():
        while b < len(order):
            length = _bucket(len(rows[order[b]].tokens))
            n = rows_per_pass(mesh, batch_size, length)
            idx = order[b:b + n]
            b += len(idx)
            tokens = np.zeros((n, length), np.int32)
            mask = np.zeros((n, length), bool)
            for r, i in enumerate(idx):
                row = rows[i]
                tokens[r, :len(row.tokens)] = row.tokens
                mask[r, row.start:row.end] = True
            out = step(params, _put(tokens, mesh), _put(mask, mesh))
            loss_b, count_b, match_b = (np.asarray(x) for x in out)
            loss[idx], count[idx], match[idx] = loss_b[:len(idx)], count_b[:len(idx)], match_b[:len(idx)]
            if on_batch:
                on_batch(len(idx))
    return loss, count, match


def centred(accuracy: float, baseline: float) -> float:
    return (accuracy - baseline) / (1.0 - baseline)


def prepare_tasks(tasks: Sequence[Task], tokenizer, max_len: int, max_items: int | None = None) -> list:
    """Each task with the token rows of its first `max_items` items (all when None): tokenized
    once, so training can score them at every evaluation without tokenizing again."""
    return [(t, task_rows(t, tokenizer, max_len, max_items)) for t in tasks]


def evaluate_tasks(params: Params, config: LlamaConfig, tokenizer, tasks: Sequence[Task], *,
                   max_items: int | None = None, **options) -> dict:
    """Accuracy and centred accuracy of every task, and their mean. `max_items` caps the items per
    task (the first of the task's fixed shuffle); the options are :func:`score_tasks`'s."""
    return score_tasks(params, config, prepare_tasks(tasks, tokenizer, config.sequence_len, max_items), **options)


def score_tasks(params: Params, config: LlamaConfig, prepared: list, *, scoring: str = "mean",
                mesh: Mesh | None = None, batch_size: int = 16, progress: bool = False, details: bool = False) -> dict:
    """Scores :func:`prepare_tasks`'s rows: `batch_size` is rows per fsdp shard; `details` adds each
    item's gold, prediction and option scores (mean loss or summed log-likelihood, by `scoring`)."""
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {', '.join(SCORINGS)}, got {scoring!r}")
    mesh = mesh or sharding.make_mesh()
    total = sum(len(r) for _, items in prepared for r in items)
    bar = Progress(total, desc="eval", unit="row", enabled=progress and jax.process_index() == 0)
    results = {}
    for task, items in prepared:
        flat = [r for rows in items for r in rows]
        start = time.perf_counter()
        loss, count, match = score_rows(params, config, flat, mesh=mesh, batch_size=batch_size, on_batch=bar.update)
        verdicts, per_item, k = [], [], 0
        for i, rows in enumerate(items):
            sl = slice(k, k + len(rows))
            k += len(rows)
            if task.kind == "language_modeling":
                ok = bool(match[sl][0])
                verdicts.append(ok)
                per_item.append({"correct": ok})
                continue
            scores = loss[sl] / count[sl] if scoring == "mean" else -loss[sl]
            pred = int(np.argmin(scores) if scoring == "mean" else np.argmax(scores))
            gold = task.items[i]["gold"]
            verdicts.append(pred == gold)
            per_item.append({"gold": gold, "pred": pred, "scores": [float(s) for s in scores]})
        acc = float(np.mean(verdicts))
        results[task.label] = {"kind": task.kind, "items": len(items), "num_fewshot": task.num_fewshot,
                               "accuracy": acc, "random_baseline": task.random_baseline,
                               "centred": centred(acc, task.random_baseline),
                               "seconds": time.perf_counter() - start}
        if details:
            results[task.label]["details"] = per_item
        if bar.enabled:
            bar.write(f"{task.label}: accuracy {acc:.4f}, centred {results[task.label]['centred']:.4f} "
                      f"({len(items)} items, {task.num_fewshot}-shot)")
    bar.close()
    mean = float(np.mean([r["centred"] for r in results.values()])) if results else float("nan")
    return {"scoring": scoring, "tasks": results, "centred_mean": mean}
