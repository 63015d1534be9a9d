"""Resume refuses what changes the run (optimizer, schedule length, lr scale, weight decay, data),
one line naming each change, and accepts what does not (remat, micro-batch with the same global
batch, mesh)."""
import json

import pytest

from nanollama_jax import checkpoint, train
from nanollama_jax.config import load_size
from nanollama_jax.plan import build_plan, resume_changes

CONFIG, RECIPE = load_size("pico")  # seq 64, batch 8, 512 tokens per step: one micro-batch
BASE = dict(steps=20, optimizer="muon", lr_scale=1.0)


def plan(recipe=None, data_parallel=1, **overrides):
    return build_plan(CONFIG, {**RECIPE, **(recipe or {})}, data_parallel, **{**BASE, **overrides})


@pytest.mark.parametrize("change,expected", [
    (dict(optimizer="adamw"), "optimizer (--optimizer) muon → adamw"),
    (dict(steps=30), "schedule length (--steps) 20 → 30"),
    (dict(lr_scale=0.5), "learning-rate scale (--lr-scale) 1.0 → 0.5"),
    (dict(recipe={"weight_decay": 0.1}), "weight decay (the recipe's weight_decay) 0.0 → 0.1"),
    (dict(seed=1), "data order and init (--seed) 0 → 1"),
    (dict(tokens_per_step=1024), "tokens per step (--tokens-per-step) 512 → 1024"),
    (dict(seq_len=32, tokens_per_step=512), "sequence length (--seq-len) 64 → 32"),
    (dict(remat="full"), None),
    (dict(batch_size=4), None),  # half the micro-batch, twice the accumulation: same global batch
    (dict(batch_size=2, data_parallel=4), None),  # another mesh
    (dict(batch_size=1, data_parallel=2, remat="dots"), None),
])
def test_resume_rules(change, expected):
    saved = json.loads(json.dumps(plan().settings()))  # as config.json holds it
    changes = resume_changes(saved, plan(**change))
    assert changes == ([expected] if expected else [])


def test_the_cli_refuses_with_one_line_and_resumes_with_another_micro_batch_and_remat(tmp_path, text_data, capsys):
    args = ["--size", "pico", "--mesh", "1x1", "--steps", "4", "--data", str(text_data), "--runs-dir", str(tmp_path),
            "--model-tag", "r", "--sample-every", "0", "--eval-batches", "1"]
    train.main([*args, "--stop-after", "2"])
    capsys.readouterr()
    for extra, named in [(["--optimizer", "adamw"], "optimizer (--optimizer) muon → adamw"),
                         (["--lr-scale", "2"], "learning-rate scale (--lr-scale) 1.0 → 2.0"),
                         (["--personality-dir", str(text_data)], "different data")]:
        with pytest.raises(SystemExit) as e:
            train.main([*args, "--resume", *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 1 and err[-1].startswith("nanollama_jax.train: ") and named in err[-1], err
    with pytest.raises(SystemExit):  # two changes: both named, on the one line
        train.main([*args, "--resume", "--optimizer", "adamw", "--steps", "5"])
    assert "muon → adamw; schedule length (--steps) 4 → 5" in capsys.readouterr().err.strip().splitlines()[-1]
    train.main([*args, "--resume", "--batch-size", "4", "--remat", "full"])
    assert checkpoint.saved_steps(tmp_path / "r")[-1] == 4
