"""Issue 15: SFT (full and LoRA), the chat CLI, SFT from an imported run, personality by SFT.

A tiny randomly initialised base is fine-tuned on a chat set made here ("Say WORD." → "Answer: WORD.");
the acceptance: after SFT a held-out question is answered in the trained format (greedy, through
the chat CLI), while the base does not. LoRA: the adapter GGUF applied by llama.cpp to the base GGUF
gives the merged model's logits.
"""
import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import sentencepiece as spm

from data.chat import END_OF_TURN, render
from nanollama_jax import checkpoint
from nanollama_jax import model as M
from nanollama_jax.config import LlamaConfig
from nanollama_jax.sft import masked_next_token_loss
from native import llama_cpp_logits

VOCAB = 448  # the size of conftest's chat_tokenizer_file
WORDS = ("apple river stone cloud green table light music paper sugar glass horse train water bread chair dream "
         "earth flame grape house juice knife lemon money night ocean piano queen radio").split()
HELD_OUT = "Say zebra."


def cli(module, *args, stdin=None):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          input=stdin, timeout=600)


@pytest.fixture(scope="module")
def root(tmp_path_factory, chat_tokenizer_file):
    """A tokenizer, a random tiny base run and a chat set."""
    root = tmp_path_factory.mktemp("sft")
    shutil.copyfile(chat_tokenizer_file, root / "tokenizer.model")
    config = LlamaConfig(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, head_dim=16, vocab_size=VOCAB,
                         sequence_len=96, multiple_of=64)
    checkpoint.write_params_run(root / "runs" / "base", config, jax.tree_util.tree_map(np.asarray, M.init_params(config, 0)),
                                root / "tokenizer.model")
    with open(root / "chats.jsonl", "w") as f:
        for w in WORDS:
            f.write(json.dumps({"user": f"Say {w}.", "assistant": f"Answer: {w}."}) + "\n")
    return root


def sft(root, tag, *extra):
    r = cli("nanollama_jax.sft", "--base", root / "runs" / "base", "--data", root / "chats.jsonl", "--model-tag", tag,
            "--runs-dir", root / "runs", "--batch-size", 4, *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    return root / "runs" / tag


def greedy_answer(run, question):
    r = cli("nanollama_jax.chat", "--checkpoint", run, "--temperature", 0, "--max-tokens", 16, stdin=question + "\n")
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def masked_cross_entropy(logits, targets, mask):
    """The reference: mean cross-entropy over the positions where mask is set, on full logits."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    m = mask.astype(jnp.float32)
    return jnp.sum(ce * m) / jnp.maximum(jnp.sum(m), 1.0)


def test_only_assistant_tokens_are_trained(root):
    sp = spm.SentencePieceProcessor(model_file=str(root / "tokenizer.model"))
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say apple."},
            {"role": "assistant", "content": "Answer: apple."}, {"role": "user", "content": "Say river."},
            {"role": "assistant", "content": "Answer: river."}]
    ids, train = render(sp, conv)
    trained = [i for i, t in zip(ids, train) if t]
    assert trained.count(sp.piece_to_id(END_OF_TURN)) == 2
    assert sp.decode(trained).split() == ["Answer:", "apple.", "Answer:", "river."]
    # the gradient of the SFT loss reaches the logits of assistant targets only
    run, params = checkpoint.load_params(root / "runs" / "base")
    tokens = np.asarray([ids])
    logits = M.forward(params, tokens[:, :-1], run.config)
    grad = np.asarray(jax.grad(masked_cross_entropy)(logits, tokens[:, 1:], np.asarray([train])[:, 1:]))
    per_position = np.abs(grad[0]).sum(-1)
    target_trained = np.asarray(train[1:])
    assert np.all(per_position[~target_trained] == 0)
    assert np.all(per_position[target_trained] > 1e-6)
    # and SFT's own loss (chunked, no full logits) is that masked loss, value and gradients, to float32 rounding
    batch = {"tokens": tokens, "mask": np.asarray([train])}

    def reference(p):
        return masked_cross_entropy(M.forward(p, tokens[:, :-1], run.config), tokens[:, 1:], batch["mask"][:, 1:])

    ref, ref_grads = jax.value_and_grad(reference)(params)
    got, grads = jax.value_and_grad(lambda p: masked_next_token_loss(p, batch, run.config))(params)
    assert abs(float(got) - float(ref)) <= 1e-6 * abs(float(ref))
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(ref_grads)):
        assert np.linalg.norm(np.asarray(g) - r) <= 1e-6 * np.linalg.norm(r), jax.tree_util.keystr(path)


@pytest.fixture(scope="module")
def full(root):
    """Full fine-tuning of the base, 60 steps."""
    return sft(root, "full", "--steps", 60)


def losses(run):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_full_sft_answers_a_held_out_question_in_the_trained_format(root, full):
    run = full
    before = greedy_answer(root / "runs" / "base", HELD_OUT)
    after = greedy_answer(run, HELD_OUT)
    assert after.startswith("Answer: ") and after.rstrip("\n").endswith("."), after  # and it ended its turn
    assert not before.startswith("Answer:"), before
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    val = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert len(val) >= 2 and min(val) < 0.6 * val[0]  # held-out conversations are validated


def test_lora_resumes_merges_and_exports_a_llama_cpp_adapter(root, tmp_path):
    from export.gguf import write_gguf
    from export.lora import write_lora
    from nanollama_jax.gamma import load_gamma
    from nanollama_jax.generate import prompt_logits

    sft(root, "lora", "--steps", 16, "--lora", 4, "--lr-scale", 5, "--stop-after", 7)
    assert not (root / "runs" / "lora").exists()  # not merged before the end
    r = cli("nanollama_jax.sft", "--base", root / "runs" / "base", "--data", root / "chats.jsonl", "--model-tag",
            "lora", "--runs-dir", root / "runs", "--batch-size", 4, "--steps", 16, "--lora", 4, "--lr-scale", 4,
            "--resume")
    assert r.returncode == 1 and "cannot resume, this would change the run: learning-rate scale (--lr-scale) 5" \
        in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    whole = sft(root, "lora", "--steps", 16, "--lora", 4, "--lr-scale", 5, "--resume")
    steps = [json.loads(x)["step"] for x in (root / "runs" / "lora-lora" / "metrics.jsonl").read_text().splitlines()
             if "loss" in x and "val_loss" not in x]
    assert steps == list(range(1, 17))  # resumed at 7, not restarted
    a = load_gamma(whole / "adapter.npz")
    assert a.rank == 4 and len(a.tensors) == 2 * 7

    base_run, base = checkpoint.load_params(root / "runs" / "base")
    merged_run, merged = checkpoint.load_params(whole)
    write_gguf(base, base_run.config, base_run.tokenizer_path, tmp_path / "base.gguf", progress=False)
    write_lora(a, tmp_path / "base.gguf", tmp_path / "adapter.gguf")
    sp = spm.SentencePieceProcessor(model_file=str(whole / "tokenizer.model"))
    ids = render(sp, [{"role": "user", "content": "Say apple."}], add_generation_prompt=True)[0]
    ours = prompt_logits(merged, merged_run.config, np.asarray(ids))
    theirs = llama_cpp_logits(tmp_path / "base.gguf", ids, kv="f32", n_ctx=96, lora=tmp_path / "adapter.gguf")
    change = np.abs(ours - prompt_logits(base, base_run.config, np.asarray(ids))).max()
    err = np.abs(ours - theirs).max()
    assert err <= 1e-3 and err < 0.01 * change, (err, change)


def test_doc_mask_keeps_packed_conversations_apart(root, full):
    run = sft(root, "docs", "--steps", 60, "--stop-after", 2, "--doc-mask")
    config = checkpoint.open_run(run).config
    sp = spm.SentencePieceProcessor(model_file=str(run / "tokenizer.model"))
    assert config.doc_mask and config.bos_id == sp.bos_id()
    # the base's attention output projections are zero, so attention acts from the second step on;
    # CPU runs are bit-reproducible, so the mask is the only difference from the unmasked run
    assert losses(run)[1] == losses(full)[1]
    assert losses(run)[2] != losses(full)[2]


def test_personality_by_sft_is_a_gamma(root, full, tmp_path):
    run = full
    r = cli("nanollama_jax.gamma", "extract", "--personality", run, "--base", root / "runs" / "base",
            "-o", tmp_path / "g.npz")
    assert r.returncode == 0, r.stderr
    r = cli("nanollama_jax.gamma", "inject", "--base", root / "runs" / "base", "--gamma", tmp_path / "g.npz",
            "-o", tmp_path / "injected")
    assert r.returncode == 0, r.stderr
    _, sft_params = checkpoint.load_params(run)
    _, injected = checkpoint.load_params(tmp_path / "injected")
    for x, y in zip(jax.tree_util.tree_leaves(sft_params), jax.tree_util.tree_leaves(injected)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
    assert greedy_answer(tmp_path / "injected", HELD_OUT).startswith("Answer: ")


def test_sft_from_an_hf_import_whose_tokenizer_lacks_the_chat_tokens(root, tmp_path):
    from sentencepiece import sentencepiece_model_pb2 as pb

    from export.hf import save_hf

    proto = pb.ModelProto()
    proto.ParseFromString((root / "tokenizer.model").read_bytes())
    del proto.pieces[-3:]
    (tmp_path / "old.model").write_bytes(proto.SerializeToString())
    config = LlamaConfig(n_layer=1, n_embd=64, n_head=4, n_kv_head=2, head_dim=16, vocab_size=VOCAB - 3,
                         sequence_len=96, multiple_of=64)
    save_hf(jax.tree_util.tree_map(np.asarray, M.init_params(config, 1)), config, tmp_path / "hf", tmp_path / "old.model")
    r = cli("export.hf", "--from-hf", tmp_path / "hf", "--output", tmp_path / "runs" / "imported")
    assert r.returncode == 0, r.stderr
    r = cli("nanollama_jax.sft", "--base", tmp_path / "runs" / "imported", "--data", root / "chats.jsonl",
            "--model-tag", "chat", "--runs-dir", tmp_path / "runs", "--steps", 3, "--batch-size", 2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "appended 3 chat token(s)" in r.stderr
    old = spm.SentencePieceProcessor(model_file=str(tmp_path / "old.model"))
    new = spm.SentencePieceProcessor(model_file=str(tmp_path / "runs" / "chat" / "tokenizer.model"))
    text = "Say apple. def f(x): return 42"
    assert new.encode(text) == old.encode(text) and new.get_piece_size() == VOCAB
    assert checkpoint.open_run(tmp_path / "runs" / "chat").config.vocab_size == VOCAB


def test_bad_chat_file_is_one_line(root, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"user": "hi", "assistant": "ho"}\n{"messages": [{"role": "robot", "content": "x"}]}\n')
    r = cli("nanollama_jax.sft", "--base", root / "runs" / "base", "--data", bad, "--model-tag", "x",
            "--runs-dir", tmp_path)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert f"{bad}: line 2: message 0 needs a role" in r.stderr
