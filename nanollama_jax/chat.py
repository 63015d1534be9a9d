"""Chat with a run in the terminal: the one chat format (data/chat.py), a KV cache kept across turns.

    python -m nanollama_jax.chat --checkpoint runs/tiny-chat
    python -m nanollama_jax.chat --checkpoint runs/tiny-chat --system "Answer briefly." --temperature 0
    echo "What does json.dumps do?" | python -m nanollama_jax.chat --checkpoint runs/tiny-chat --temperature 0

Each line you type is a user message; the answer streams until the model ends its turn
(<|eot_id|>, or EOS, or --max-tokens). Only the new turn's tokens are run through the model: the
conversation so far stays in the KV cache. When the context is full the conversation restarts
from the new message (said on stderr). Ctrl-D or an empty line (from a pipe) ends the chat.
"""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp

from data.chat import ChatTokens, render

from .generate import TextStream, jitted_decode, sample_token
from .model import init_cache


class ChatSession:
    """A conversation held as token ids in a KV cache; `reply(text)` adds a user turn and generates the
    assistant's, ending it with <|eot_id|> in the cache too."""

    def __init__(self, params, config, sp, *, system: str | None = None, temperature: float = 0.7,
                 top_k: int = 50, top_p: float = 0.9, seed: int = 0):
        self.params, self.config, self.sp = params, config, sp
        self.tokens = ChatTokens(sp)
        self.system = system
        self.sampling = (temperature, top_k, top_p)
        self.key = jax.random.PRNGKey(seed)
        self.step = jitted_decode(config)
        self.turns = 0
        self.reset()

    def reset(self) -> None:
        self.cache = init_cache(self.config, 1, self.config.sequence_len)
        self.pos = 0  # tokens in the cache; 0: the conversation starts (with BOS and the system message)

    def _turn_ids(self, text: str) -> list[int]:
        """The new user turn and the assistant header, rendered exactly as the whole conversation would be."""
        first = self.pos == 0
        messages = [{"role": "system", "content": self.system}] if self.system and first else []
        ids = render(self.sp, messages + [{"role": "user", "content": text}], add_generation_prompt=True)[0]
        return ids if first else ids[1:]  # BOS only at the start

    def reply(self, text: str, max_tokens: int = 256, on_token=None, on_restart=None) -> list[int]:
        new = self._turn_ids(text)
        limit = self.config.sequence_len
        if self.pos + len(new) + 1 >= limit:
            self.reset()
            new = self._turn_ids(text)
            if on_restart:
                on_restart()
            if len(new) + 1 >= limit:
                raise ValueError(f"the message needs {len(new)} tokens; the model's context is {limit}")
        logits, self.cache = self.step(self.params, jnp.asarray([new], jnp.int32), self.cache, self.pos)
        self.pos += len(new)
        out = []
        temperature, top_k, top_p = self.sampling
        while True:
            key = jax.random.fold_in(self.key, self.turns * limit + len(out))
            token = int(sample_token(logits[:, -1], key, temperature, top_k, top_p)[0])
            if token in self.tokens.stop or len(out) >= max_tokens or self.pos + 1 >= limit:
                break
            out.append(token)
            if on_token:
                on_token(token)
            logits, self.cache = self.step(self.params, jnp.asarray([[token]], jnp.int32), self.cache, self.pos)
            self.pos += 1
        # the turn ends with <|eot_id|> in the cache, whatever stopped it, as the template renders it
        self.cache = self.step(self.params, jnp.asarray([[self.tokens.end_of_turn]], jnp.int32),
                               self.cache, self.pos)[1]
        self.pos += 1
        self.turns += 1
        return out


def main(argv=None):
    import sentencepiece as spm

    from nanollama_base.cli import ArgumentParser, run_cli

    from . import checkpoint
    from .train import non_negative_int, positive_int

    p = ArgumentParser(prog="python -m nanollama_jax.chat", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="run folder (latest step) or one of its step folders")
    p.add_argument("--system", help="a system message that starts the conversation")
    p.add_argument("--max-tokens", type=positive_int, default=256, help="longest answer (default 256)")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    p.add_argument("--top-k", type=non_negative_int, default=50, help="0 = off")
    p.add_argument("--top-p", type=float, default=0.9, help="1 = off")
    p.add_argument("--seed", type=non_negative_int, default=0)
    args = p.parse_args(argv)

    def run():
        run_info, params = checkpoint.load_params(args.checkpoint)
        sp = spm.SentencePieceProcessor(model_file=str(run_info.tokenizer_path))
        try:
            ChatTokens(sp)
        except ValueError:
            raise ValueError(f"{run_info.tokenizer_path}: no chat tokens; fine-tune the run first "
                             "(python -m nanollama_jax.sft)") from None
        session = ChatSession(params, run_info.config, sp, system=args.system, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, seed=args.seed)
        tty = sys.stdin.isatty()
        if tty:
            print(f"chatting with {run_info.dir} (step {run_info.step}); Ctrl-D ends", file=sys.stderr)
        while True:
            if tty:
                print("you> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line or (not tty and not line.strip()):
                break
            if not line.strip():
                continue
            if tty:
                print("assistant> ", end="", file=sys.stderr, flush=True)
            session.reply(line.rstrip("\n"), args.max_tokens, on_token=TextStream(sp),
                          on_restart=lambda: print("[context full: the conversation restarts here]", file=sys.stderr))
            sys.stdout.write("\n")
            sys.stdout.flush()

    run_cli(p.prog, run)


if __name__ == "__main__":
    main()
