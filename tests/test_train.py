import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nanollama_jax import checkpoint, optim, sharding, train
from nanollama_jax.config import load_size
from nanollama_jax.generate import generate, prompt_logits
from nanollama_jax.model import forward, init_params
from nanollama_jax.plan import Plan
from nanollama_jax.training_setup import TrainingSetup

PICO = ["--size", "pico", "--log-every", "100", "--sample-every", "10", "--eval-batches", "1"]


def run_train(tmp_path, data, tag, *extra):
    train.main([*PICO, "--data", str(data), "--runs-dir", str(tmp_path), "--model-tag", tag, *extra])
    return tmp_path / tag


def losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def straight(tmp_path_factory, text_data):
    """The reference: 20 steps in one go on one device."""
    return run_train(tmp_path_factory.mktemp("runs"), text_data, "straight", "--mesh", "1x1", "--steps", "20",
                     "--save-every", "4")


def test_loss_falls_and_validation_is_logged(straight):
    rows = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert val[-1] < val[0] - 0.5
    assert all(np.isfinite(r["val_bpb"]) and r["val_bpb"] > 0 for r in rows if "val_bpb" in r)
    assert (straight / "curves.png").stat().st_size > 1000
    assert (straight / "tokenizer.model").is_file()
    samples = [r["sample"] for r in rows if "sample" in r]
    assert samples and all(isinstance(s, str) and s for s in samples)


@pytest.mark.parametrize("mesh,batch", [("4x1", "2"), ("2x2", "4")])
def test_sharded_training_equals_single_device(tmp_path, text_data, straight, mesh, batch):
    run = run_train(tmp_path, text_data, "sharded", "--mesh", mesh, "--batch-size", batch, "--steps", "20",
                    "--stop-after", "10")
    ours, ref = losses(run), losses(straight)
    assert sorted(ours) == list(range(1, 11))
    np.testing.assert_allclose([ours[s] for s in ours], [ref[s] for s in ours], rtol=2e-5)


def test_state_is_distributed():
    setup = TrainingSetup(Plan(load_size("pico")[0], 20, 2, 64, 2, 4, 1, 0, "muon", 1.0, 0.0), sharding.make_mesh("4x1"))
    p_sh, o_sh = setup.param_shardings, setup.opt_shardings
    assert p_sh["layers"]["ffn"]["up_proj"]["kernel"].spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    moments = [sh.spec for path, sh in jax.tree_util.tree_leaves_with_path(o_sh)
               if "up_proj" in jax.tree_util.keystr(path) and sh.spec != jax.sharding.PartitionSpec()]
    assert moments and all(spec[1] == "fsdp" for spec in moments)  # Muon momentum sharded like its weight


def test_stop_and_resume_is_exact(tmp_path, text_data, straight):
    run_train(tmp_path, text_data, "resumed", "--mesh", "1x1", "--steps", "20", "--stop-after", "10")
    assert checkpoint.saved_steps(tmp_path / "resumed")[-1] == 10
    run = run_train(tmp_path, text_data, "resumed", "--mesh", "1x1", "--steps", "20", "--resume")
    assert losses(run) == losses(straight)  # bit-identical per-step losses


def test_resume_onto_another_mesh(tmp_path, text_data, straight):
    run_train(tmp_path, text_data, "remesh", "--mesh", "1x1", "--steps", "20", "--stop-after", "10")
    run = run_train(tmp_path, text_data, "remesh", "--mesh", "4x1", "--batch-size", "2", "--steps", "20",
                    "--resume", "--stop-after", "4")
    ours, ref = losses(run), losses(straight)
    np.testing.assert_allclose([ours[s] for s in range(11, 15)], [ref[s] for s in range(11, 15)], rtol=2e-5)


def test_sigkill_resumes_from_last_checkpoint_and_skips_partial_ones(tmp_path, text_data, straight):
    cmd = [sys.executable, "-m", "nanollama_jax.train", *PICO, "--data", str(text_data), "--runs-dir", str(tmp_path),
           "--model-tag", "killed", "--mesh", "1x1", "--steps", "20", "--save-every", "4"]
    # same XLA setup as this process (4 simulated devices), so the straight run is bit-comparable
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and max(losses(tmp_path / "killed"), default=0) >= 10:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = checkpoint.saved_steps(tmp_path / "killed")
    assert saved and saved[-1] < 20
    # a checkpoint that was being written when the process died: orbax's temporary folder
    partial = tmp_path / "killed" / "checkpoints" / f"{saved[-1] + 4}.orbax-checkpoint-tmp-1234"
    partial.mkdir()
    (partial / "junk").write_text("half-written")
    run = run_train(tmp_path, text_data, "killed", "--mesh", "1x1", "--steps", "20", "--save-every", "4", "--resume")
    assert losses(run) == losses(straight)


def test_refuses_to_overwrite_or_resume_with_other_data(tmp_path, text_data, straight, capsys):
    run_train(tmp_path, text_data, "guarded", "--mesh", "1x1", "--steps", "20", "--stop-after", "2")
    with pytest.raises(SystemExit) as e:
        run_train(tmp_path, text_data, "guarded", "--mesh", "1x1", "--steps", "20")
    assert e.value.code == 1 and "pass --resume" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_train(tmp_path, text_data, "guarded", "--mesh", "1x1", "--steps", "20", "--resume", "--seed", "1")
    assert "--seed" in capsys.readouterr().err


def test_divergence_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path, text_data, capsys):
    with pytest.raises(SystemExit) as e:  # a learning rate of ~1e29 overflows the activations at step 2
        run_train(tmp_path, text_data, "diverged", "--mesh", "1x1", "--steps", "5", "--save-every", "1",
                  "--optimizer", "adamw", "--lr-scale", "1e30")
    err = capsys.readouterr().err
    assert e.value.code == 1 and "training diverged" in err and "step 1" in err
    assert checkpoint.saved_steps(tmp_path / "diverged") == [1]
    _, params = checkpoint.load_params(tmp_path / "diverged")
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(params))


def test_init_from_continues_from_another_runs_weights(tmp_path, text_data, straight):
    run = run_train(tmp_path, text_data, "continued", "--mesh", "1x1", "--steps", "2", "--init-from", str(straight))
    first = losses(run)[1]
    assert first < losses(straight)[1] - 1.0  # starts from trained weights, not from scratch
    assert abs(first - losses(straight)[20]) < 0.5


def test_doc_mask_keeps_attention_inside_packed_documents(tmp_path, text_data):
    from nanollama_jax.input import Batches, load_meta

    run = run_train(tmp_path, text_data, "docs", "--mesh", "1x1", "--steps", "2", "--doc-mask")
    plain = run_train(tmp_path, text_data, "plain", "--mesh", "1x1", "--steps", "2")
    config = checkpoint.open_run(run).config
    bos = load_meta(text_data)["bos_id"]
    assert config.doc_mask and config.bos_id == bos
    first = Batches(text_data, seq_len=config.sequence_len, global_batch=8, seed=0)[0]
    assert (first[:, 1:] == bos).any()  # documents meet inside the first batch's windows
    # the attention output projections start at zero, so attention shows from the second step on; runs
    # are bit-reproducible on CPU, so the masked attention is the only difference
    assert losses(run)[1] == losses(plain)[1]
    assert losses(run)[2] != losses(plain)[2]


def test_two_processes_train_like_one_with_four_devices(tmp_path, text_data):
    one = run_train(tmp_path, text_data, "four", "--mesh", "4x1", "--batch-size", "2", "--steps", "6")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "nanollama_jax.train", *PICO, "--data", str(text_data), "--runs-dir", str(tmp_path),
         "--model-tag", "two", "--mesh", "4x1", "--batch-size", "2", "--steps", "6",
         "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    ours, ref = losses(tmp_path / "two"), losses(one)
    assert sorted(ours) == list(range(1, 7))
    np.testing.assert_allclose([ours[s] for s in ours], [ref[s] for s in ours], rtol=2e-5)


def test_headline_small_on_four_devices(tmp_path, text_data):
    run = tmp_path / "small"
    # AdamW keeps this CPU test quick: Muon's orthogonalisation of 336M parameters dominates a step
    # of 128 tokens here (it is negligible at real batch sizes); the sharded Muon path is tested above.
    train.main(["--size", "small", "--mesh", "4x1", "--steps", "2", "--seq-len", "32", "--batch-size", "1",
                "--tokens-per-step", "128", "--data", str(text_data), "--runs-dir", str(tmp_path),
                "--model-tag", "small", "--sample-every", "0", "--eval-batches", "1", "--optimizer", "adamw"])
    assert sorted(losses(run)) == [1, 2]
    assert checkpoint.open_run(run).config.n_layer == 24


def test_dry_run_compiles_and_reports_memory(capsys):
    train.main(["--size", "tiny", "--mesh", "2x2", "--dry-run", "--seq-len", "128", "--batch-size", "2"])
    out = capsys.readouterr().out
    assert "5,245,184 parameters" in out and "memory per device:" in out and "GiB" in out


# --- optimizer -------------------------------------------------------------------------------------

def test_learning_rates_follow_reference():
    nano = load_size("nano")[0]  # d 384: s = (384/768)^-0.5 = sqrt(2)
    rates = optim.learning_rates(nano, steps=1000, step=500 - 1)
    s = np.sqrt(2)
    assert rates == pytest.approx({"embed": 0.2 * s, "head": 0.004 * s, "norm": 0.004 * s, "matrix": 0.02})
    scaled = optim.learning_rates(nano, steps=1000, step=499, lr_scale=0.5)
    assert all(scaled[g] == pytest.approx(rates[g] / 2) for g in rates)  # --lr-scale reaches every group
    mult = optim.wsd_schedule(1000, warmup=100)
    assert [float(mult(t)) for t in (0, 49, 99, 499, 750, 999)] == pytest.approx([0.01, 0.5, 1, 1, 0.5, 0.002])


def first_update(kind, config, params, grads):
    tx = optim.make_optimizer(config, steps=100, kind=kind, warmup=1)
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates


def test_muon_orthogonalises_each_scanned_layer():
    config = load_size("pico")[0]
    params = init_params(config)
    rng = np.random.default_rng(0)
    grads = jax.tree_util.tree_map(lambda p: jnp.asarray(rng.normal(size=p.shape).astype(np.float32)) * 1e-3, params)
    grads["layers"]["attn"]["c_q"]["kernel"] = grads["layers"]["attn"]["c_q"]["kernel"].at[1].set(0.0)
    muon = first_update("muon", config, params, grads)
    adam = first_update("adamw", config, params, grads)
    q = np.asarray(muon["layers"]["attn"]["c_q"]["kernel"])
    assert not q[1].any()  # each layer is its own matrix: a zero gradient stays a zero update
    sv = np.linalg.svd(q[0], compute_uv=False)
    spread = lambda sv: np.percentile(sv, 95) / np.percentile(sv, 5)  # noqa: E731
    assert spread(sv) < 1.6  # orthogonalised: a flat spectrum
    sv_adam = np.linalg.svd(np.asarray(adam["layers"]["attn"]["c_q"]["kernel"][0]), compute_uv=False)
    assert spread(sv_adam) > 5  # Adam's sign-like update is not
    # per-matrix rate sqrt(max(1, out/in)): up [128 -> 512] vs c_q [128 -> 128]
    up = np.asarray(muon["layers"]["ffn"]["up_proj"]["kernel"][0])
    ratio = (np.linalg.norm(up) / np.sqrt(128)) / (np.linalg.norm(q[0]) / np.sqrt(128))
    assert ratio == pytest.approx(np.sqrt(512 / 128), rel=0.2)
    # AdamW groups: the first step moves each weight by its group's rate
    s = (128 / 768) ** -0.5
    for path, rate in [(("tok_embeddings", "embedding"), 0.2 * s), (("output", "kernel"), 0.004 * s),
                       (("norm", "scale"), 0.004 * s)]:
        u = muon[path[0]][path[1]]
        assert np.abs(np.asarray(u)).max() == pytest.approx(rate * float(optim.wsd_schedule(100, 1)(0)), rel=1e-3)


def test_the_training_optimizer_clips_the_global_norm_at_one():
    """Through `make_optimizer` as training builds it: a gradient of norm 1e6 leaves the optimizer in the
    state the same gradient scaled to norm 1 does (moments and update alike); a gradient of norm 0.5 is
    left alone; and without the clip the enormous gradient's state differs."""
    config = load_size("pico")[0]
    params = init_params(config)
    rng = np.random.default_rng(0)
    grads = jax.tree_util.tree_map(lambda p: jnp.asarray(rng.normal(size=p.shape).astype(np.float32)), params)
    unit = jax.tree_util.tree_map(lambda g: g / optax.tree.norm(grads), grads)

    def step(tx, scale):
        g = jax.tree_util.tree_map(lambda u: u * scale, unit)
        updates, state = tx.update(g, tx.init(params), params)
        return [np.asarray(x) for x in jax.tree_util.tree_leaves((updates, state)) if jnp.issubdtype(x.dtype, jnp.floating)]

    def same(a, b):  # every leaf equal to 1e-4 of its largest value (float32 rounding of the rescaling)
        return all(np.abs(x - y).max() <= 1e-4 * np.abs(y).max() for x, y in zip(a, b))

    tx = optim.make_optimizer(config, steps=100)
    at_one = step(tx, 1.0)
    assert same(step(tx, 1e6), at_one)  # clipped to norm 1
    unclipped = optim.make_optimizer(config, steps=100, clip=np.inf)
    assert not same(step(tx, 0.5), at_one)  # below the threshold: untouched
    assert same(step(tx, 0.5), step(unclipped, 0.5))  # ... as the optimizer without clipping leaves it
    assert not same(step(unclipped, 1e6), at_one)


# --- generation ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(straight):
    return checkpoint.load_params(straight)


def test_dump_logits_equals_forward(tmp_path, trained, straight):
    run, params = trained
    ids = np.asarray([1, 5, 9, 100, 42, 7, 300, 2, 11], np.int32)
    np.save(tmp_path / "ids.npy", ids)
    subprocess.run([sys.executable, "-m", "nanollama_jax.generate", "--checkpoint", str(straight), "--tokens",
                    str(tmp_path / "ids.npy"), "--dump-logits", str(tmp_path / "out.npy")], check=True,
                   capture_output=True)
    dumped = np.load(tmp_path / "out.npy")
    assert dumped.dtype == np.float32 and dumped.shape == (9, run.config.vocab_size)
    expected = np.asarray(forward(params, jnp.asarray(ids)[None], run.config))[0, :, : run.config.vocab_size]
    np.testing.assert_allclose(dumped, expected, atol=1e-5)


def test_kv_cache_decoding_equals_recomputation(trained):
    run, params = trained
    prompt = [1, 20, 30, 40]
    cached = generate(params, run.config, prompt, 24, temperature=0.0)
    seq = list(prompt)
    for _ in range(24):
        seq.append(int(np.argmax(prompt_logits(params, run.config, np.asarray(seq))[-1])))
    assert cached == seq[len(prompt):]


def test_generate_cli_streams_text(straight):
    out = subprocess.run([sys.executable, "-m", "nanollama_jax.generate", "--checkpoint", str(straight), "--prompt",
                          "The", "--max-tokens", "12", "--seed", "3"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("The") and len(out.stdout) > 3 and "tok/s" in out.stderr


def test_generate_missing_checkpoint_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "nanollama_jax.generate", "--checkpoint", str(tmp_path / "nope")],
                         capture_output=True, text=True)
    assert out.returncode == 1 and out.stderr.strip().count("\n") == 0 and "no such run" in out.stderr
