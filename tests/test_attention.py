"""Attention: the kernel choice per platform, the explicit-mask path against the is_causal path, and
packed documents masked from each other equal to running each document on its own."""
import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanollama_jax import model as M
from nanollama_jax.config import LlamaConfig


def qkv(b=2, t=48, heads=4, kv_heads=2, hd=64, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, t, heads, hd)).astype(np.float32)
    k = rng.normal(size=(b, t, kv_heads, hd)).astype(np.float32)
    v = rng.normal(size=(b, t, kv_heads, hd)).astype(np.float32)
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


def with_live_projections(params, seed):
    """Init zeroes the attention-out and down projections; fill them so attention reaches the logits."""
    rng = np.random.default_rng(seed)
    layers = params["layers"]
    for mod, name in (("attn", "c_proj"), ("ffn", "down_proj")):
        w = layers[mod][name]["kernel"]
        layers[mod][name]["kernel"] = jnp.asarray(rng.normal(0, 0.05, w.shape).astype(np.float32))
    return params


def test_segment_mask_path_equals_causal_path():
    """One segment through the mask path = the is_causal path = an explicit lower-triangular mask."""
    q, k, v = qkv()
    causal = M.attend(q, k, v, None, "xla")
    one_doc = M.attend(q, k, v, jnp.zeros(q.shape[:2], jnp.int32), "xla")
    tril = jnp.tril(jnp.ones((q.shape[1], q.shape[1]), bool))[None, None]
    explicit = jax.nn.dot_product_attention(q, k, v, mask=tril, implementation="xla")
    assert np.abs(np.asarray(one_doc - causal)).max() <= 1e-5
    assert np.abs(np.asarray(explicit - causal)).max() <= 1e-5


@pytest.mark.parametrize("t", [200, 64, 30])  # 4 blocks with a short last one; one block; shorter than one
def test_causal_blocks_equal_one_full_kernel_call(t):
    """The XLA path's query blocks (each against keys up to its own end) = XLA's kernel over the whole
    square, values and gradients, with GQA and packed documents: only the never-seen keys are skipped.
    Tolerance: float32 rounding of sums over up to t terms (~1e-6 relative)."""
    q, k, v = qkv(b=2, t=t)
    seg = jnp.asarray(np.cumsum(np.random.default_rng(5).random((2, t)) < 0.05, axis=1), jnp.int32)
    blocks = M.causal_blocks(t)
    assert blocks[0][0] == 0 and blocks[-1][1] == t and len(blocks) == max(1, -(-t // 64))

    def whole(q, k, v, seg):
        mask = None if seg is None else (seg[:, :, None] == seg[:, None, :])[:, None]
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="xla")

    for s in (None, seg):
        cotangent = jnp.sin(q)
        got_grads = jax.grad(lambda *a: jnp.sum(M.attend(*a, s, "xla") * cotangent), (0, 1, 2))(q, k, v)
        want_grads = jax.grad(lambda *a: jnp.sum(whole(*a, s) * cotangent), (0, 1, 2))(q, k, v)
        assert np.abs(np.asarray(M.attend(q, k, v, s, "xla") - whole(q, k, v, s))).max() <= 1e-5
        for g, w in zip(got_grads, want_grads):
            assert np.abs(np.asarray(g - w)).max() <= 1e-4 * max(1.0, float(np.abs(np.asarray(w)).max()))


def test_segments_attend_only_within_their_segment():
    q, k, v = qkv(b=1, t=30)
    seg = jnp.asarray([[0] * 10 + [1] * 12 + [2] * 8], jnp.int32)
    out = np.asarray(M.attend(q, k, v, seg, "xla"))
    for lo, hi in ((0, 10), (10, 22), (22, 30)):
        alone = np.asarray(M.attend(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], None, "xla"))
        assert np.abs(out[:, lo:hi] - alone).max() <= 1e-5


def test_document_ids_start_at_bos():
    tokens = jnp.asarray([[5, 7, 1, 9, 9, 1, 1, 4]])
    assert np.asarray(M.document_ids(tokens, bos_id=1)).tolist() == [[0, 0, 1, 1, 1, 2, 3, 3]]


def test_packed_forward_equals_each_document_alone(gqa_config):
    """doc_mask: the logits of a window holding three BOS-started documents equal those of each document
    run by itself (positions stay global in the window; RoPE sees only relative distances)."""
    config = dataclasses.replace(gqa_config, doc_mask=True)
    params = with_live_projections(M.init_params(config, seed=3), 3)
    rng = np.random.default_rng(1)
    docs = [rng.integers(2, config.vocab_size, n).astype(np.int32) for n in (17, 25, 22)]
    docs = [np.concatenate([[config.bos_id], d]).astype(np.int32) for d in docs]
    packed = M.forward(params, jnp.asarray(np.concatenate(docs))[None], config)
    plain = M.forward(params, jnp.asarray(np.concatenate(docs))[None], gqa_config)
    start = 0
    for d in docs:
        alone = M.forward(params, jnp.asarray(d)[None], gqa_config)
        got = packed[:, start:start + len(d)]
        assert np.abs(np.asarray(got - alone)).max() <= 1e-5
        start += len(d)
    # without the mask, later documents do see earlier ones
    assert np.abs(np.asarray(plain[:, len(docs[0]):] - packed[:, len(docs[0]):])).max() > 1e-3


def test_doc_mask_loss_equals_per_document_losses(gqa_config):
    """The chunked training loss with doc_mask sees the same per-document predictions."""
    config = dataclasses.replace(gqa_config, doc_mask=True)
    params = with_live_projections(M.init_params(config, seed=4), 4)
    rng = np.random.default_rng(2)
    docs = [np.concatenate([[1], rng.integers(2, config.vocab_size, n)]).astype(np.int32) for n in (20, 27)]
    window = jnp.asarray(np.concatenate(docs))[None]
    logits = M.forward(params, window[:, :-1], config)
    assert abs(float(M.next_token_loss(params, window, config, chunk=8))
               - float(M.cross_entropy(logits, window[:, 1:]))) <= 1e-5


def test_attention_implementation_per_platform(caplog):
    config = LlamaConfig(n_layer=1, n_embd=128, n_head=2, n_kv_head=2, dtype="bfloat16")
    assert jax.default_backend() == "cpu"
    with caplog.at_level(logging.INFO, logger="nanollama_jax.model"):
        M._log_attention.cache_clear()
        assert M.attention_implementation(config) == "xla"  # cuDNN only on a GPU
        assert M.attention_implementation(config) == "xla"
    assert [r.getMessage() for r in caplog.records].count(
        "attention: xla (platform cpu, dtype bfloat16, --attention auto)") == 1  # logged once
    assert M.attention_implementation(dataclasses.replace(config, attention="cudnn")) == "cudnn"


def test_attention_setting_does_not_change_identity():
    """attention and remat are how, not what: a resume may change them (config equality ignores them)."""
    a = LlamaConfig(n_layer=1, n_embd=128, n_head=2, n_kv_head=2)
    assert a == dataclasses.replace(a, attention="xla", remat="full")
    assert a != dataclasses.replace(a, doc_mask=True)
    with pytest.raises(ValueError, match="attention must be one of auto, xla, cudnn"):
        dataclasses.replace(a, attention="flash")
