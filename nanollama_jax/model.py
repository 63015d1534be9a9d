"""Llama 3 in Flax linen: RMSNorm, half-split RoPE, GQA attention, SwiGLU, untied head.

Layers are stacked along a leading `layers` axis and run with `nn.scan`, so compile time does not
grow with depth. Every parameter names its logical axes next to its shape; `sharding.py` maps them
to the device mesh. The param pytree (kernels are [in, out], torch's transpose):

    tok_embeddings/embedding          [vocab, embed]
    layers/attn_norm/scale            [layers, embed]
    layers/attn/c_q/kernel            [layers, embed, heads]      heads = n_head·head_dim
    layers/attn/c_k|c_v/kernel        [layers, embed, kv_heads]   kv_heads = n_kv_head·head_dim
    layers/attn/c_proj/kernel         [layers, heads, embed]
    layers/ffn_norm/scale             [layers, embed]
    layers/ffn/gate_proj|up_proj/kernel [layers, embed, mlp]
    layers/ffn/down_proj/kernel       [layers, mlp, embed]
    norm/scale                        [embed]
    output/kernel                     [embed, vocab]

Precision policy (what torch autocast does, stated once): parameters and optimizer state are
float32; matmuls (projections, attention scores and values, the output head) run in the compute
dtype `config.dtype` (bfloat16 on accelerators); the residual stream carried between layers, the
embedding lookup, RMSNorm, the attention softmax and the loss are float32. float16 is refused
(config.py): it would need loss scaling.

Attention runs through `jax.nn.dot_product_attention`: cuDNN's flash kernel on a GPU in bfloat16,
XLA's elsewhere (`attention_implementation`). With `config.doc_mask`, packed documents (each
starting with BOS inside a window) do not see each other.
"""
from __future__ import annotations

import functools
import logging
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.ad_checkpoint import checkpoint_name

from .config import LlamaConfig

Params = dict[str, Any]
log = logging.getLogger(__name__)

# What the backward pass keeps of each layer's forward; the rest is recomputed.
REMAT = {
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    # only the q/k/v projections and the attention output (the attention is the dearest to redo):
    # the FFN, whose [tokens, mlp] activations are the largest, is recomputed.
    "qkv": jax.checkpoint_policies.save_only_these_names("q", "k", "v", "attn_out"),
    "full": jax.checkpoint_policies.nothing_saveable,
}
# Token positions per chunk of the loss: [batch rows, LOSS_CHUNK, vocab] float32 logits at a time.
LOSS_CHUNK = 256


def uniform_fan_in(d: int):
    """nanollama's init for q, k, v, gate and up: U(±sqrt(3/d)), unit variance outputs."""
    bound = math.sqrt(3.0 / d)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def real_vocab_only(init, vocab_size: int, axis: int):
    """Zero the padding rows past the real vocabulary: they are never looked up nor predicted, and
    zeros let every export drop and restore them exactly."""

    def masked(key, shape, dtype=jnp.float32):
        keep = jnp.arange(shape[axis]) < vocab_size
        return jnp.where(jnp.expand_dims(keep, 1 - axis), init(key, shape, dtype), 0.0)

    return masked


def rms_norm(x: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin of the rotary angles, float32 [B, T, 1, hd/2]; built once per forward."""
    inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, hd/2]
    return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]


def rope(x: jax.Array, tables: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Half-split rotary embedding (dimension i pairs with i + hd/2), in float32. x: [B, T, N, hd]."""
    cos, sin = tables
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attention_implementation(config: LlamaConfig) -> str:
    """cuDNN flash attention on a GPU in bfloat16 (its kernels need 16-bit inputs), XLA elsewhere;
    `config.attention` forces one. The choice is logged once per (platform, dtype, setting)."""
    platform = jax.default_backend()
    if config.attention != "auto":
        kind = config.attention
    else:
        kind = "cudnn" if platform == "gpu" and config.dtype == "bfloat16" else "xla"
    _log_attention(kind, platform, config.dtype, config.attention)
    return kind


@functools.lru_cache(maxsize=None)
def _log_attention(kind: str, platform: str, dtype: str, setting: str) -> None:
    log.info("attention: %s (platform %s, dtype %s, --attention %s)", kind, platform, dtype, setting)


def document_ids(tokens: jax.Array, bos_id: int) -> jax.Array:
    """[B, T] index of the document each token belongs to: it grows at every BOS. Tokens before the
    window's first BOS (the tail of a document cut by the window) form document 0."""
    return jnp.cumsum(tokens == bos_id, axis=1, dtype=jnp.int32)


def attend(q, k, v, segment_ids: jax.Array | None, implementation: str) -> jax.Array:
    """Causal attention, GQA handled by jax; with segment_ids [B, T] a token sees only earlier tokens
    of its own segment. cuDNN turns the mask into a bias and keeps its fused kernel. XLA's kernel
    scores every (query, key) pair, so it runs over query blocks, each against only the keys up to
    its own end (`causal_blocks`): the same sums, ~40% fewer scores to compute, store and
    differentiate for the score-bound CPU backward."""
    mask = None
    if segment_ids is not None:
        mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]  # [B, 1, T, S]
    if implementation != "xla":
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation=implementation)
    t = q.shape[1]
    out = []
    for lo, hi in causal_blocks(t):
        causal = (jnp.arange(hi)[None, :] <= jnp.arange(lo, hi)[:, None])[None, None]  # [1, 1, hi - lo, hi]
        block_mask = causal if mask is None else causal & mask[:, :, lo:hi, :hi]
        out.append(jax.nn.dot_product_attention(q[:, lo:hi], k[:, :hi], v[:, :hi], mask=block_mask,
                                                implementation="xla"))
    return jnp.concatenate(out, axis=1)


def causal_blocks(t: int, max_blocks: int = 8, min_block: int = 64) -> list[tuple[int, int]]:
    """Query blocks [lo, hi) of a causal window of t positions: at most `max_blocks` (each one more
    set of ops per layer), none shorter than `min_block` (smaller matmuls run below the GEMM rate).
    n blocks score (n + 1) / 2n of the full square."""
    size = max(min_block, -(-t // max_blocks))
    return [(lo, min(lo + size, t)) for lo in range(0, t, size)]


class RMSNorm(nn.Module):
    eps: float
    dtype: Any

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), jnp.float32)
        return (rms_norm(x, self.eps) * scale).astype(self.dtype)


def dense(features: int, axes: tuple[str, str], init, dtype, name: str) -> nn.Dense:
    return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=nn.with_logical_partitioning(init, axes), name=name)


class Attention(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, tables, segment_ids, cache, cache_start):
        c = self.config
        dt = jnp.dtype(c.dtype)
        init = uniform_fan_in(c.n_embd)
        b, t = tables[0].shape[:2]
        q = checkpoint_name(dense(c.n_head * c.head_dim, ("embed", "heads"), init, dt, "c_q")(x), "q")
        k = checkpoint_name(dense(c.n_kv_head * c.head_dim, ("embed", "kv_heads"), init, dt, "c_k")(x), "k")
        v = checkpoint_name(dense(c.n_kv_head * c.head_dim, ("embed", "kv_heads"), init, dt, "c_v")(x), "v")
        q = rope(q.reshape(b, t, c.n_head, c.head_dim), tables)
        k = rope(k.reshape(b, t, c.n_kv_head, c.head_dim), tables)
        v = v.reshape(b, t, c.n_kv_head, c.head_dim)
        if c.use_qk_norm:
            q, k = rms_norm(q, c.norm_eps).astype(dt), rms_norm(k, c.norm_eps).astype(dt)
        if cache is None:
            out = attend(q, k, v, segment_ids, attention_implementation(c))
        else:
            # Write this chunk at cache_start, then attend over the whole cache with a causal mask
            # offset by cache_start; slots past the current position are masked out.
            k_cache, v_cache = cache
            k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, cache_start, 0, 0))
            v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, cache_start, 0, 0))
            key_pos = jnp.arange(k_cache.shape[1])
            mask = key_pos[None, :] <= (cache_start + jnp.arange(t))[:, None]  # [T, S]
            out = jax.nn.dot_product_attention(q, k_cache.astype(dt), v_cache.astype(dt), mask=mask[None, None])
            cache = (k_cache, v_cache)
        out = checkpoint_name(out.reshape(b * t, c.n_head * c.head_dim), "attn_out")
        return dense(c.n_embd, ("heads", "embed"), nn.initializers.zeros, dt, "c_proj")(out), cache


class FeedForward(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        dt = jnp.dtype(c.dtype)
        init = uniform_fan_in(c.n_embd)
        gate = dense(c.ffn_hidden, ("embed", "mlp"), init, dt, "gate_proj")(x)
        up = dense(c.ffn_hidden, ("embed", "mlp"), init, dt, "up_proj")(x)
        return dense(c.n_embd, ("mlp", "embed"), nn.initializers.zeros, dt, "down_proj")(nn.silu(gate) * up)


class Block(nn.Module):
    """One pre-norm transformer layer; the scan carries the residual stream as float32 [tokens, embed]
    (2-D matmuls: XLA's CPU backend runs [B, T, d] x [d, n] contractions several times slower)."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, tables, segment_ids, cache_start, cache):
        c = self.config
        dt = jnp.dtype(c.dtype)
        x = nn.with_logical_constraint(x, ("batch", "act_embed"))
        h, cache = Attention(c, name="attn")(RMSNorm(c.norm_eps, dt, name="attn_norm")(x), tables, segment_ids,
                                             cache, cache_start)
        x = x + h.astype(jnp.float32)
        x = x + FeedForward(c, name="ffn")(RMSNorm(c.norm_eps, dt, name="ffn_norm")(x)).astype(jnp.float32)
        return x, cache


class Llama(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, tokens, positions=None, cache=None, cache_start=0, hidden_only=False):
        """tokens [B, T] int → float32 logits [B, T, padded_vocab] (and the updated KV cache when
        one is given); with hidden_only, the final-normed hidden states [B, T, embed] in the compute
        dtype instead (the chunked loss applies the head itself). Positions are global in the window."""
        c = self.config
        dt = jnp.dtype(c.dtype)
        if positions is None:
            positions = jnp.broadcast_to(cache_start + jnp.arange(tokens.shape[1]), tokens.shape)
        # float32 lookup: the residual stream starts (and stays) float32 whatever the compute dtype
        embed = nn.Embed(c.padded_vocab, c.n_embd, dtype=jnp.float32, param_dtype=jnp.float32,
                         embedding_init=nn.with_logical_partitioning(
                             real_vocab_only(nn.initializers.normal(1.0), c.vocab_size, 0), ("vocab", "embed")),
                         name="tok_embeddings")
        b, t = tokens.shape
        x = embed(tokens).reshape(b * t, c.n_embd)
        tables = rope_tables(positions, c.head_dim, c.rope_theta)
        segment_ids = document_ids(tokens, c.bos_id) if c.doc_mask and cache is None else None
        block = Block
        if c.remat != "none":
            block = nn.remat(block, policy=REMAT[c.remat], prevent_cse=False)
        layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0), length=c.n_layer,
                         metadata_params={nn.PARTITION_NAME: "layers"})
        x, cache = layers(c, name="layers")(x, tables, segment_ids, cache_start, cache)
        x = RMSNorm(c.norm_eps, dt, name="norm")(x)
        if hidden_only:
            return x.reshape(b, t, c.n_embd)
        head_init = real_vocab_only(nn.initializers.normal(0.001), c.vocab_size, 1)
        logits = dense(c.padded_vocab, ("embed", "vocab"), head_init, dt, "output")(x)
        logits = finish_logits(logits.reshape(b, t, c.padded_vocab), c)
        return logits if cache is None else (logits, cache)


def finish_logits(logits: jax.Array, config: LlamaConfig) -> jax.Array:
    """Head output → float32 logits: optional softcap, and the padding rows past `vocab_size` pushed
    to -1e9: they are never real tokens, so sampling and the loss ignore them and exports may trim them."""
    logits = logits.astype(jnp.float32)
    if config.softcap:
        logits = config.softcap * jnp.tanh(logits / config.softcap)
    if config.padded_vocab > config.vocab_size:
        logits = jnp.where(jnp.arange(config.padded_vocab) < config.vocab_size, logits, -1e9)
    return logits


def init_params(config: LlamaConfig, seed: int = 0) -> Params:
    """nanollama's init, as a plain nested dict of float32 arrays. Same seed, same params: always
    compiled, so eager, jitted and sharded callers get the same bits."""
    def init():
        return nn.unbox(Llama(config).init(jax.random.PRNGKey(seed), jnp.zeros((1, 1), jnp.int32))["params"])

    return jax.jit(init)()


def param_logical_axes(config: LlamaConfig) -> Params:
    """The logical axis names of every parameter, as a pytree of PartitionSpecs (nothing allocated)."""
    boxed = jax.eval_shape(lambda: Llama(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
    return nn.get_partition_spec(boxed)["params"]


def param_shapes(config: LlamaConfig) -> Params:
    return jax.eval_shape(lambda: init_params(config))


def forward(params: Params, tokens: jax.Array, config: LlamaConfig) -> jax.Array:
    return Llama(config).apply({"params": params}, tokens)


def init_cache(config: LlamaConfig, batch: int, length: int, dtype=jnp.float32):
    """An empty KV cache: (k, v), each [layers, batch, length, kv_heads, head_dim]."""
    shape = (config.n_layer, batch, length, config.n_kv_head, config.head_dim)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


def decode_step(params: Params, tokens: jax.Array, cache, cache_start, config: LlamaConfig):
    """Run `tokens` [B, T] at positions cache_start… against the cache; returns (logits, cache)."""
    return Llama(config).apply({"params": params}, tokens, cache=cache, cache_start=cache_start)


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy in float32 (logsumexp form: no [tokens, vocab] log-prob array)."""
    vocab = logits.shape[-1]
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32).reshape(-1, vocab), targets.reshape(-1)))


def forward_hidden(params: Params, tokens: jax.Array, config: LlamaConfig) -> jax.Array:
    """The final-normed hidden states [B, T, embed] (compute dtype), before the output head."""
    return Llama(config).apply({"params": params}, tokens, hidden_only=True)


def next_token_loss(params: Params, tokens: jax.Array, config: LlamaConfig, chunk: int = LOSS_CHUNK,
                    mask: jax.Array | None = None) -> jax.Array:
    """Mean cross-entropy of predicting tokens[:, 1:] from tokens[:, :-1], never holding float32
    logits for the whole batch: the output head and the loss run over `chunk` positions at a time
    (all batch rows, so the batch's sharding is kept). Under differentiation each chunk also
    computes its gradients on the spot (`_chunked_loss_sum`), so the backward pass neither stores
    nor recomputes logits. Equal to `cross_entropy(forward(...))`, value and gradients.

    `mask` ([B, T+1] booleans beside `tokens`) limits the mean to the targets it marks (0 when it
    marks none): SFT's loss on the assistant's tokens only."""
    hidden = forward_hidden(params, tokens[:, :-1], config)
    targets = tokens[:, 1:]
    b, t, d = hidden.shape
    chunk = min(chunk, t)
    n = -(-t // chunk)
    pad = n * chunk - t  # positions past the window count for nothing

    def chunked(x):  # [B, T, …] → [n, B, chunk, …], zero-padded
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
        return x.reshape(b, n, chunk, *x.shape[2:]).swapaxes(0, 1)

    weights = jnp.ones((b, t), jnp.float32) if mask is None else mask[:, 1:].astype(jnp.float32)
    count = b * t if mask is None else jnp.maximum(jnp.sum(weights), 1.0)
    return _chunked_loss_sum(chunked(hidden), params["output"]["kernel"], chunked(targets), chunked(weights),
                             config) / count


def _chunk_logits(h, k, config):
    """(raw, finished) logits of one chunk; `k` is the head's kernel already in the compute dtype."""
    raw = jnp.dot(h, k)
    return raw, finish_logits(raw, config)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked_loss_sum(hidden, kernel, targets, weights, config):
    """Σ weight·(logsumexp − target logit) over chunks [n, B, C, …], one chunk's logits at a time."""
    k = kernel.astype(hidden.dtype)

    def body(total, xs):
        h, y, w = xs
        logits = _chunk_logits(h, k, config)[1]
        return total + jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, y) * w), None

    return jax.lax.scan(body, jnp.zeros((), jnp.float32), (hidden, targets, weights))[0]


def _chunked_loss_fwd(hidden, kernel, targets, weights, config):
    """The loss and, chunk by chunk, its gradients: d loss/d logits = (softmax − one-hot)·weight,
    through the softcap's tanh, then the head's matmul transposed in the compute dtype (as autodiff
    does); the head's gradient accumulates in float32."""
    dt = hidden.dtype
    k = kernel.astype(dt)

    def body(carry, xs):
        total, d_kernel = carry
        h, y, w = xs
        raw, logits = _chunk_logits(h, k, config)
        lse = jax.nn.logsumexp(logits, axis=-1)
        total = total + jnp.sum((lse - jnp.take_along_axis(logits, y[..., None], -1)[..., 0]) * w)
        d_logits = (jax.nn.softmax(logits, axis=-1) - jax.nn.one_hot(y, logits.shape[-1])) * w[..., None]
        if config.padded_vocab > config.vocab_size:  # the -1e9 padding logits are constants
            d_logits = jnp.where(jnp.arange(config.padded_vocab) < config.vocab_size, d_logits, 0.0)
        if config.softcap:
            d_logits = d_logits * (1 - jnp.tanh(raw.astype(jnp.float32) / config.softcap) ** 2)
        d_raw = d_logits.astype(dt)
        d_h = jnp.dot(d_raw, k.T)
        d_kernel = d_kernel + jnp.einsum("bcd,bcv->dv", h, d_raw).astype(jnp.float32)
        return (total, d_kernel), d_h

    init = (jnp.zeros((), jnp.float32), jnp.zeros(kernel.shape, jnp.float32))
    (total, d_kernel), d_hidden = jax.lax.scan(body, init, (hidden, targets, weights))
    return total, (d_hidden, d_kernel)


def _chunked_loss_bwd(config, residuals, g):
    d_hidden, d_kernel = residuals
    return (d_hidden * g).astype(d_hidden.dtype), d_kernel * g, None, None


_chunked_loss_sum.defvjp(_chunked_loss_fwd, _chunked_loss_bwd)
