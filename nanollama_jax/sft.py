"""Supervised fine-tuning on chats: teach a run (pretrained, imported, read back from a GGUF) to answer.

    python -m nanollama_jax.sft --base runs/tiny --data chats.jsonl --model-tag tiny-chat
    python -m nanollama_jax.sft --base runs/tiny --data chats.jsonl --model-tag tiny-chat --lora 16

chats.jsonl holds one conversation per line: {"messages": [{"role": "user", "content": …},
{"role": "assistant", "content": …}, …]} (OpenAI style; a "system" message too) or a plain pair
{"user": …, "assistant": …}. The loss is on the assistant tokens only (data/chat.py renders the
one chat format and its mask); conversations are packed into rows; every --val-every-th is held out
for validation. It trains with the same set-up as pretraining (mesh, shardings, checkpoints,
--resume, metrics), on a masked loss.

Full fine-tuning writes the run runs/<tag>/ directly. With --lora RANK only low-rank adapters on the
layer matrices train (runs/<tag>-lora/ holds their checkpoints); at the end (or with --merge) they
are merged into runs/<tag>/ and saved as a low-rank gamma runs/<tag>/adapter.npz, which
`python -m export.lora runs/<tag>/adapter.npz --base base.gguf -o adapter.gguf` turns into a
llama.cpp LoRA adapter. A base whose tokenizer lacks the chat tokens gets them appended (ordinary
ids unchanged; the new embedding rows start at the mean of the others).
"""
from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import jax
import numpy as np

from data.chat import add_chat_tokens, missing_chat_tokens
from nanollama_base.cli import ArgumentParser, run_cli
from nanollama_base.files import atomic_dir, atomic_path, sha256_file

from . import checkpoint, sharding
from .config import DTYPE_CHOICES
from .loop import Schedule, log, train_loop
from .model import next_token_loss
from .train import non_negative_int, positive_float, positive_int
from .training_setup import TrainingSetup


def masked_next_token_loss(params, batch, config):
    """SFT loss of a micro-batch {"tokens", "mask"} [B, T+1]: predicting tokens[:, 1:] where mask[:, 1:],
    chunked like pretraining's loss (no float32 logits for the whole micro-batch)."""
    return next_token_loss(params, batch["tokens"], config, mask=batch["mask"])


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m nanollama_jax.sft", description=__doc__)
    p.add_argument("--base", required=True, help="the run to fine-tune (a run folder or one of its checkpoints)")
    p.add_argument("--data", required=True, help="chat JSONL file")
    p.add_argument("--model-tag", required=True, help="the fine-tuned run: <runs-dir>/<tag>/")
    p.add_argument("--runs-dir", default="runs", help="where run folders live (default ./runs)")
    p.add_argument("--lora", type=positive_int, metavar="RANK", help="train rank-RANK adapters instead of all weights")
    p.add_argument("--merge", action="store_true", help="with --lora: only merge the last adapter checkpoint")
    p.add_argument("--steps", type=positive_int, default=200, help="optimizer steps (default 200)")
    p.add_argument("--seq-len", type=positive_int, help="row length, at most the base's context (default: that)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="rows per data-parallel shard per step")
    p.add_argument("--optimizer", choices=("adamw", "muon"), default="adamw", help="full fine-tuning's optimizer")
    p.add_argument("--lr-scale", type=positive_float, default=0.5, help="multiplies the learning rates (default 0.5)")
    p.add_argument("--val-every", type=non_negative_int, default=10,
                   help="hold out every Nth conversation for validation (default 10; 0 = none)")
    p.add_argument("--mesh", help="FSDPxTENSOR device mesh (default: all devices on fsdp)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, help="compute dtype")
    p.add_argument("--doc-mask", action="store_true",
                   help="conversations packed into one row attend only within themselves (each starts at BOS)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--eval-every", type=positive_int, help="validation every N steps (default: 10 times per run)")
    p.add_argument("--eval-batches", type=positive_int, default=4, help="validation batches per evaluation")
    p.add_argument("--save-every", type=positive_int, help="checkpoint every N steps (default: 10 times per run)")
    p.add_argument("--stop-after", type=positive_int, help="stop (with a checkpoint) after this many steps")
    p.add_argument("--keep", type=positive_int, default=2, help="checkpoints to keep")
    p.add_argument("--log-every", type=positive_int, default=10, help="a log line every N steps (default 10)")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.merge and not args.lora:
        p.error("--merge needs --lora RANK (the adapters to merge)")
    run_cli(p.prog, lambda: sft(args))


def chat_tokenizer(base: checkpoint.Run) -> tuple[bytes, int]:
    """The base's tokenizer with the chat tokens (appended if missing) and how many were added."""
    model = base.tokenizer_path.read_bytes()
    added = len(missing_chat_tokens(model))
    return add_chat_tokens(model), added


def grow_vocab(params, old_vocab: int, config):
    """Params for `config.vocab_size` tokens: rows past `old_vocab` (new chat tokens) start at the mean
    of the old rows, in the embedding and the output head."""
    params = jax.tree_util.tree_map(np.asarray, params)
    emb, head = params["tok_embeddings"]["embedding"], params["output"]["kernel"]
    rows = config.padded_vocab
    emb = np.concatenate([emb, np.zeros((rows - emb.shape[0], emb.shape[1]), emb.dtype)])
    head = np.concatenate([head, np.zeros((head.shape[0], rows - head.shape[1]), head.dtype)], axis=1)
    emb[old_vocab:config.vocab_size] = emb[:old_vocab].mean(0)
    head[:, old_vocab:config.vocab_size] = head[:, :old_vocab].mean(1, keepdims=True)
    return {**params, "tok_embeddings": {"embedding": emb}, "output": {"kernel": head}}


def sft(args) -> None:
    import sentencepiece as spm

    from .sft_data import ChatBatches

    base = checkpoint.open_run(args.base)
    if base.step is None:
        raise ValueError(f"{base.dir}: the base run has no checkpoint")
    tokenizer, added = chat_tokenizer(base)
    sp = spm.SentencePieceProcessor(model_proto=tokenizer)
    seq_len = args.seq_len or base.config.sequence_len
    if seq_len > base.config.sequence_len:
        raise ValueError(f"--seq-len {seq_len}: the base's context is {base.config.sequence_len}")
    config = dataclasses.replace(base.config, vocab_size=sp.get_piece_size())
    if args.doc_mask:
        config = dataclasses.replace(config, doc_mask=True, bos_id=sp.bos_id())
    mesh = sharding.make_mesh(args.mesh)
    recipe = {"batch_size": args.batch_size, "warmup_steps": max(1, args.steps // 20), "weight_decay": 0.0}
    overrides = dict(steps=args.steps, seq_len=seq_len, batch_size=args.batch_size, dtype=args.dtype,
                     seed=args.seed, optimizer=args.optimizer, lr_scale=args.lr_scale,
                     tokens_per_step=args.batch_size * mesh.shape["fsdp"] * seq_len)
    if args.lora:
        from .lora import LoraSetup
        from .plan import build_plan

        setup = LoraSetup(build_plan(config, recipe, mesh.shape["fsdp"], **overrides), mesh, args.lora,
                          masked_next_token_loss)
    else:
        setup = TrainingSetup.build(config, recipe, mesh, loss_fn=masked_next_token_loss, **overrides)
    plan = setup.plan
    batches = ChatBatches(args.data, sp, seq_len=plan.seq_len, global_batch=plan.global_batch, seed=plan.seed,
                          val_every=args.val_every, process_index=jax.process_index(),
                          process_count=jax.process_count())

    final_dir = Path(args.runs_dir) / args.model_tag
    run_dir = final_dir.with_name(final_dir.name + "-lora") if args.lora else final_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(run_dir / "tokenizer.model") as tmp:
        tmp.write_bytes(tokenizer)
    batches.tokenizer_sha256 = sha256_file(run_dir / "tokenizer.model")
    sections = {"train": plan.settings(),
                "data": {"chats": str(Path(args.data).resolve()), "fingerprint": batches.fingerprint},
                "sft": {"base": str(base.dir.resolve()), "base_step": base.step, "lora_rank": args.lora,
                        "chat_tokens_added": added}}
    if args.merge:
        return merge_lora(setup, checkpoint.open_run(run_dir), final_dir, sections)
    start_step = setup.resume_step(run_dir, args.resume, run_dir / "tokenizer.model", batches.tokenizer_sha256,
                                   batches.fingerprint)
    if jax.process_index() == 0:
        checkpoint.create_run(run_dir, plan.config, run_dir / "tokenizer.model", **sections)
    run = checkpoint.open_run(run_dir)
    mgr = checkpoint.manager(run, keep=args.keep)

    log(setup.describe())
    log(f"data: {args.data}: {batches.conversations} conversations in {len(batches)} rows "
        f"({batches.trained_tokens:,} trained tokens), {batches.val_conversations} held out"
        + (f"; {batches.cut} cut at {plan.seq_len + 1} tokens" if batches.cut else ""))
    if added:
        log(f"tokenizer: appended {added} chat token(s) to {base.tokenizer_path} (ordinary ids unchanged)")
    schedule = Schedule.for_steps(plan.steps, log_every=args.log_every, eval_every=args.eval_every,
                                  save_every=args.save_every, sample_every=0, stop_after=args.stop_after)
    validation = batches.validation(plan.micro_batch, args.eval_batches)
    with setup.activate():
        if start_step:
            state = setup.restore(mgr, start_step)
            log(f"resumed {run_dir} at step {start_step}")
        else:
            state = initial_state(setup, base, added)
            log(f"initialised from {base.dir} (step {base.step})")
        if not validation:
            log("validation: none (--val-every 0 or too few conversations)")
        step = train_loop(setup, schedule, run, mgr, batches, ChatValidation(setup, validation, batches.bytes_per_token),
                          state, start_step)
    if step == plan.steps:
        if args.lora:
            merge_lora(setup, checkpoint.open_run(run_dir), final_dir, sections)
        else:
            log(f"done: {run_dir} (step {step}); chat with python -m nanollama_jax.chat --checkpoint {run_dir}")


class ChatValidation:
    """What the training loop runs at each evaluation step of SFT: the masked loss (assistant tokens
    only) on the held-out conversations, and bits per byte from the trained tokens' mean byte length."""

    def __init__(self, setup, validation: list[dict], bytes_per_token: float):
        self.setup, self.validation, self.bytes_per_token = setup, validation, bytes_per_token

    def evaluate(self, params, step: int, meta: dict) -> tuple[dict, list[str]]:
        if not self.validation:
            return {}, []
        n, p = jax.process_count(), jax.process_index()
        mine = [jax.tree_util.tree_map(lambda rows: rows[p * len(rows) // n:(p + 1) * len(rows) // n], batch)
                for batch in self.validation]
        val_loss = float(np.mean([float(self.setup.eval_step(params, self.setup.eval_batch(b))) for b in mine]))
        bpb = val_loss / math.log(2) / self.bytes_per_token
        return ({"val_loss": val_loss, "val_bpb": bpb},
                [f"step {step:5d} | validation loss {val_loss:.4f} (assistant tokens) | {bpb:.3f} bits per byte"])

    def close(self) -> None:
        pass


def initial_state(setup, base: checkpoint.Run, added: int):
    """(params, opt_state) from the base's weights, the vocabulary grown by the added chat tokens."""
    shardings = setup.param_shardings["base"] if "base" in setup.param_shardings else setup.param_shardings
    if added:  # loaded spread over the mesh in the base's shapes, then grown and placed in the new ones
        _, params = checkpoint.load_params(base.dir, base.step,
                                           shardings=sharding.param_shardings(base.config, setup.mesh))
        params = jax.device_put(grow_vocab(params, base.config.vocab_size, setup.config), shardings)
    else:
        params = checkpoint.load_params(base.dir, base.step, shardings=shardings)[1]
    if "lora" in setup.param_shapes:
        return setup.init_state(params)
    return setup.state_from(params)


def merge_lora(setup, lora_run: checkpoint.Run, final_dir: Path, sections: dict) -> None:
    """The last adapter checkpoint merged into a plain run (+ the adapters as a low-rank gamma)."""
    from .gamma import save_gamma
    from .lora import merge, to_gamma

    if lora_run.step is None:
        raise ValueError(f"{lora_run.dir}: no adapter checkpoint to merge")
    with setup.activate(), checkpoint.manager(lora_run, async_save=False) as mgr:
        state, _ = setup.restore(mgr, lora_run.step)
    merged = jax.jit(merge)(state["base"], state["lora"])
    sections["sft"]["lora_step"] = lora_run.step
    if jax.process_index() == 0:
        shutil.rmtree(final_dir / "checkpoints", ignore_errors=True)  # an earlier merge: replaced, not mixed
        with atomic_dir(final_dir) as tmp:
            run = checkpoint.write_params_run(tmp, setup.config, jax.device_get(merged), lora_run.tokenizer_path,
                                              step=lora_run.step, **sections)
            gamma = to_gamma(jax.device_get(state["lora"]), setup.config, run.info["tokenizer_sha256"])
            save_gamma(gamma, tmp / "adapter.npz")
        log(f"merged: {final_dir} (adapters as a gamma: {final_dir / 'adapter.npz'}); "
            f"chat with python -m nanollama_jax.chat --checkpoint {final_dir}")


if __name__ == "__main__":
    main()
