import dataclasses
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanollama_jax import model as M
from nanollama_jax import sharding as S
from nanollama_jax.config import LlamaConfig, load_size

EXPECTED_PARAMS = {
    "nano": 45_819_264, "micro": 87_310_848, "mini": 175_012_608, "small": 336_118_784,
    "goldie": 1_123_117_056, "medium": 1_574_045_696, "large": 3_707_464_704, "big": 6_996_414_464,
}


def leaves(tree):
    return jax.tree_util.tree_leaves(tree)


@pytest.mark.parametrize("size", list(EXPECTED_PARAMS))
def test_param_count_matches_reference(size):
    config = dataclasses.replace(load_size(size)[0], vocab_size=32000)
    shapes = M.param_shapes(config)  # eval_shape: nothing allocated, so `big` works here
    assert sum(int(np.prod(s.shape)) for s in leaves(shapes)) == EXPECTED_PARAMS[size]
    assert config.param_count() == EXPECTED_PARAMS[size]


def test_dry_run_prints_exact_counts():
    out = subprocess.run([sys.executable, "-m", "nanollama_jax.train", "--size", "big", "--vocab-size", "32000",
                          "--dry-run", "--no-compile"], capture_output=True, text=True, check=True).stdout
    assert "6,996,414,464 parameters" in out
    assert "FLOPs/token" in out and "mesh" in out


def test_derived_shapes():
    nano = load_size("nano")[0]
    assert (nano.ffn_hidden, nano.head_dim, nano.padded_vocab) == (1024, 64, 32000)
    assert dataclasses.replace(nano, vocab_size=32001).padded_vocab == 32064
    assert load_size("big")[0].ffn_hidden == 11008


def test_init_follows_reference(gqa_config):
    c = gqa_config
    p = M.init_params(c, seed=0)
    lay = p["layers"]
    for zero in (lay["attn"]["c_proj"]["kernel"], lay["ffn"]["down_proj"]["kernel"]):
        assert not np.any(np.asarray(zero))
    for one in (lay["attn_norm"]["scale"], lay["ffn_norm"]["scale"], p["norm"]["scale"]):
        assert np.all(np.asarray(one) == 1.0)
    bound = np.sqrt(3.0 / c.n_embd)
    for name, w in [("c_q", lay["attn"]["c_q"]), ("c_k", lay["attn"]["c_k"]), ("c_v", lay["attn"]["c_v"]),
                    ("gate", lay["ffn"]["gate_proj"]), ("up", lay["ffn"]["up_proj"])]:
        w = np.asarray(w["kernel"])
        assert np.abs(w).max() <= bound, name
        assert np.abs(w).max() > 0.99 * bound, name  # uniform fills the interval
        assert abs(w.std() - bound / np.sqrt(3)) < 0.02 * bound, name  # U(±a) has std a/sqrt(3)
    # every layer gets its own draw
    q = np.asarray(lay["attn"]["c_q"]["kernel"])
    assert not np.array_equal(q[0], q[1])
    emb = np.asarray(p["tok_embeddings"]["embedding"])
    assert abs(emb.std() - 1.0) < 0.02 and abs(emb.mean()) < 0.02
    out = np.asarray(p["output"]["kernel"])
    assert abs(out.std() - 0.001) < 0.00005


def test_same_seed_same_params(gqa_config):
    a, b, c = M.init_params(gqa_config, 7), M.init_params(gqa_config, 7), M.init_params(gqa_config, 8)
    assert all(np.array_equal(x, y) for x, y in zip(leaves(a), leaves(b)))
    assert not np.array_equal(a["layers"]["attn"]["c_q"]["kernel"], c["layers"]["attn"]["c_q"]["kernel"])


def random_params(config, seed):
    """Init with the zero-initialised projections filled in, so the parity tests see every weight."""
    p = M.init_params(config, seed)
    rng = np.random.default_rng(seed)

    def fill(x):
        x = np.asarray(x)
        return jnp.asarray(rng.normal(0, 0.05, x.shape).astype(np.float32) if x.ndim > 1 and not x.any() else x)

    p = jax.tree_util.tree_map(fill, p)
    p["output"]["kernel"] = jnp.asarray(rng.normal(0, 0.05, p["output"]["kernel"].shape).astype(np.float32))
    p["norm"]["scale"] = jnp.asarray(rng.uniform(0.5, 1.5, p["norm"]["scale"].shape).astype(np.float32))
    return p


def tokens_for(config, batch=3, length=80, seed=0):
    return np.random.default_rng(seed).integers(0, config.vocab_size, (batch, length)).astype(np.int32)


@pytest.mark.parametrize("which", ["mha_config", "gqa_config"])
def test_logits_match_transformers(which, request, tmp_path):
    import torch
    from transformers import LlamaForCausalLM

    from export.hf import load_hf, save_hf

    config = request.getfixturevalue(which)
    params = random_params(config, seed=1)
    save_hf(params, config, tmp_path / "hf")
    hf_model = LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    tokens = tokens_for(config)
    with torch.no_grad():
        theirs = hf_model(torch.from_numpy(tokens).long()).logits.numpy()
    ours = np.asarray(M.forward(params, jnp.asarray(tokens), config))
    v = config.vocab_size
    assert np.abs(ours[..., :v] - theirs[..., :v]).max() <= 1e-4
    # round trip: export then import gives the same params, bit for bit, except the padding rows
    # (not exported: the model masks them), which come back zero
    config_back, params_back = load_hf(tmp_path / "hf")
    assert config_back == config
    real = {"tok_embeddings": lambda a: a[:v], "output": lambda a: a[:, :v]}
    pad = {"tok_embeddings": lambda a: a[v:], "output": lambda a: a[:, v:]}
    for name in params:
        mine, back = params[name], params_back[name]
        if name in real:
            (k,) = mine
            mine, back = real[name](np.asarray(mine[k])), real[name](np.asarray(back[k]))
            assert not pad[name](np.asarray(params_back[name][k])).any()
        assert all(np.array_equal(a, b) for a, b in zip(leaves(mine), leaves(back)))


def test_padded_vocab_rows_are_zero_and_masked(mha_config):
    p = M.init_params(mha_config)
    assert not np.asarray(p["tok_embeddings"]["embedding"])[1000:].any()
    assert not np.asarray(p["output"]["kernel"])[:, 1000:].any()
    assert np.asarray(p["tok_embeddings"]["embedding"])[:1000].all()
    logits = np.asarray(M.forward(p, jnp.zeros((1, 4), jnp.int32), mha_config))
    assert logits.shape[-1] == 1024 and np.all(logits[..., 1000:] <= -1e8)


def test_remat_keeps_gradients_and_shrinks_the_compiled_step(gqa_config):
    """Remat recomputes activations in the backward pass: the gradients are those without it, and the
    compiled gradient step holds fewer bytes of temporaries (dots keeps matmul outputs, full keeps none)."""
    p = random_params(gqa_config, 4)
    tokens = jnp.asarray(tokens_for(gqa_config, 4, 97))
    grads, temp_bytes = {}, {}
    for policy in ("none", "dots", "full"):
        c = dataclasses.replace(gqa_config, remat=policy)
        step = jax.jit(jax.grad(lambda p: M.cross_entropy(M.forward(p, tokens[:, :-1], c), tokens[:, 1:])))
        compiled = step.lower(p).compile()
        temp_bytes[policy] = compiled.memory_analysis().temp_size_in_bytes
        grads[policy] = leaves(compiled(p))
    assert all(np.abs(np.asarray(g)).max() > 0 for g in grads["none"])  # every parameter gets a gradient
    for policy in ("dots", "full"):
        for got, want in zip(grads[policy], grads["none"]):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-7, err_msg=policy)
    print("compiled temporaries (bytes):", temp_bytes)
    assert temp_bytes["full"] < temp_bytes["dots"] < 0.7 * temp_bytes["none"]


def test_kv_cache_matches_full_forward(gqa_config):
    p = random_params(gqa_config, 2)
    tokens = jnp.asarray(tokens_for(gqa_config, 2, 40))
    full = M.forward(p, tokens, gqa_config)
    cache = M.init_cache(gqa_config, 2, 64)
    first, cache = M.decode_step(p, tokens[:, :25], cache, 0, gqa_config)
    steps = [first]
    for t in range(25, 40):
        logits, cache = M.decode_step(p, tokens[:, t:t + 1], cache, t, gqa_config)
        steps.append(logits)
    assert np.abs(np.asarray(jnp.concatenate(steps, axis=1) - full)).max() <= 1e-5


@pytest.mark.parametrize("mesh_spec", ["4x1", "2x2"])
def test_sharded_forward_equals_single_device(gqa_config, mesh_spec):
    assert jax.device_count() == 4
    c = gqa_config
    tokens = tokens_for(c, batch=4, length=64)
    reference = np.asarray(M.forward(random_params(c, 3), jnp.asarray(tokens), c))
    mesh = S.make_mesh(mesh_spec)
    shardings = S.param_shardings(c, mesh)
    params = S.shard_like(random_params(c, 3), shardings)
    # really distributed: the big matrices are split, each device holds a fraction
    q = params["layers"]["attn"]["c_q"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert len({s.device for s in q.addressable_shards}) == 4
    assert q.addressable_shards[0].data.size == q.size // 4
    total = sum(x.nbytes for x in leaves(params))
    assert S.bytes_per_device(params) < total / 2
    with jax.set_mesh(mesh), S.axis_rules():
        fwd = jax.jit(lambda p, t: M.forward(p, t, c), in_shardings=(shardings, S.batch_sharding(mesh)))
        out = np.asarray(fwd(params, jax.device_put(tokens, S.batch_sharding(mesh))))
    assert np.abs(out - reference).max() <= 1e-5


def test_params_born_sharded(gqa_config):
    mesh = S.make_mesh("4x1")
    params = S.init_sharded(gqa_config, mesh, seed=5)
    emb = params["tok_embeddings"]["embedding"]
    assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert emb.addressable_shards[0].data.shape == (emb.shape[0], emb.shape[1] // 4)
    reference = M.init_params(gqa_config, seed=5)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(leaves(params), leaves(reference)))


def test_bad_mesh_is_a_clear_error():
    with pytest.raises(ValueError, match="needs 6 devices but 4"):
        S.make_mesh("3x2")
    with pytest.raises(ValueError, match="FSDPxTENSOR"):
        S.make_mesh("four")


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        LlamaConfig(n_layer=1, n_embd=64, n_head=3, n_kv_head=2)
