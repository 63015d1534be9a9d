"""Issue 6 acceptance 4: a gamma as a llama.cpp LoRA adapter — base GGUF + adapter gives the logits of
the GGUF of the injected model.

LoRA in llama.cpp applies to matrix multiplications (and the token embedding lookup) only; the deltas
here are put on every matrix and the embedding, and, in the norm tests, on the norms too (folded into
the matrices each norm feeds).
Random weights of a realistic scale stand in for trained ones: the adapter path is what is tested.
"""
import subprocess
import sys

import jax
import numpy as np
import pytest

from export.gguf import write_gguf
from nanollama_jax import gamma as G
from nanollama_jax import model as M
from nanollama_jax.config import LlamaConfig
from nanollama_jax.statedict import from_state_dict, to_state_dict
from native import llama_cpp_logits

VOCAB = 448  # the size of conftest's chat_tokenizer_file


@pytest.fixture(scope="module")
def config():
    return LlamaConfig(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, head_dim=16, vocab_size=VOCAB,
                       sequence_len=128, multiple_of=64)


def _random_state(config, seed, scale):
    p = jax.tree_util.tree_map(np.array, M.init_params(config, seed))
    rng = np.random.default_rng(seed)
    state = to_state_dict(p)
    for k, a in state.items():
        if "c_proj" in k or "down_proj" in k:
            state[k] = (rng.uniform(-1, 1, a.shape) * np.sqrt(3 / a.shape[1])).astype(np.float32)
        elif k == "output.weight":
            state[k] = (0.2 * rng.standard_normal(a.shape)).astype(np.float32)
    if scale is not None:  # a delta: random on matrices and the embedding, zero on norms
        state = {k: (scale * rng.standard_normal(a.shape) * (a.std() if a.ndim == 2 else 0)).astype(np.float32)
                 for k, a in state.items()}
    return state


@pytest.fixture(scope="module")
def setup(tmp_path_factory, config, chat_tokenizer_file):
    root = tmp_path_factory.mktemp("lora")
    base = _random_state(config, 0, None)
    delta = _random_state(config, 1, 0.3)
    g = G.Gamma({k: G.Dense(v) for k, v in delta.items()}, config)
    G.save_gamma(g, root / "gamma.npz")
    write_gguf(from_state_dict(base, config), config, chat_tokenizer_file, root / "base.gguf", progress=False)
    return root, base, g


def logits(path, ids, lora=None):
    """llama.cpp's logits in a child process (F32 KV cache), with the adapter applied when given."""
    return llama_cpp_logits(path, ids, kv="f32", n_ctx=128, lora=lora)


def lora_cli(*args):
    return subprocess.run([sys.executable, "-m", "export.lora", *map(str, args)], capture_output=True, text=True)


IDS = [1] + list(range(3, 300, 7))


def _injected_gguf(root, base, g, config, tokenizer_file, name):
    inj = G.apply_gamma(base, g)
    write_gguf(from_state_dict(inj, config), config, tokenizer_file, root / name, progress=False)
    return root / name


def test_full_rank_adapter_matches_the_injected_model(setup, config, chat_tokenizer_file):
    root, base, g = setup
    r = lora_cli(root / "gamma.npz", "--base", root / "base.gguf", "-o", root / "full.gguf")
    assert r.returncode == 0, r.stderr
    assert "warning" not in r.stderr
    from gguf import GGUFReader

    rd = GGUFReader(str(root / "full.gguf"))
    assert rd.fields["general.type"].contents() == "adapter"
    assert rd.fields["adapter.type"].contents() == "lora"
    assert rd.fields["general.architecture"].contents() == "llama"
    names = {t.name: tuple(reversed(t.shape.tolist())) for t in rd.tensors}
    assert names["blk.0.attn_q.weight.lora_a"] == (64, 64) and names["blk.0.attn_k.weight.lora_b"] == (32, 32)
    assert names["blk.1.ffn_down.weight.lora_a"] == (64, 192) and "token_embd.weight.lora_a" in names
    inj = _injected_gguf(root, base, g, config, chat_tokenizer_file, "injected.gguf")
    want = logits(inj, IDS)
    got = logits(root / "base.gguf", IDS, lora=root / "full.gguf")
    plain = logits(root / "base.gguf", IDS)
    assert np.abs(want - plain).max() > 1.0  # the delta matters
    diff = np.abs(got - want).max()
    print(f"full rank: max |logit diff| {diff:.2e} (delta effect {np.abs(want - plain).max():.2f})")
    assert diff <= 1e-3


def test_low_rank_adapter_matches_the_injected_compressed_model(setup, config, chat_tokenizer_file):
    root, base, g = setup
    c = G.compress(g, rank=8)
    G.save_gamma(c, root / "r8.npz")
    r = lora_cli(root / "r8.npz", "--base", root / "base.gguf", "-o", root / "r8.gguf")
    assert r.returncode == 0, r.stderr
    assert "rank 8" in r.stdout
    assert (root / "r8.gguf").stat().st_size < 0.5 * (root / "full.gguf").stat().st_size
    inj = _injected_gguf(root, base, c, config, chat_tokenizer_file, "injected-r8.gguf")
    diff = np.abs(logits(root / "base.gguf", IDS, lora=root / "r8.gguf") - logits(inj, IDS)).max()
    print(f"rank 8: max |logit diff| {diff:.2e}")
    assert diff <= 1e-3


def test_mixed_float16_and_reference_layout_gammas_export(setup, config, chat_tokenizer_file, tmp_path):
    """Energy-ranked float16 layers, sparse head and embedding (carried densified, full rank), and a gamma
    read from the reference's layout (float16 values, no config): each adapter matches its injected model."""
    root, base, g = setup
    c = G.compress(g, energy=0.5, dtype="float16", specs={"head": {"density": 0.2}, "embedding": {"density": 0.05}})
    G.save_gamma(c, tmp_path / "mixed.npz")
    G.save_gamma(g, tmp_path / "ref.npz", layout="reference")
    for name in ("mixed", "ref"):
        r = lora_cli(tmp_path / f"{name}.npz", "--base", root / "base.gguf", "-o", tmp_path / f"{name}.gguf")
        assert r.returncode == 0, r.stderr
        inj = _injected_gguf(tmp_path, base, G.load_gamma(tmp_path / f"{name}.npz"), config, chat_tokenizer_file,
                             f"inj-{name}.gguf")
        diff = np.abs(logits(root / "base.gguf", IDS, lora=tmp_path / f"{name}.gguf") - logits(inj, IDS)).max()
        print(f"{name}: max |logit diff| {diff:.2e}")
        assert diff <= 1e-3


def test_other_tokenizer_is_refused(setup, tmp_path):
    root, base, g = setup
    import dataclasses

    G.save_gamma(dataclasses.replace(g, tokenizer_sha256="0" * 64), tmp_path / "tok.npz")
    r = lora_cli(tmp_path / "tok.npz", "--base", root / "base.gguf", "-o", tmp_path / "x.gguf")
    assert r.returncode == 1 and "tokenizer sha256" in r.stderr and not (tmp_path / "x.gguf").exists()


def _with_norm_changes(config, tensors, seed=2):
    """Norm deltas: layer 0's attn_norm at 5 positions, layer 1's ffn_norm and the final norm everywhere."""
    rng = np.random.default_rng(seed)
    t = dict(tensors)
    d = config.n_embd
    few = np.zeros(d, np.float32)
    few[rng.choice(d, 5, replace=False)] = rng.uniform(0.3, 0.6, 5)
    t["layers.0.attn_norm.weight"] = G.Dense(few)
    t["layers.1.ffn_norm.weight"] = G.Dense(rng.uniform(-0.4, 0.4, d).astype(np.float32))
    t["norm.weight"] = G.Dense(rng.uniform(-0.4, 0.4, d).astype(np.float32))
    return t


def test_norm_changes_fold_exactly(setup, config, chat_tokenizer_file, tmp_path):
    """Issue 15: a personality whose norms changed — base GGUF + adapter = the injected model (F32), for a dense
    gamma and for a rank-8 one (few changed positions: rank 8 + 5; changed everywhere: full rank)."""
    root, base, g = setup
    from gguf import GGUFReader

    for name, gamma in (("dense", g), ("r8", G.compress(g, rank=8))):
        normed = G.Gamma(_with_norm_changes(config, gamma.tensors), config)
        G.save_gamma(normed, tmp_path / f"{name}.npz")
        r = lora_cli(tmp_path / f"{name}.npz", "--base", root / "base.gguf", "-o", tmp_path / f"{name}.gguf")
        assert r.returncode == 0, r.stderr
        assert "folded" in r.stdout and "blk.1.ffn_norm.weight" in r.stdout and r.stderr == ""
        inj = _injected_gguf(tmp_path, base, normed, config, chat_tokenizer_file, f"inj-{name}.gguf")
        no_norms = _injected_gguf(tmp_path, base, G.Gamma(gamma.tensors, config), config, chat_tokenizer_file,
                                  f"inj-{name}-nonorm.gguf")
        want = logits(inj, IDS)
        got = logits(root / "base.gguf", IDS, lora=tmp_path / f"{name}.gguf")
        norm_effect = np.abs(want - logits(no_norms, IDS)).max()
        diff = np.abs(got - want).max()
        print(f"{name}: max |logit diff| {diff:.2e} (the norm changes alone move logits by {norm_effect:.2f})")
        assert norm_effect > 0.1
        assert diff <= 1e-3
        if name == "r8":
            shapes = {t.name: tuple(reversed(t.shape.tolist())) for t in GGUFReader(str(tmp_path / "r8.gguf")).tensors}
            assert shapes["blk.0.attn_q.weight.lora_a"] == (13, 64)  # rank 8 + 5 changed norm positions
            assert shapes["blk.1.ffn_gate.weight.lora_a"] == (64, 64)  # changed everywhere: full rank
            assert shapes["blk.0.ffn_gate.weight.lora_a"] == (8, 64)  # no norm change: the gamma's own rank


def test_max_rank_truncates_with_the_stated_error(setup, config, tmp_path):
    """--max-rank R: every adapter matrix at rank ≤ R, each B·A the best rank-R approximation of the exact
    (norm-folded) delta, and the relative Frobenius error reported is that of the SVD tail."""
    root, base, g = setup
    from gguf import GGUFReader

    from export.lora import write_lora

    normed = G.Gamma(_with_norm_changes(config, g.tensors), config)
    exact = write_lora(normed, root / "base.gguf", tmp_path / "exact.gguf")
    capped = write_lora(normed, root / "base.gguf", tmp_path / "r4.gguf", max_rank=4)
    assert not exact["truncated"] and set(capped["ranks"].values()) == {4}

    def deltas(path, info):  # the delta llama.cpp applies: (alpha / r)·B·A
        t = {x.name: np.asarray(x.data, np.float64) for x in GGUFReader(str(path)).tensors}
        return {k: info["alpha"] / info["ranks"][k] * t[k + ".lora_b"] @ t[k + ".lora_a"] for k in info["ranks"]
                if k != "token_embd.weight"}

    full, r4 = deltas(tmp_path / "exact.gguf", exact), deltas(tmp_path / "r4.gguf", capped)
    for k in ("blk.0.attn_q.weight", "blk.1.ffn_gate.weight", "output.weight"):
        sv = np.linalg.svd(full[k], compute_uv=False)
        tail = np.sqrt(np.sum(sv[4:] ** 2) / np.sum(sv ** 2))
        assert tail > 0.1 and abs(capped["truncated"][k] - tail) < 1e-5, k
        assert abs(np.linalg.norm(full[k] - r4[k]) / np.linalg.norm(full[k]) - tail) < 1e-4, k


def test_a_norm_that_cannot_fold_is_refused(setup, config, chat_tokenizer_file, tmp_path):
    """A base norm entry of 0 cannot be scaled into a nonzero personality value: one line, nothing written."""
    root, base, g = setup
    zero = dict(base)
    zero["layers.1.ffn_norm.weight"] = base["layers.1.ffn_norm.weight"].copy()
    zero["layers.1.ffn_norm.weight"][7] = 0
    write_gguf(from_state_dict(zero, config), config, chat_tokenizer_file, tmp_path / "zero.gguf", progress=False)
    G.save_gamma(G.Gamma(_with_norm_changes(config, g.tensors), config), tmp_path / "norm.npz")
    r = lora_cli(tmp_path / "norm.npz", "--base", tmp_path / "zero.gguf", "-o", tmp_path / "x.gguf")
    assert r.returncode == 1 and "blk.1.ffn_norm.weight" in r.stderr and "first 7" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.gguf").exists()


def test_mismatched_base_is_refused(setup, config, tmp_path, chat_tokenizer_file):
    root, base, g = setup
    wide = LlamaConfig(n_layer=2, n_embd=128, n_head=4, n_kv_head=2, head_dim=16, vocab_size=VOCAB, sequence_len=128,
                       multiple_of=64)
    write_gguf(M.init_params(wide, 0), wide, chat_tokenizer_file, tmp_path / "wide.gguf", progress=False)
    r = lora_cli(root / "gamma.npz", "--base", tmp_path / "wide.gguf", "-o", tmp_path / "x.gguf")
    assert r.returncode == 1 and "n_embd 64 vs 128" in r.stderr and not (tmp_path / "x.gguf").exists()


def test_help_has_an_example():
    r = lora_cli("--help")
    assert r.returncode == 0 and "python -m export.lora" in r.stdout
