"""Evaluation inside training: validation loss and bits per byte, task accuracy, and telling the
user when the run overfits, with the best-validation weights kept.

At each evaluation step the training loop calls :meth:`TrainingEval.evaluate`, which

* measures the validation loss with the training's own loss (``setup.eval_step``) and bits per
  byte from the tokenizer's pieces (:func:`~nanollama_jax.scoring.bits_per_byte`), both on the
  same fixed held-out windows. (Two passes: the training loss may be computed in chunks or with
  a mask that bits per byte does not share; the held-out set is small next to training.)
* scores the ``--eval-tasks`` (CORE-format tasks, the first ``--eval-max-items`` of each task's
  fixed shuffle): accuracy and centred accuracy per task and their mean;
* keeps ``runs/<tag>/best/``, a run folder of its own holding only the parameters of the step
  with the lowest validation loss, so every command that takes a run takes it
  (``generate``, ``eval``, ``export``, ``--init-from``: ``--checkpoint runs/<tag>/best``);
* warns, once per rise, when validation loss climbs past its best — by more than
  :data:`RISE_TOLERANCE`, so the evaluation-to-evaluation noise of a flat curve stays quiet —
  naming the best step and how many epochs the run has made over its data.

:func:`epochs_lines` says, before training starts, how many passes the plan makes over the data.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import numpy as np

from . import checkpoint
from .metrics import read_metrics
from .scoring import bits_per_byte, prepare_tasks, rows_per_pass, score_tasks, token_byte_table

BEST = "best"  # runs/<tag>/best/
RISE_TOLERANCE = 0.01  # a rise of more than 1% above the best validation loss is overfitting, not noise


def epochs_lines(batches, steps: int, best_dir: Path) -> list[str]:
    """The passes the plan makes over the training data; a warning when it is more than one."""
    epochs = batches.epoch(steps - 1)
    if epochs <= 1:
        return [f"epochs: the plan reads {epochs:.2f} of the training data (each window at most once)"]
    return [f"epochs: the plan makes {epochs:.1f} passes over the training data",
            f"warning: more than one epoch: a model that memorises its training data stops generalising; validation "
            f"loss will say so, and {best_dir} keeps the weights of its best step"]


@dataclasses.dataclass
class BestWatch:
    """The lowest validation loss so far and its step; :meth:`update` says whether a step is a new
    best, the first evaluation of a rise past the best, or neither."""

    loss: float = math.inf
    step: int | None = None
    warned: bool = False  # this rise has been reported

    def update(self, step: int, loss: float) -> str:
        """"best", "rise" (once per rise) or ""."""
        if loss < self.loss:
            self.loss, self.step, self.warned = loss, step, False
            return "best"
        if loss > self.loss * (1 + RISE_TOLERANCE) and not self.warned:
            self.warned = True
            return "rise"
        return ""

    @classmethod
    def replay(cls, metrics_path: Path, until_step: int) -> "BestWatch":
        """The watch as it stood at `until_step`, from the validation records a resumed run logged."""
        watch = cls()
        if metrics_path.is_file():
            for record in read_metrics(metrics_path, warn=lambda _: None):  # a torn last line: MetricsLog says so
                if "val_loss" in record and record["step"] <= until_step:
                    watch.update(record["step"], record["val_loss"])
        return watch


class BestCheckpoint:
    """runs/<tag>/best/: a params-only run (config.json, tokenizer.model, checkpoints/<step>/) with
    one checkpoint, the best step's, saved by every process like the run's own checkpoints."""

    def __init__(self, run: checkpoint.Run, start_step: int):
        self.run = run
        self.dir = run.dir / BEST
        self._mgr = None
        # A resumed run replays the steps after its last checkpoint; a best saved during them is
        # saved again when the replay reaches it.
        for stale in [s for s in checkpoint.saved_steps(self.dir) if s > start_step]:
            self._manager().delete(stale)

    def _manager(self):
        if self._mgr is None:
            if jax.process_index() == 0:
                sections = {k: v for k, v in self.run.info.items() if k not in ("model", "tokenizer_sha256")}
                checkpoint.create_run(self.dir, self.run.config, self.run.tokenizer_path,
                                      best_of={"run": str(self.run.dir.resolve()), "chosen_by": "validation loss"},
                                      **sections)
            self._mgr = checkpoint.manager(checkpoint.Run(self.dir, self.run.config, {}, None), keep=1,
                                           saving=f"the best-validation weights ({BEST}/)", resumed_from=self.run.dir)
        return self._mgr

    def save(self, step: int, params, meta: dict) -> None:
        checkpoint.save(self._manager(), step, params, {**meta, "params_only": True})

    def close(self) -> None:
        if self._mgr is not None:
            self._mgr.wait_until_finished()
            self._mgr.close()


class TrainingEval:
    """What the training loop runs at each evaluation step (see the module docstring)."""

    def __init__(self, setup, run: checkpoint.Run, batches, validation: list[np.ndarray], *, tasks=(),
                 max_items: int | None = None, start_step: int = 0):
        import sentencepiece as spm

        self.setup, self.run, self.batches = setup, run, batches
        self.validation = validation  # global [micro_batch, T+1] windows, the same on every process
        config = setup.config
        tokenizer = spm.SentencePieceProcessor(model_file=str(run.tokenizer_path))
        self.byte_table = token_byte_table(tokenizer)
        rows = rows_per_pass(setup.mesh, setup.plan.batch_size, config.sequence_len)
        windows = np.concatenate(validation)  # regrouped so bits per byte holds a bounded slice of logits at once
        self.bpb_batches = [windows[i:i + rows] for i in range(0, len(windows), rows)]
        self.tasks = prepare_tasks(tasks, tokenizer, config.sequence_len, max_items)
        self.watch = BestWatch.replay(run.dir / "metrics.jsonl", start_step)
        self.best = BestCheckpoint(run, start_step)

    def evaluate(self, params, step: int, meta: dict) -> tuple[dict, list[str]]:
        """(the metrics record's fields, the lines to print) for the parameters at `step`; saves them
        as the best checkpoint (with `meta`) when their validation loss is the lowest yet."""
        setup = self.setup
        n, p = self.validation[0].shape[0] // jax.process_count(), jax.process_index()
        val_loss = float(np.mean([float(setup.eval_step(params, setup.eval_batch(v[p * n:(p + 1) * n])))
                                  for v in self.validation]))
        bpb = bits_per_byte(params, setup.config, self.bpb_batches, self.byte_table, mesh=setup.mesh)["bpb"]
        record = {"val_loss": val_loss, "val_bpb": bpb}
        lines = [f"step {step:5d} | validation loss {val_loss:.4f} | {bpb:.3f} bits per byte"]
        if self.tasks:
            scored = score_tasks(params, setup.config, self.tasks, mesh=setup.mesh, batch_size=setup.plan.batch_size)
            record["tasks"] = {label: {"accuracy": r["accuracy"], "centred": r["centred"]}
                               for label, r in scored["tasks"].items()}
            record["centred_mean"] = scored["centred_mean"]
            lines.append(f"step {step:5d} | tasks: centred mean {scored['centred_mean']:.4f} | " + ", ".join(
                f"{label} {r['accuracy']:.3f}" for label, r in scored["tasks"].items()))
        verdict = self.watch.update(step, val_loss)
        if verdict == "best":
            self.best.save(step, params, {**meta, "val_loss": val_loss})
        elif verdict == "rise":
            lines.append(f"warning: validation loss {val_loss:.4f} at step {step} has risen past its best, "
                         f"{self.watch.loss:.4f} at step {self.watch.step}, after {self.batches.epoch(step - 1):.1f} "
                         f"epochs over the training data: the model is overfitting (more data, a smaller model or "
                         f"fewer steps help); the best step's weights are in {self.best.dir}")
        return record, lines

    def close(self) -> None:
        self.best.close()
