"""--dry-run --device-memory: the predicted peak per device, and when it does not fit, the search
compiles candidates cheapest first and answers with the first that fits."""

from nanollama_jax import train
from nanollama_jax.config import load_size
from nanollama_jax.memory_fit import candidates, fit_report
from nanollama_jax.training_setup import TrainingSetup

FLAGS = dict(seq_len=128, batch_size=8, tokens_per_step=1024, steps=10, dtype="float32", remat="none",
             optimizer="adamw")


def test_candidates_are_cheapest_first():
    order = candidates(8, "none")
    assert order[:3] == [(8, "dots"), (4, "none"), (4, "dots")]  # ties: the larger micro-batch first
    assert (8, "none") not in order and len(order) == 4 * 4 - 1
    assert all(r != "none" for _, r in candidates(8, "dots"))  # never a weaker remat than asked


def test_the_search_answers_with_the_first_candidate_that_fits():
    config, recipe = load_size("pico")
    setup = TrainingSetup.build(config, recipe, "1x1", **FLAGS)
    peak = setup.step_memory[1]
    said = []
    fit, tried = fit_report(setup, recipe, FLAGS, 0.35 * peak, said.append)  # rows x remat: ~1/4 fits
    assert [(b, r) for b, r, _ in tried] == candidates(8, "none")[:len(tried)]  # in order, none skipped
    assert all(need > 0.35 * peak for _, _, need in tried[:-1]) and tried[-1][2] <= 0.35 * peak
    assert fit == tried[-1][:2] and len(tried) >= 2
    assert "does NOT fit" in said[0] and said[-1].startswith(f"fits: --batch-size {fit[0]} --remat {fit[1]}")


def test_dry_run_prints_the_recipe_and_the_fit(capsys):
    train.main(["--size", "pico", "--mesh", "1x1", "--dry-run", "--seq-len", "128", "--batch-size", "8",
                "--tokens-per-step", "1024", "--remat", "none", "--device-memory", "1000"])
    out = capsys.readouterr().out
    assert "predicted peak" in out and "of 1000.00 GiB (--batch-size 8 --remat none): fits" in out
    assert "tokens per step 1,024 (8 sequences of 128): --tokens-per-step" in out
