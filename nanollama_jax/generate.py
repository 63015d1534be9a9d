"""Sample text from a trained run, with a jitted KV-cache decode.

    python -m nanollama_jax.generate --checkpoint runs/tiny --prompt "The function returns"
    python -m nanollama_jax.generate --checkpoint runs/tiny --tokens ids.npy --dump-logits logits.npy

`--dump-logits` writes the float32 logits [T, vocab_size] of every position of the int32 ids in
`--tokens` (BOS included, nothing added): the contract every runtime (llama.cpp, the Go engine)
is checked against.
"""
from __future__ import annotations

import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from .config import LlamaConfig
from .model import Params, decode_step, forward, init_cache


@functools.partial(jax.jit, static_argnames=("temperature", "top_k", "top_p"))
def sample_token(logits: jax.Array, key: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """One token id per row from logits [B, V]: greedy at temperature 0, else top-k then top-p."""
    if temperature <= 0:
        return jnp.argmax(logits, axis=-1)
    logits = logits / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if 0 < top_p < 1:
        order = jnp.sort(logits, axis=-1)[..., ::-1]
        cum = jnp.cumsum(jax.nn.softmax(order, axis=-1), axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least the best token)
        cutoff_index = jnp.sum(cum < top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(order, cutoff_index, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1)


@functools.lru_cache(maxsize=8)
def jitted_decode(config: LlamaConfig):
    """The KV-cache step (prefill of T tokens or one new token), compiled once per config and
    reused across calls (training draws samples with it every few hundred steps)."""
    return jax.jit(functools.partial(decode_step, config=config), donate_argnums=(2,))


@functools.lru_cache(maxsize=8)
def jitted_forward(config: LlamaConfig):
    return jax.jit(functools.partial(forward, config=config))


def generate(params: Params, config: LlamaConfig, prompt: list[int], max_new_tokens: int, *,
             temperature: float = 0.8, top_k: int = 50, top_p: float = 0.9, seed: int = 0,
             stop_id: int | tuple[int, ...] | None = None, on_token=None) -> list[int]:
    """Continue `prompt` (ids, BOS included) by up to `max_new_tokens`; stops at `stop_id` (one id or
    several, e.g. end of turn and EOS). `on_token(id)` is called as each token is produced (streaming)."""
    stops = set() if stop_id is None else {stop_id} if isinstance(stop_id, int) else set(stop_id)
    if not prompt:
        raise ValueError("the prompt is empty; it needs at least the BOS token")
    limit = config.sequence_len
    if len(prompt) >= limit:
        raise ValueError(f"the prompt has {len(prompt)} tokens; the model's context is {limit}")
    max_new_tokens = min(max_new_tokens, limit - len(prompt))
    step = jitted_decode(config)
    cache = init_cache(config, 1, limit)
    logits, cache = step(params, jnp.asarray([prompt], jnp.int32), cache, 0)
    key = jax.random.PRNGKey(seed)
    out = []
    pos = len(prompt)
    for i in range(max_new_tokens):
        token = int(sample_token(logits[:, -1], jax.random.fold_in(key, i), temperature, top_k, top_p)[0])
        if token in stops:
            break
        out.append(token)
        if on_token:
            on_token(token)
        if i + 1 == max_new_tokens:
            break
        logits, cache = step(params, jnp.asarray([[token]], jnp.int32), cache, pos)
        pos += 1
    return out


def prompt_logits(params: Params, config: LlamaConfig, ids: np.ndarray) -> np.ndarray:
    """float32 logits [T, vocab_size] for every position of one sequence."""
    logits = jitted_forward(config)(params, jnp.asarray(ids, jnp.int32)[None])
    return np.asarray(logits[0, :, : config.vocab_size], dtype=np.float32)


class TextStream:
    """An on_token callback that prints generated text as it comes: it decodes the growing tail, so a
    character made of several byte tokens appears whole."""

    def __init__(self, sp, out=None):
        self.sp, self.out, self.produced, self.text = sp, out or sys.stdout, [], ""

    def __call__(self, token: int) -> None:
        self.produced.append(token)
        text = self.sp.decode(self.produced)
        self.out.write(text[len(self.text):])
        self.out.flush()
        self.text = text


def main(argv=None):
    import sentencepiece as spm

    from . import checkpoint
    from nanollama_base.cli import ArgumentParser, run_cli
    from nanollama_base.files import atomic_path

    p = ArgumentParser(prog="python -m nanollama_jax.generate", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="run folder (latest step) or one of its step folders")
    p.add_argument("--prompt", default="", help="text to continue (BOS is added)")
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 = off")
    p.add_argument("--top-p", type=float, default=0.9, help="1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokens", help="int32 .npy of token ids (BOS included) for --dump-logits")
    p.add_argument("--dump-logits", help="write float32 logits [T, vocab] of --tokens to this .npy")
    args = p.parse_args(argv)
    if bool(args.tokens) != bool(args.dump_logits):
        p.error("--tokens and --dump-logits go together")

    def run():
        run_info, params = checkpoint.load_params(args.checkpoint)
        config = run_info.config
        if args.dump_logits:
            try:
                ids = np.load(args.tokens)
            except (OSError, ValueError) as e:
                raise ValueError(f"{args.tokens}: not a readable .npy file ({e})") from None
            if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
                raise ValueError(f"{args.tokens}: expected a 1-D integer array of token ids, got {ids.dtype} {ids.shape}")
            if ids.size and (ids.min() < 0 or ids.max() >= config.vocab_size):
                raise ValueError(f"{args.tokens}: token ids must be in [0, {config.vocab_size})")
            logits = prompt_logits(params, config, ids)
            with atomic_path(args.dump_logits) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, logits)
            print(f"wrote {args.dump_logits}: logits {list(logits.shape)} float32")
            return
        sp = spm.SentencePieceProcessor(model_file=str(run_info.tokenizer_path))
        prompt = [sp.bos_id()] + sp.encode(args.prompt)
        sys.stdout.write(args.prompt)
        stream = TextStream(sp)
        start = time.perf_counter()
        generate(params, config, prompt, args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                 top_p=args.top_p, seed=args.seed, stop_id=sp.eos_id(), on_token=stream)
        elapsed = time.perf_counter() - start
        n = len(stream.produced)
        print(f"\n[{n} tokens in {elapsed:.1f}s, {n / max(elapsed, 1e-9):.1f} tok/s]", file=sys.stderr)

    run_cli(p.prog, run)


if __name__ == "__main__":
    main()
