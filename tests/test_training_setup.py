"""TrainingSetup: one object built from the plan and mesh serves evaluation, a pluggable loss and
dry-run; train's flags reject non-positive numbers as usage errors."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nanollama_jax import sharding, train
from nanollama_jax.config import load_size
from nanollama_jax.model import forward
from nanollama_jax.plan import Plan
from nanollama_jax.training_setup import TrainingSetup

SEQ = 16


def pico_setup(mesh="1x1", loss_fn=None, batch_size=2, tokens_per_step=2 * SEQ):
    extra = {"loss_fn": loss_fn} if loss_fn else {}
    return TrainingSetup.build(*load_size("pico"), mesh, seq_len=SEQ, batch_size=batch_size,
                               tokens_per_step=tokens_per_step, steps=10, dtype="float32", optimizer="adamw", **extra)


def token_losses(params, tokens, config) -> np.ndarray:
    """Per-position next-token cross-entropy [rows, T], computed apart from any training code."""
    logits = np.asarray(forward(params, jnp.asarray(tokens[:, :-1]), config), np.float64)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, tokens[:, 1:, None].astype(np.int64), -1)[..., 0]


def masked_loss(params, batch, config):
    """An SFT-style loss: mean cross-entropy over the target positions the mask keeps."""
    logits = forward(params, batch["tokens"][:, :-1], config).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["tokens"][:, 1:])
    mask = batch["mask"][:, 1:].astype(jnp.float32)
    return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, 512, size=(2, SEQ + 1)).astype(np.int32)


def test_evaluation_needs_no_optimizer(tokens):
    setup = pico_setup()
    params = sharding.init_sharded(setup.config, setup.mesh, 0, setup.param_shardings)
    with setup.activate():
        loss = float(setup.eval_step(params, setup.eval_batch(tokens)))
    assert loss == pytest.approx(token_losses(params, tokens, setup.config).mean(), rel=1e-5)
    assert "optimizer" not in vars(setup) and "opt_shapes" not in vars(setup)  # never built for evaluation


def test_a_masked_loss_plugs_into_the_train_step(tokens):
    setup = pico_setup(loss_fn=masked_loss)
    mask = np.zeros_like(tokens)
    mask[:, SEQ // 2:] = 1  # loss on the second half only, as on an assistant's reply
    with setup.activate():
        params, opt_state = setup.init_state()
        expected = token_losses(params, tokens, setup.config)[:, SEQ // 2 - 1:].mean()
        before = np.asarray(params["output"]["kernel"]).copy()
        params, opt_state, out = setup.train_step(params, opt_state, setup.train_batch({"tokens": tokens, "mask": mask}))
    assert float(out["loss"]) == pytest.approx(expected, rel=1e-5)
    assert np.abs(np.asarray(params["output"]["kernel"]) - before).max() > 0  # and it trains


def test_accumulation_rows_are_laid_out_for_each_process():
    setup = pico_setup(batch_size=1, tokens_per_step=3 * SEQ)  # 3 micro-batches of one row
    rows = np.arange(3 * (SEQ + 1), dtype=np.int32).reshape(3, SEQ + 1)
    batch = np.asarray(setup.train_batch(rows))
    assert batch.shape == (3, 1, SEQ + 1)
    for r in range(3):  # row r: micro-row r // accum of accumulation step r % accum
        np.testing.assert_array_equal(batch[r % 3, r // 3], rows[r])


def test_abstract_state_carries_the_shardings_and_allocates_nothing():
    setup = pico_setup(mesh="4x1", batch_size=1, tokens_per_step=4 * SEQ)
    params, opt_state = setup.abstract_state()
    leaves = jax.tree_util.tree_leaves(params) + jax.tree_util.tree_leaves(opt_state)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert params["layers"]["ffn"]["up_proj"]["kernel"].sharding == setup.param_shardings["layers"]["ffn"]["up_proj"]["kernel"]
    assert "mesh fsdp=4 x tensor=1" in setup.describe() and "1 rows x 4 data-parallel" in setup.describe()


def test_a_plan_and_mesh_that_disagree_are_refused():
    plan = Plan(load_size("pico")[0], 10, 1, SEQ, 1, 1, 1, 0, "adamw", 1.0, 0.0)  # 1-way data parallel
    with pytest.raises(ValueError, match="fsdp=4"):
        TrainingSetup(plan, sharding.make_mesh("4x1"))


@pytest.mark.parametrize("flag,value,wanted", [
    ("--log-every", "0", "a positive integer"),
    ("--steps", "0", "a positive integer"),
    ("--batch-size", "0", "a positive integer"),
    ("--seq-len", "-8", "a positive integer"),
    ("--tokens-per-step", "0", "a positive integer"),
    ("--eval-every", "0", "a positive integer"),
    ("--eval-batches", "0", "a positive integer"),
    ("--save-every", "0", "a positive integer"),
    ("--keep", "0", "a positive integer"),
    ("--stop-after", "0", "a positive integer"),
    ("--sample-every", "-1", "an integer >= 0"),
    ("--seed", "-1", "an integer >= 0"),
    ("--steps", "ten", "a positive integer"),
    ("--lr-scale", "0", "a positive number"),
    ("--personality-ratio", "1.5", "a number in [0, 1)"),
])
def test_bad_numbers_are_usage_errors(capsys, flag, value, wanted):
    with pytest.raises(SystemExit) as e:
        train.main(["--dry-run", "--no-compile", flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [f"nanollama_jax.train: argument {flag}: must be {wanted}, got {value!r} (see --help)"]
