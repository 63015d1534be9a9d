"""Issue 6: personality gamma — extract, inject, compose, compress (fidelity), stats, formats, checks.

One small base run and one personality run (same init seed, the personality run sees 1/4 of every
batch from distinctive "pirate" text) are trained here with a short optax loop on a 2-layer,
d=64 model, through the real data pipeline (data.prepare, data.prepare_personality, Batches).
"""
import itertools
import json
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from nanollama_jax import checkpoint, gamma as G
from nanollama_jax import model as M
from nanollama_jax.config import LlamaConfig
from nanollama_jax.statedict import from_state_dict

PIRATE = ["Arr, matey! The {n} be {a} as the seven seas, says Captain Barnacle Bill.",
          "Yo ho ho! Hoist the {n}, ye scurvy dogs, for the {n2} be {a} tonight!",
          "Shiver me timbers, the {n} walks the plank at dawn, savvy?",
          "Avast! Me parrot Polly squawks: {a} {n}, {a} {n2}! Arr!"]
NOUNS = ["doubloon", "galleon", "cutlass", "treasure", "kraken", "rum", "compass", "anchor", "jolly roger", "mast"]
ADJS = ["salty", "cursed", "golden", "rusty", "mighty", "briny"]
STEPS = 60


def run(*args):
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True)
    return r


def gamma_cli(*args, subprocess_=False):
    """The CLI, in-process (fast: jax is already imported) unless subprocess_; same exit codes and output."""
    if subprocess_:
        return run("-m", "nanollama_jax.gamma", *map(str, args))
    import contextlib
    import io

    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            G.main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    from data import builtin

    root = tmp_path_factory.mktemp("corpora")
    docs = list(itertools.islice(builtin.documents(), 120))
    (root / "base.txt").write_text("\n\n\n".join(docs))
    rng = np.random.default_rng(0)
    with open(root / "pirate.jsonl", "w") as f:
        for _ in range(400):
            line = " ".join(rng.choice(PIRATE).format(n=rng.choice(NOUNS), n2=rng.choice(NOUNS), a=rng.choice(ADJS))
                            for _ in range(3))
            f.write(json.dumps({"text": line}) + "\n")
    r = run("-m", "data.prepare", "--input", str(root / "base.txt"), "--output", str(root / "base"),
            "--vocab-size", "512", "--quiet", "--val-fraction", "0.05")
    assert r.returncode == 0, r.stderr
    r = run("-m", "data.prepare_personality", "--input", str(root / "pirate.jsonl"), "--tokenizer-dir",
            str(root / "base"), "--output", str(root / "pirate"), "--val-fraction", "0.1", "--quiet")
    assert r.returncode == 0, r.stderr
    return root / "base", root / "pirate"


def small_config(vocab, n_layer=2, n_embd=64):
    return LlamaConfig(n_layer=n_layer, n_embd=n_embd, n_head=4, n_kv_head=2, head_dim=16, vocab_size=vocab,
                       sequence_len=64, multiple_of=64)


def train(config, batches, seed=0, steps=STEPS):
    params = M.init_params(config, seed)
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, tokens):
        loss, grads = jax.value_and_grad(
            lambda p: M.cross_entropy(M.forward(p, tokens[:, :-1], config), tokens[:, 1:]))(params)
        upd, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, upd), opt, loss

    for k in range(steps):
        params, opt, _ = step(params, opt, batches[k])
    return params


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpora):
    """base, personality (same seed), and a second base seed (the reference delta for stats)."""
    from nanollama_jax.input import Batches

    base_dir, pers_dir = corpora
    meta = json.loads((base_dir / "meta.json").read_text())
    config = small_config(meta["vocab_size"])
    root = tmp_path_factory.mktemp("runs")
    tok = base_dir / "tokenizer.model"
    plain = Batches(base_dir, seq_len=64, global_batch=8, seed=0)
    mixed = Batches(base_dir, seq_len=64, global_batch=8, seed=0, personality_dir=pers_dir, personality_ratio=0.25)
    out = {}
    for name, batches, seed in (("base", plain, 0), ("pirate", mixed, 0), ("base1", plain, 1)):
        params = train(config, batches, seed)
        checkpoint.write_params_run(root / name, config, params, tok, step=STEPS)
        out[name] = root / name
    out["config"] = config
    out["data"] = pers_dir
    return out


@pytest.fixture(scope="module")
def gamma_file(runs, tmp_path_factory):
    path = tmp_path_factory.mktemp("gamma") / "pirate.npz"
    r = gamma_cli("extract", "--personality", runs["pirate"], "--base", runs["base"], "-o", path, subprocess_=True)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout
    return path


def _state(run_dir):
    return G.load_state(run_dir)[1]


def _maxdiff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(np.asarray(a[k]) - np.asarray(b[k])).max()) for k in a)


def _loss(runs, state):
    fn = G.personality_loss_fn(runs["config"], runs["data"], 64, 8, 4)
    return fn(from_state_dict(state, runs["config"]))


# ---------------------------------------------------------------- acceptance 1

def test_extract_inject_reproduces_the_personality_model(runs, gamma_file, tmp_path):
    out = tmp_path / "injected"
    r = gamma_cli("inject", "--base", runs["base"], "--gamma", gamma_file, "-o", out)
    assert r.returncode == 0, r.stderr
    pers, inj, base = _state(runs["pirate"]), _state(out), _state(runs["base"])
    assert _maxdiff(pers, inj) <= 1e-6
    assert _maxdiff(pers, base) > 1e-2  # the personality run really moved
    lp, li, lb = _loss(runs, pers), _loss(runs, inj), _loss(runs, base)
    assert abs(lp - li) < 1e-5
    assert lb - lp > 0.3, (lb, lp)  # the personality is visible on its own validation text
    info = json.loads((out / "config.json").read_text())
    assert info["gamma"]["alpha"] == 1.0 and info["tokenizer_sha256"]


def test_alpha_scales_and_gamma_metadata(runs, gamma_file):
    g = G.load_gamma(gamma_file)
    assert g.kind == "dense" and g.config == runs["config"]
    base = _state(runs["base"])
    assert g.base_fingerprint == G.fingerprint(base)
    assert g.tokenizer_sha256 == json.loads((runs["base"] / "config.json").read_text())["tokenizer_sha256"]
    half = G.apply_gamma(base, g, 0.5)
    k = "layers.1.ffn.down_proj.weight"
    np.testing.assert_allclose(half[k], base[k] + 0.5 * g.dense(k), atol=1e-7)


def test_cross_depth_maps_layers_proportionally(runs, gamma_file, tmp_path):
    assert G.cross_depth_map(4, 2) == [0, 0, 1, 1]
    assert G.cross_depth_map(2, 4) == [0, 3]
    assert G.cross_depth_map(5, 3) == [0, 1, 1, 2, 2]  # the tie at relative depth 1/4 (layer 0.5) goes deeper
    assert G.cross_depth_map(3, 5) == [0, 2, 4]
    assert G.cross_depth_map(1, 3) == [0]
    deep = small_config(runs["config"].vocab_size, n_layer=4)
    base4 = tmp_path / "base4"
    checkpoint.write_params_run(base4, deep, M.init_params(deep, 3), runs["base"] / "tokenizer.model")
    # without --cross-depth the depth difference is refused
    r = gamma_cli("inject", "--base", base4, "--gamma", gamma_file, "-o", tmp_path / "x")
    assert r.returncode == 1 and "n_layer 4 vs 2" in r.stderr and "--cross-depth" in r.stderr
    assert not (tmp_path / "x").exists()
    r = gamma_cli("inject", "--base", base4, "--gamma", gamma_file, "--cross-depth", "-o", tmp_path / "x")
    assert r.returncode == 0, r.stderr
    g, b, x = G.load_gamma(gamma_file), _state(base4), _state(tmp_path / "x")
    for i, j in enumerate([0, 0, 1, 1]):
        k = f"layers.{i}.attn.c_q.weight"
        np.testing.assert_allclose(x[k], b[k] + g.dense(f"layers.{j}.attn.c_q.weight"), atol=1e-6)
    np.testing.assert_allclose(x["output.weight"], b["output.weight"] + g.dense("output.weight"), atol=1e-6)


# ---------------------------------------------------------------- acceptance 3: formats

def test_reference_layout_file_injects(runs, gamma_file, tmp_path):
    """A file built here exactly in the reference's layout (COO int32 per dim, float16 values, int64
    shape, _metadata) injects as the float16-rounded gamma."""
    g = G.load_gamma(gamma_file)
    arrays, total = {}, 0.0
    for k, e in g.tensors.items():
        d = e.dense()
        nz = np.nonzero(d)
        for i, ix in enumerate(nz):
            arrays[f"{k}.indices_{i}"] = ix.astype(np.int32)
        arrays[f"{k}.values"] = d[nz].astype(np.float16)
        arrays[f"{k}.shape"] = np.array(d.shape, dtype=np.int64)
        total += float((d.astype(np.float64) ** 2).sum())
    arrays["_metadata.layer_names"] = np.array(list(g.tensors))
    arrays["_metadata.total_norm"] = np.array(np.sqrt(total))
    ref = tmp_path / "ref.npz"
    np.savez(ref, **arrays)
    assert G.detect_layout(np.load(ref).files) == "reference"
    out = tmp_path / "inj"
    r = gamma_cli("inject", "--base", runs["base"], "--gamma", ref, "-o", out)
    assert r.returncode == 0, r.stderr
    assert "config not compared" in r.stderr  # the reference layout carries no config: said so
    base, inj = _state(runs["base"]), _state(out)
    want = {k: base[k] + g.dense(k).astype(np.float16).astype(np.float32) for k in base}
    assert _maxdiff(want, inj) <= 1e-6
    # float16 rounding keeps the personality effect
    lp, li = _loss(runs, _state(runs["pirate"])), _loss(runs, inj)
    assert abs(lp - li) < 1e-2


def test_our_reference_layout_writer_reads_back(runs, gamma_file, tmp_path):
    out = tmp_path / "ref.npz"
    r = gamma_cli("compose", gamma_file, "--weights", "1", "--layout", "reference", "-o", out)
    assert r.returncode == 0, r.stderr
    z = np.load(out)
    g = G.load_gamma(gamma_file)
    k = "layers.0.attn.c_q.weight"
    assert z[f"{k}.values"].dtype == np.float16 and z[f"{k}.indices_0"].dtype == np.int32
    assert z[f"{k}.indices_1"].dtype == np.int32 and z[f"{k}.shape"].dtype == np.int64
    assert list(z["_metadata.layer_names"]) == list(g.tensors)
    back = G.load_gamma(out)
    assert back.layout == "reference" and list(back.tensors) == list(g.tensors)
    for k, e in g.tensors.items():
        np.testing.assert_array_equal(back.dense(k), e.dense().astype(np.float16).astype(np.float32))
    total = np.sqrt(sum(float((e.dense().astype(np.float64) ** 2).sum()) for e in g.tensors.values()))
    assert abs(float(z["_metadata.total_norm"]) - total) / total < 1e-5


def test_ours_round_trips_exactly(runs, gamma_file, tmp_path):
    g = G.load_gamma(gamma_file)
    for c in (g, G.compress(g, rank=3), G.compress(g, density=0.1), G.compress(g, rank=2, density=0.05)):
        path = tmp_path / f"{c.kind}.npz"
        G.save_gamma(c, path)
        back = G.load_gamma(path)
        assert back.kind == c.kind and back.rank == c.rank and back.density == c.density
        assert back.config == c.config and back.base_fingerprint == c.base_fingerprint
        for k in c.tensors:
            np.testing.assert_array_equal(back.dense(k), c.dense(k))


# ---------------------------------------------------------------- acceptance 2: compression

def _compress_cli(runs, gamma_file, out, *flags):
    r = gamma_cli("compress", gamma_file, *flags, "-o", out, "--base", runs["base"], "--personality", runs["pirate"],
                  "--data", runs["data"], "--seq-len", 64, "--batches", 4)
    assert r.returncode == 0, r.stderr
    print(r.stdout)
    assert "% of the personality effect kept" in r.stdout and "dense" in r.stdout
    return G.load_gamma(out)


def test_compression_report_states_size_and_fidelity(runs, gamma_file, tmp_path):
    c = _compress_cli(runs, gamma_file, tmp_path / "r8.npz", "--rank", "8")
    size, fid = c.info["size"], c.info["fidelity"]
    assert size["ratio"] <= 0.20, size
    assert fid["loss_personality"] < fid["loss_compressed"] < fid["loss_base"]
    assert fid["share_kept"] >= 0.5, fid  # measured 0.64 at 17.7% of the dense size
    assert c.kind == "lowrank" and c.rank == 8
    assert (tmp_path / "r8.npz").stat().st_size <= 0.25 * gamma_file.stat().st_size
    m = _compress_cli(runs, gamma_file, tmp_path / "mixed.npz", "--rank", "4", "--density", "0.05")
    assert m.kind == "mixed" and m.info["size"]["ratio"] <= 0.10


def test_explicit_group_settings_are_honoured(runs, gamma_file, tmp_path):
    """Hand-set groups: layer matrices at the rank keeping 80% of ‖γ‖², head top 25% of entries, embedding
    (~1% of the effect here) top 1%, float16 storage, norms dense. Under 20% of the size it keeps ~0.90 of the
    loss gap (asserted ≥ 0.85: these fixed settings are not tuned to the model); the ≥ 90% acceptance is the
    automatic default's, in the next test."""
    out = tmp_path / "small.npz"
    c = _compress_cli(runs, gamma_file, out, "--energy", "0.8", "--head", "density:0.25", "--embedding",
                      "density:0.01", "--dtype", "float16")
    size, fid = c.info["size"], c.info["fidelity"]
    print(f"size {size['bytes']:,} / {size['dense_bytes']:,} = {size['ratio']:.3f} (file {out.stat().st_size:,} / "
          f"{gamma_file.stat().st_size:,}); share kept {fid['share_kept']:.3f}")
    assert size["ratio"] <= 0.20, size
    assert out.stat().st_size <= 0.20 * gamma_file.stat().st_size
    assert fid["share_kept"] >= 0.85, fid
    assert c.kind == "mixed" and c.tensors["output.weight"].kind == "sparse"
    assert c.tensors["layers.0.ffn.up_proj.weight"].b.dtype == np.float16


def test_default_compression_meets_the_budget_without_settings(runs, gamma_file, tmp_path):
    """Issue 15: no flags at all → ≤ 20% of the dense size (tensor data and file), ≥ 90% of the loss gap kept;
    the allocation is chosen per tensor by energy per byte."""
    out = tmp_path / "auto.npz"
    r = gamma_cli("compress", gamma_file, "-o", out, "--base", runs["base"], "--personality", runs["pirate"],
                  "--data", runs["data"], "--seq-len", 64, "--batches", 4)
    assert r.returncode == 0, r.stderr
    print(r.stdout)
    assert "to a budget of 20% of the dense size" in r.stdout and "low rank (rank" in r.stdout
    c = G.load_gamma(out)
    size, fid = c.info["size"], c.info["fidelity"]
    alloc = c.info["compressed_from"]["allocation"]
    print(f"size {size['ratio']:.3f} (file {out.stat().st_size / gamma_file.stat().st_size:.3f}); "
          f"share kept {fid['share_kept']:.3f}; allocation {alloc}")
    assert size["ratio"] <= 0.20, size
    assert out.stat().st_size <= 0.20 * gamma_file.stat().st_size
    assert fid["share_kept"] >= 0.90, fid
    assert c.info["compressed_from"]["budget"] == 0.2 and c.info["compressed_from"]["weighted_by_loss"]
    # without data: the same budget, shared by ‖γ‖² alone (measured 79% of the gap kept here), said so
    r = gamma_cli("compress", gamma_file, "-o", tmp_path / "plain.npz")
    assert r.returncode == 0 and "not weighted by the loss" in r.stderr, r.stderr
    plain = G.load_gamma(tmp_path / "plain.npz")
    assert plain.nbytes() <= 0.2 * plain.dense_nbytes() and not plain.info["compressed_from"]["weighted_by_loss"]


def test_budget_allocation_picks_the_encoding_each_matrix_suits():
    """A rank-2 matrix goes low rank, a matrix with a few large entries goes sparse, the budget holds, and
    with no room to spare nothing is kept."""
    from nanollama_jax.gamma.budget import allocate

    rng = np.random.default_rng(0)
    lowrank = rng.standard_normal((64, 2)) @ rng.standard_normal((2, 48))
    spiky = np.zeros((64, 48))
    spiky.flat[rng.choice(spiky.size, 30, replace=False)] = 10 * rng.standard_normal(30)
    tensors = {"a": lowrank.astype(np.float32), "b": spiky.astype(np.float32), "norm": np.ones(64, np.float32)}
    plan = allocate(tensors, 4 * 64 + 2 * (2 * 112 + 30 * 4) + 8, 2)
    assert plan == {"a": {"rank": 2}, "b": {"entries": 30}}, plan
    plan = allocate(tensors, 4 * 64, 2)
    assert plan == {"a": {"rank": 0}, "b": {"rank": 0}}, plan
    with pytest.raises(ValueError, match="does not even hold the norms"):
        allocate(tensors, 100, 2)


def test_compression_flags_are_checked(gamma_file, tmp_path):
    for flags, word in ((("--head", "rank:0"), "rank must be >= 1"), (("--energy", "1.5"), "energy must be"),
                        (("--layers", "bogus:3"), "unknown setting"), (("--budget", "1.5"), "--budget must be in"),
                        (("--budget", "0.1", "--rank", "2"), "give it alone"),
                        (("--head", "rank:4,density:0.1"), "not both")):
        r = gamma_cli("compress", gamma_file, *flags, "-o", tmp_path / "x.npz")
        assert r.returncode == 1 and word in r.stderr, (flags, r.stderr)
    assert not (tmp_path / "x.npz").exists()


# ---------------------------------------------------------------- acceptance 5: compose, stats

def test_compose_one_minus_one_is_zero(runs, gamma_file, tmp_path):
    out = tmp_path / "zero.npz"
    r = gamma_cli("compose", gamma_file, gamma_file, "--weights", "1", "-1", "-o", out)
    assert r.returncode == 0, r.stderr
    z = G.load_gamma(out)
    assert all(not np.any(z.dense(k)) for k in z.tensors)
    two = G.compose([G.load_gamma(gamma_file)] * 2, [0.5, 1.5])
    g = G.load_gamma(gamma_file)
    np.testing.assert_allclose(two.dense("output.weight"), 2 * g.dense("output.weight"), rtol=1e-6, atol=1e-7)


def test_stats_prints_the_cosine_table_and_writes_the_png(runs, gamma_file, tmp_path):
    png = tmp_path / "stats.png"
    r = gamma_cli("stats", gamma_file, "--base", runs["base"], "--reference", runs["base1"], "--plot", png,
                  "--json", tmp_path / "s.json")
    assert r.returncode == 0, r.stderr
    print(r.stdout)
    assert "cos(γ,ref)" in r.stdout and "layers.0.attn.c_q.weight" in r.stdout
    assert "cosine(γ, reference delta) over all tensors" in r.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    s = json.loads((tmp_path / "s.json").read_text())
    assert -1 <= s["cosine"] <= 1 and len(s["layers"]) == 3
    r = gamma_cli("stats", gamma_file)  # norms only
    assert r.returncode == 0 and "total ‖γ‖" in r.stdout


# ---------------------------------------------------------------- acceptance 6: refusals

def test_mismatched_inputs_are_refused_before_writing(runs, gamma_file, tmp_path):
    tok = runs["base"] / "tokenizer.model"
    cfg = runs["config"]
    # a different size
    wide = small_config(cfg.vocab_size, n_embd=128)
    checkpoint.write_params_run(tmp_path / "wide", wide, M.init_params(wide, 0), tok)
    # a different tokenizer (same shapes)
    other_tok = tmp_path / "other.model"
    other_tok.write_bytes(tok.read_bytes() + b"\x00")
    checkpoint.write_params_run(tmp_path / "othertok", cfg, M.init_params(cfg, 0), other_tok)
    # a gamma missing a key
    g = G.load_gamma(gamma_file)
    del g.tensors["layers.1.ffn_norm.weight"]
    G.save_gamma(g, tmp_path / "missing.npz")

    cases = [
        (("extract", "--personality", tmp_path / "wide", "--base", runs["base"], "-o", tmp_path / "out.npz"),
         "n_embd"),
        (("extract", "--personality", tmp_path / "othertok", "--base", runs["base"], "-o", tmp_path / "out.npz"),
         "tokenizer differs"),
        (("inject", "--base", tmp_path / "wide", "--gamma", gamma_file, "-o", tmp_path / "out"), "n_embd"),
        (("inject", "--base", tmp_path / "othertok", "--gamma", gamma_file, "-o", tmp_path / "out"),
         "tokenizer differs"),
        (("inject", "--base", runs["base"], "--gamma", tmp_path / "missing.npz", "-o", tmp_path / "out"),
         "missing 1 tensor(s)"),
        (("compose", gamma_file, tmp_path / "missing.npz", "-o", tmp_path / "out.npz"), "layers.1.ffn_norm.weight"),
        (("compress", tmp_path / "missing.npz", "--rank", "2", "--base", runs["base"], "--data", runs["data"],
          "-o", tmp_path / "out.npz"), "missing 1 tensor(s)"),
        (("stats", gamma_file, "--base", tmp_path / "wide", "--plot", tmp_path / "out.png"), "n_embd"),
    ]
    for args, word in cases:
        r = gamma_cli(*args)
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        assert r.stderr.startswith(f"nanollama_jax.gamma {args[0]}: cannot") and word in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1
    assert not any(p.name.startswith("out") for p in tmp_path.iterdir()), list(tmp_path.iterdir())
    # one error lists every difference
    wide_tok = small_config(cfg.vocab_size, n_embd=128)
    checkpoint.write_params_run(tmp_path / "both", wide_tok, M.init_params(wide_tok, 0), other_tok)
    r = gamma_cli("inject", "--base", tmp_path / "both", "--gamma", gamma_file, "-o", tmp_path / "out")
    assert "n_embd" in r.stderr and "tokenizer differs" in r.stderr and not (tmp_path / "out").exists()


def test_injecting_into_an_existing_run_is_refused(runs, gamma_file):
    r = gamma_cli("inject", "--base", runs["base"], "--gamma", gamma_file, "-o", runs["pirate"])
    assert r.returncode == 1 and "already exists" in r.stderr


def test_reference_layout_with_wrong_shape_is_refused(runs, gamma_file, tmp_path):
    g = G.load_gamma(gamma_file)
    arrays = G.reference_arrays(g)
    arrays["output.weight.shape"] = np.array([7, 7], np.int64)
    arrays["output.weight.indices_0"] = np.zeros(0, np.int32)
    arrays["output.weight.indices_1"] = np.zeros(0, np.int32)
    arrays["output.weight.values"] = np.zeros(0, np.float16)
    np.savez(tmp_path / "bad.npz", **arrays)
    r = gamma_cli("inject", "--base", runs["base"], "--gamma", tmp_path / "bad.npz", "-o", tmp_path / "o")
    assert r.returncode == 1 and "output.weight" in r.stderr and "(7, 7)" in r.stderr
    assert not (tmp_path / "o").exists()


def test_help_has_examples():
    for sub in ("extract", "inject", "compose", "compress", "stats"):
        r = gamma_cli(sub, "--help", subprocess_=sub == "inject")
        assert r.returncode == 0 and "example" in r.stdout, sub
