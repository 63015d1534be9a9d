"""Evaluation inside training: validation bits per byte from the tokenizer's pieces, task accuracy
at each evaluation (metrics.jsonl, plot), and overfitting told — the epochs the plan makes, a warning
once per rise of validation loss past its best, and the best-validation checkpoint kept as a run."""
import contextlib
import io
import json
import random
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from nanollama_jax import checkpoint, eval as eval_cli, sharding, train
from nanollama_jax.input import validation_batches
from nanollama_jax.scoring import bits_per_byte, token_byte_table
from nanollama_jax.train_eval import RISE_TOLERANCE, BestCheckpoint, BestWatch

WORDS = ("the a cat dog sat ran on under big small red blue house tree river stone bird fish sings jumps over "
         "quickly slowly and but then").split()
STEPS = 20


def write_jsonl(path, items):
    path.write_text("".join(json.dumps(x) + "\n" for x in items))


@pytest.fixture(scope="module")
def overfit(tmp_path_factory):
    """pico on ~700 tokens of random word sequences (a tokenizer big enough for whole words), 20 steps
    of 512 tokens = 14.5 epochs, evaluated every 2 steps, stopped at step 10 and resumed: it learns
    the words' frequencies, then memorises its documents and validation loss climbs."""
    root = tmp_path_factory.mktemp("overfit")
    rng = random.Random(0)
    (root / "corpus").mkdir()
    for d in range(12):
        (root / "corpus" / f"doc{d:02d}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(80)) + "\n")
    (root / "tasks").mkdir()
    write_jsonl(root / "tasks" / "next_word.jsonl",
                [{"query": " ".join(rng.choices(WORDS, k=5)), "choices": rng.sample(WORDS, 4), "gold": rng.randrange(4)}
                 for _ in range(12)])
    write_jsonl(root / "tasks" / "continue.jsonl",
                [{"context": " ".join(rng.choices(WORDS, k=5)), "continuation": rng.choice(WORDS)} for _ in range(6)])
    subprocess.run([sys.executable, "-m", "data.prepare", "--input", root / "corpus", "--output", root / "data",
                    "--vocab-size", "400", "--val-fraction", "0.25", "--quiet"], check=True, capture_output=True)
    flags = ["--size", "pico", "--data", str(root / "data"), "--steps", str(STEPS), "--tokens-per-step", "512",
             "--batch-size", "8", "--mesh", "1x1", "--eval-every", "2", "--sample-every", "0", "--save-every", "1000",
             "--log-every", "100", "--runs-dir", str(root / "runs"), "--model-tag", "o",
             "--eval-tasks", str(root / "tasks"), "--eval-max-items", "8"]
    outputs = []
    for extra in (["--stop-after", "10"], ["--resume"]):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            train.main(flags + extra)
        outputs.append(out.getvalue())
    run = root / "runs" / "o"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {"root": root, "run": run, "outputs": outputs, "val": [r for r in records if "val_loss" in r]}


def test_epochs_are_told_before_training(overfit):
    first = overfit["outputs"][0]
    assert "epochs: the plan makes 14.5 passes over the training data" in first
    assert "warning: more than one epoch: a model that memorises its training data stops generalising" in first


def test_overfitting_is_warned_once_with_the_best_step(overfit):
    val = overfit["val"]
    assert [r["step"] for r in val] == list(range(2, STEPS + 1, 2))
    losses = [r["val_loss"] for r in val]
    best = int(np.argmin(losses))
    assert 0 < best < len(val) - 1 and losses[-1] > losses[best] * 1.05  # the run did overfit
    warned_at = next(r for r in val[best:] if r["val_loss"] > losses[best] * (1 + RISE_TOLERANCE))
    warnings = [line for out in overfit["outputs"] for line in out.splitlines() if "has risen past its best" in line]
    assert len(warnings) == 1, warnings  # once per rise, also across the resume
    assert re.search(rf"validation loss {warned_at['val_loss']:.4f} at step {warned_at['step']} has risen past its "
                     rf"best, {losses[best]:.4f} at step {val[best]['step']}, after [\d.]+ epochs", warnings[0])
    assert str(overfit["run"] / "best") in warnings[0]


def test_best_checkpoint_holds_the_min_validation_step_and_its_bpb_is_from_pieces(overfit):
    """runs/o/best is a run whose one checkpoint is the lowest-validation-loss step: its weights give
    the validation bits per byte logged at that step, computed from the pieces' bytes."""
    val, run = overfit["val"], overfit["run"]
    best = min(val, key=lambda r: r["val_loss"])
    assert checkpoint.saved_steps(run / "best") == [best["step"]]
    assert checkpoint.saved_steps(run)[-1] == STEPS
    loaded, params = checkpoint.load_params(run / "best")
    assert loaded.config == checkpoint.open_run(run).config
    sp = eval_cli._sentencepiece(loaded.tokenizer_path, "tokenizer")
    windows = validation_batches(overfit["root"] / "data", seq_len=64, batch_size=8, max_batches=4)
    got = bits_per_byte(params, loaded.config, windows, token_byte_table(sp), mesh=sharding.make_mesh("1x1"))
    assert got["bpb"] == pytest.approx(best["val_bpb"], rel=1e-6)


def test_task_accuracy_is_logged_and_equals_the_eval_command(overfit, tmp_path):
    val = overfit["val"]
    assert all(set(r["tasks"]) == {"next_word", "continue"} and np.isfinite(r["centred_mean"]) for r in val)
    best = min(val, key=lambda r: r["val_loss"])
    out = tmp_path / "best.json"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        eval_cli.main(["--checkpoint", str(overfit["run"] / "best"), "--tasks", str(overfit["root"] / "tasks"),
                       "--max-items", "8", "--mesh", "1x1", "--output", str(out), "--quiet"])
    results = json.loads(out.read_text())
    assert results["model"]["step"] == best["step"]
    assert {k: v["accuracy"] for k, v in results["tasks"].items()} == {k: v["accuracy"] for k, v in best["tasks"].items()}
    assert results["centred_mean"] == pytest.approx(best["centred_mean"])
    assert "centred mean" in overfit["outputs"][0]
    assert (overfit["run"] / "curves.png").stat().st_size > 1000


def test_watch_warns_once_per_rise():
    watch = BestWatch()
    verdicts = [watch.update(step, loss) for step, loss in
                enumerate([5.0, 4.0, 4.0 * (1 + RISE_TOLERANCE / 2), 4.2, 4.5, 4.1, 3.9, 3.92, 4.3, 4.4])]
    assert verdicts == ["best", "best", "", "rise", "", "", "best", "", "rise", ""]
    assert (watch.loss, watch.step) == (3.9, 6)


def test_resume_drops_a_best_saved_after_the_checkpoint_it_resumes(overfit, tmp_path):
    """A run killed between a new best and its next checkpoint replays those steps; the best they
    saved is removed on resume (the replay saves it again)."""
    run_dir = tmp_path / "o"
    shutil.copytree(overfit["run"], run_dir)
    best_step = checkpoint.saved_steps(run_dir / "best")[0]
    BestCheckpoint(checkpoint.open_run(run_dir), start_step=best_step).close()
    assert checkpoint.saved_steps(run_dir / "best") == [best_step]
    BestCheckpoint(checkpoint.open_run(run_dir), start_step=best_step - 1).close()
    assert checkpoint.saved_steps(run_dir / "best") == []


def test_bad_task_file_stops_training_before_it_starts(overfit, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "the", "choices": ["cat"], "gold": 0}\n')
    with pytest.raises(SystemExit) as e:
        train.main(["--size", "pico", "--data", str(overfit["root"] / "data"), "--runs-dir", str(tmp_path),
                    "--eval-tasks", str(bad)])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err == f"nanollama_jax.train: {bad}:1: multiple_choice item needs 'choices': a list of at least two strings"
    assert not (tmp_path / "pico").exists()
