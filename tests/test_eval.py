"""Evaluation: bits per byte from the tokenizer's pieces, CORE-format tasks (prompts, spans, few-shot,
batched and sharded scoring), any model source, the lm-evaluation-harness cross-check, and a trained
model beating chance on a task it can learn."""
import dataclasses
import functools
import itertools
import json
import os
import random
import subprocess
import sys

import jax
import numpy as np
import pytest

from nanollama_jax import checkpoint, sharding
from nanollama_jax import model as M
from nanollama_jax import tasks as T
from nanollama_jax.scoring import bits_per_byte, evaluate_tasks, text_windows, token_byte_table

VOCAB = 512  # a multiple of 64: no padded rows, whose logits HF would see as 0 instead of masked


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    from data import builtin, tokenizer

    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    path.write_bytes(tokenizer.train(itertools.islice(builtin.documents(), 80), VOCAB))
    return path


@pytest.fixture(scope="module")
def sp(tokenizer_file):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(tokenizer_file))


@pytest.fixture(scope="module")
def config(gqa_config):
    return dataclasses.replace(gqa_config, vocab_size=VOCAB, sequence_len=64)


@pytest.fixture(scope="module")
def params(config):
    """nanollama's init with the zero projections and the near-zero head filled at a realistic scale,
    so options get clearly different scores."""
    p = jax.tree_util.tree_map(np.array, M.init_params(config, 0))
    rng = np.random.default_rng(0)
    for mod, name in (("attn", "c_proj"), ("ffn", "down_proj")):
        k = p["layers"][mod][name]["kernel"]
        p["layers"][mod][name]["kernel"] = (rng.uniform(-1, 1, k.shape) * np.sqrt(3 / k.shape[1])).astype(np.float32)
    p["output"]["kernel"] = (0.3 * rng.standard_normal(p["output"]["kernel"].shape)).astype(np.float32)
    return p


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh("4x1")


@functools.lru_cache(maxsize=2)
def one_row_forward(config):
    return jax.jit(functools.partial(M.forward, config=config))


def log_probs(params, config, ids):
    """float64 log-softmax over one sequence run alone: the independent reference. Zeros after the
    sequence (to the model's context length, one compilation) cannot change a causal model's logits."""
    row = np.zeros((1, config.sequence_len), np.int32)
    row[0, :len(ids)] = ids
    logits = np.asarray(one_row_forward(config)(params, row)[0, :len(ids)], np.float64)
    logits -= logits.max(-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


# ------------------------------------------------------------------------------ bits per byte

TEXTS = ["The quick brown fox jumps over the lazy dog.", "  two leading spaces, then   runs", "tabs\tand\nnewlines\n",
         "naïve café, Grüße, Ελληνικά, 日本語, emoji ☃🙂", "digits 0123456789", "x", ""]


@pytest.mark.parametrize("text", TEXTS)
def test_piece_bytes_add_up_to_the_text(sp, text):
    table = token_byte_table(sp)
    ids = [sp.bos_id()] + sp.encode(text) + [sp.eos_id()]
    counted = sum(int(table.bytes[t] - table.dummy_space[t] * (prev == sp.bos_id())) for prev, t in zip(ids, ids[1:]))
    assert counted == len(text.encode("utf-8")) == len(sp.decode(ids).encode("utf-8"))
    assert table.bytes[sp.bos_id()] == table.bytes[sp.eos_id()] == table.bytes[sp.unk_id()] == 0


def test_bits_per_byte_equals_direct_computation(sp, config, params, mesh):
    text = "The function returns a list of the values in the order given."
    ids = [sp.bos_id()] + sp.encode(text)
    assert len(ids) <= config.sequence_len + 1
    assert sp.id_to_piece(ids[1]) != "\u2581"  # every piece of this text carries bytes
    lp = log_probs(params, config, ids[:-1])
    direct = -sum(lp[i, t] for i, t in enumerate(ids[1:])) / np.log(2) / len(text.encode("utf-8"))
    windows = text_windows(sp, [text], config.sequence_len, batch_size=3)  # padded to 4 rows on the mesh
    ours = bits_per_byte(params, config, windows, token_byte_table(sp), mesh=mesh)
    assert ours["bytes"] == len(text.encode("utf-8"))
    assert ours["bpb"] == pytest.approx(direct, rel=1e-6)


def test_bits_per_byte_spans_windows_and_skips_special_targets(sp, config, params, mesh):
    docs = ["The first document. It has two sentences.", "the second document follows, after its BOS.",
            "the third: Ünïcödé ☃ text."]
    assert all(sp.encode(d, out_type=str)[0] != "\u2581" for d in docs)  # only BOS targets lack bytes
    stream = np.concatenate([[sp.bos_id()] + sp.encode(d) for d in docs])
    seq = 16
    nats = 0.0
    for start in range(0, len(stream) - 1, seq):
        window = stream[start:start + seq + 1]
        lp = log_probs(params, config, window[:-1])
        nats -= sum(lp[i, t] for i, t in enumerate(window[1:]) if t != sp.bos_id())  # BOS targets: no bytes
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    ours = bits_per_byte(params, dataclasses.replace(config, sequence_len=seq),
                         text_windows(sp, docs, seq, batch_size=4), token_byte_table(sp), mesh=mesh)
    assert ours["bytes"] == nbytes
    assert ours["bpb"] == pytest.approx(nats / np.log(2) / nbytes, rel=1e-6)


# ------------------------------------------------------------------------------ task formats

MC = [{"query": f"Question {i}: what does the {w} say?", "choices": ["Hello there", "Goodbye now", "Maybe later"],
       "gold": i % 3} for i, w in enumerate(["cat", "dog", "cow", "owl", "fox", "bee", "ant"])]
SCHEMA = [{"context_options": [f"Out in the garden lay the {a}", f"Out in the garden lay the {b}"],
           "continuation": "so it got wet.", "gold": i % 2} for i, (a, b) in
          enumerate([("hat", "book"), ("cat", "lamp"), ("dog", "chair"), ("key", "bag"), ("pen", "cup")])]
LM = [{"context": f"Count with me: one, two, three, {w} ", "continuation": "and done."}
      for w in ["four", "five", "six", "seven", "eight"]]


def write_jsonl(path, items):
    path.write_text("".join(json.dumps(x) + "\n" for x in items))
    return path


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    write_jsonl(d / "mc.jsonl", MC)
    write_jsonl(d / "schema.jsonl", SCHEMA)
    write_jsonl(d / "lm.jsonl", LM)
    return d


def test_kinds_inferred_and_baselines(task_dir):
    tasks = {t.label: t for t in T.load_tasks([task_dir], num_fewshot=2)}
    assert {k: t.kind for k, t in tasks.items()} == {"mc": "multiple_choice", "schema": "schema",
                                                     "lm": "language_modeling"}
    assert tasks["mc"].random_baseline == pytest.approx(1 / 3)
    assert tasks["schema"].random_baseline == pytest.approx(1 / 2)
    assert tasks["lm"].random_baseline == 0.0
    assert sorted(map(json.dumps, tasks["mc"].items)) == sorted(map(json.dumps, MC))  # shuffled, all kept
    assert tasks["mc"].items == T.load_tasks([task_dir / "mc.jsonl"], num_fewshot=2)[0].items  # fixed seed


def test_fewshot_prompts_exclude_the_item_and_are_fixed(task_dir):
    task = T.load_tasks([task_dir / "mc.jsonl"], num_fewshot=3)[0]
    for i, item in enumerate(task.items):
        shots = T.fewshot_examples(task, i)
        assert len(shots) == 3 and item not in shots
        assert shots == T.fewshot_examples(task, i)
        prompts = T.render(task, i)
        prefix = "".join(f"{s['query']} {s['choices'][s['gold']]}\n\n" for s in shots)
        assert prompts == [f"{prefix}{item['query']} {c}" for c in item["choices"]]
    draws = {tuple(json.dumps(s) for s in T.fewshot_examples(task, i)) for i in range(len(task.items))}
    assert len(draws) > 1  # each item draws its own examples


def test_scored_spans_are_the_answers(task_dir, sp):
    for name, answers in (("mc", lambda it: it["choices"]), ("schema", lambda it: [it["continuation"]] * 2),
                          ("lm", lambda it: [it["continuation"]])):
        task = T.load_tasks([task_dir / f"{name}.jsonl"], num_fewshot=1)[0]
        for i, item in enumerate(task.items):
            rows = T.item_rows(task, i, sp, max_len=512)
            assert [sp.decode(r.tokens[r.start:r.end].tolist()).strip() for r in rows] == answers(item)
            assert all(r.tokens[0] == sp.bos_id() and r.end == len(r.tokens) for r in rows)


def test_long_prompts_keep_their_end(task_dir, sp):
    task = T.load_tasks([task_dir / "mc.jsonl"], num_fewshot=6)[0]
    rows = T.item_rows(task, 0, sp, max_len=24)
    assert all(len(r.tokens) == 24 for r in rows)
    assert [sp.decode(r.tokens[r.start:r.end].tolist()).strip() for r in rows] == task.items[0]["choices"]


def test_eval_bundle_layout(tmp_path, task_dir):
    (tmp_path / "eval_data" / "lm").mkdir(parents=True)
    write_jsonl(tmp_path / "eval_data" / "mc_file.jsonl", MC)
    write_jsonl(tmp_path / "eval_data" / "lm" / "count.jsonl", LM)
    (tmp_path / "core.yaml").write_text(
        "icl_tasks:\n"
        "- label: mc_task\n  dataset_uri: mc_file.jsonl\n  num_fewshot: [4]\n  icl_task_type: multiple_choice\n"
        "- label: counting\n  dataset_uri: lm/count.jsonl\n  num_fewshot: [2]\n  icl_task_type: language_modeling\n"
        "  continuation_delimiter: \"\\n\"\n")
    (tmp_path / "eval_meta_data.csv").write_text("Eval Task,Task Category,Random baseline\nmc_task,x,25.0\n")
    mc, lm = T.load_tasks([tmp_path])
    assert (mc.label, mc.kind, mc.num_fewshot, mc.delimiter, mc.random_baseline) == \
        ("mc_task", "multiple_choice", 4, " ", 0.25)  # the CSV's baseline (percent), not 1/3
    assert (lm.label, lm.kind, lm.num_fewshot, lm.delimiter, lm.random_baseline) == \
        ("counting", "language_modeling", 2, "\n", 0.0)
    assert [t.label for t in T.load_tasks([tmp_path / "core.yaml"])] == ["mc_task", "counting"]


# ------------------------------------------------------------------------------ scoring

def test_batched_sharded_scores_equal_one_row_at_a_time(task_dir, sp, config, params, mesh):
    tasks = T.load_tasks([task_dir], num_fewshot=1)
    for scoring in ("mean", "sum"):
        check_scores(evaluate_tasks(params, config, sp, tasks, scoring=scoring, mesh=mesh, batch_size=1,
                                    details=True, max_items=3), tasks, sp, config, params, scoring)


def check_scores(out, tasks, sp, config, params, scoring):
    for task in tasks:
        res = out["tasks"][task.label]
        assert res["items"] == len(res["details"]) == 3
        verdicts = []
        for i, d in enumerate(res["details"]):
            rows = T.item_rows(task, i, sp, config.sequence_len)
            want = []
            for r in rows:
                lp = log_probs(params, config, r.tokens[:-1])
                picked = [lp[p - 1, r.tokens[p]] for p in range(r.start, r.end)]
                want.append(-np.mean(picked) if scoring == "mean" else np.sum(picked))
                greedy = all(np.argmax(lp[p - 1]) == r.tokens[p] for p in range(r.start, r.end))
            if task.kind == "language_modeling":
                assert d["correct"] == greedy
                verdicts.append(greedy)
                continue
            assert d["scores"] == pytest.approx(want, abs=1e-4)
            best = int(np.argmin(want) if scoring == "mean" else np.argmax(want))
            assert d["pred"] == best and d["gold"] == task.items[i]["gold"]
            verdicts.append(best == d["gold"])
        assert res["accuracy"] == pytest.approx(np.mean(verdicts))
        assert res["centred"] == pytest.approx((res["accuracy"] - task.random_baseline) / (1 - task.random_baseline))
    assert out["centred_mean"] == pytest.approx(np.mean([r["centred"] for r in out["tasks"].values()]))


def test_any_model_source_gives_the_same_scores(tmp_path, task_dir, tokenizer_file, sp, config, params, mesh):
    """A run, the same weights imported from its HF export and read back from its F32 GGUF score alike;
    an HF folder or a GGUF given directly is refused with the import command (export/ sits above eval)."""
    from export.gguf import write_gguf
    from export.gguf_read import write_run
    from export.hf import load_hf, save_hf
    from nanollama_jax.eval import load_any

    checkpoint.write_params_run(tmp_path / "run", config, params, tokenizer_file, step=3)
    save_hf(params, config, tmp_path / "hf", tokenizer_file)
    write_gguf(params, config, tokenizer_file, tmp_path / "m.gguf", "f32", progress=False)
    checkpoint.write_params_run(tmp_path / "from-hf", *load_hf(tmp_path / "hf"), tokenizer_file)
    write_run(tmp_path / "m.gguf", tmp_path / "from-gguf")
    for direct, command in (("hf", "export.hf --from-hf"), ("m.gguf", "export.gguf_read")):
        with pytest.raises(ValueError, match=command):
            load_any(tmp_path / direct, mesh)
    tasks = T.load_tasks([task_dir / "mc.jsonl"])
    scores = {}
    for name in ("run", "from-hf", "from-gguf"):
        m = load_any(tmp_path / name, mesh)
        assert m.config.vocab_size == VOCAB and m.tokenizer.serialized_model_proto() == sp.serialized_model_proto()
        res = evaluate_tasks(m.params, m.config, m.tokenizer, tasks, mesh=mesh, details=True)
        scores[name] = [d["scores"] for d in res["tasks"]["mc"]["details"]]
    assert np.allclose(scores["run"], scores["from-hf"], atol=1e-6)
    assert np.allclose(scores["run"], scores["from-gguf"], atol=1e-5)
    assert load_any(tmp_path / "run" / "checkpoints" / "3", mesh).source["step"] == 3


# ------------------------------------------------------------------------------ the command

def run_eval(*args, **kw):
    return subprocess.run([sys.executable, "-m", "nanollama_jax.eval", *map(str, args)], capture_output=True,
                          text=True, **kw)


def test_help_shows_an_example():
    out = run_eval("--help")
    assert out.returncode == 0 and "python -m nanollama_jax.eval --checkpoint runs/nano --tasks" in out.stdout


def test_bad_task_file_is_one_clear_line(tmp_path, tokenizer_file, config, params):
    checkpoint.write_params_run(tmp_path / "run", config, params, tokenizer_file)
    bad = write_jsonl(tmp_path / "bad.jsonl", [MC[0], {**MC[1], "gold": 3}])
    out = run_eval("--checkpoint", tmp_path / "run", "--tasks", bad)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [f"nanollama_jax.eval: {bad}:2: 'gold' must be an index into 'choices' (0..2), got 3"]
    out = run_eval("--checkpoint", tmp_path / "nope", "--tasks", write_jsonl(tmp_path / "good.jsonl", MC))
    assert out.returncode == 1 and out.stderr.strip() == f"nanollama_jax.eval: {tmp_path / 'nope'}: no such run"
    assert not list(tmp_path.glob("*.json")) and not (tmp_path / "run" / "eval").exists()


# ------------------------------------------------------------------------------ lm-evaluation-harness

CROSS_ITEMS = [{"query": q, "choices": c, "gold": g} for q, c, g in [
    ("The capital of France is", ["Paris", "London", "a small dog", "green"], 0),
    ("Water is made of hydrogen and", ["oxygen", "iron", "the moon"], 0),
    ("def add(a, b): return", ["a + b", "a * b", "None", "print(a)"], 0),
    ("Monday comes before", ["Tuesday", "Sunday", "the weekend", "noon"], 0),
    ("A list in Python is written with", ["square brackets", "curly braces", "angle quotes"], 0),
    ("The opposite of hot is", ["cold", "warm", "spicy", "loud"], 0),
    ("Seven plus one equals", ["eight", "nine", "seventy one", "zero"], 0),
    ("An exception is raised with the keyword", ["raise", "throw", "yield", "return"], 0),
]]


def test_accuracy_equals_lm_evaluation_harness(tmp_path, tokenizer_file, sp, config, params):
    """Our per-item choices with summed log-likelihood scoring equal lm_eval's `acc` choices, run offline
    through its HF model on the HF export of the same weights and a local task file."""
    from export.hf import save_hf

    save_hf(params, config, tmp_path / "hf", tokenizer_file)
    checkpoint.write_params_run(tmp_path / "run", config, params, tokenizer_file)
    items = write_jsonl(tmp_path / "cross.jsonl", CROSS_ITEMS)
    ours = run_eval("--checkpoint", tmp_path / "run", "--tasks", items, "--scoring", "sum", "--details",
                    "--output", tmp_path / "ours.json", "--quiet", "--batch-size", "4")
    assert ours.returncode == 0, ours.stderr
    assert "cross" in ours.stdout and "mean centred accuracy" in ours.stdout
    mine = json.loads((tmp_path / "ours.json").read_text())["tasks"]["cross"]["details"]

    (tmp_path / "lm_tasks").mkdir()
    (tmp_path / "lm_tasks" / "cross.yaml").write_text(
        f"task: nanollama_cross\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {items}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: query\ndoc_to_choice: choices\n"
        "doc_to_target: gold\ntarget_delimiter: ' '\nmetric_list:\n  - metric: acc\n")
    script = f"""
import json, lm_eval
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
lm = HFLM(pretrained={str(tmp_path / 'hf')!r}, device="cpu", dtype="float32", batch_size=8)
tok = lm.tokenizer
res = lm_eval.simple_evaluate(model=lm, tasks=["nanollama_cross"], num_fewshot=0, log_samples=True,
                              task_manager=TaskManager(include_path={str(tmp_path / 'lm_tasks')!r}))
samples = sorted(res["samples"]["nanollama_cross"], key=lambda s: s["doc_id"])
print(json.dumps({{"acc": res["results"]["nanollama_cross"]["acc,none"],
                  "ll": [[r[0] for r in s["filtered_resps"]] for s in samples],
                  "encoded": [tok.encode(q + " " + c) for it in {CROSS_ITEMS!r} for q, c in
                              ((it["query"], c) for c in it["choices"])]}}))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf_cache"), "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    theirs = json.loads(r.stdout.strip().splitlines()[-1])
    # the comparison is only meaningful if transformers tokenizes these texts as SentencePiece does
    assert theirs["encoded"] == [[sp.bos_id()] + sp.encode(f"{it['query']} {c}") for it in CROSS_ITEMS
                                 for c in it["choices"]]
    # our items are in their fixed shuffle; put them back in file order, lm_eval's order
    task = T.load_tasks([items])[0]
    ours_in_file_order = [mine[[json.dumps(x) for x in task.items].index(json.dumps(it))] for it in CROSS_ITEMS]
    for it, d, ll in zip(CROSS_ITEMS, ours_in_file_order, theirs["ll"]):
        assert d["pred"] == int(np.argmax(ll)), it["query"]
        gaps = np.sort(ll)[::-1]
        assert gaps[0] - gaps[1] > 1e-3  # no near-tie: the agreement is not luck of rounding
        # same log-likelihoods up to a per-item constant (we score from the options' common prefix)
        assert np.allclose(np.subtract(d["scores"], d["scores"][0]), np.subtract(ll, ll[0]), atol=2e-4)
    assert np.mean([d["pred"] == d["gold"] for d in mine]) == pytest.approx(theirs["acc"])


# ------------------------------------------------------------------------------ a model that learns

COLOURS = ["red", "blue", "green", "gold"]


def facts():
    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "ru", "ze", "po", "ta", "ni", "vo", "shi", "ba", "de", "fu", "gi", "ho", "ju"]
    names = set()
    while len(names) < 16:
        names.add("".join(rng.choice(syllables) for _ in range(3)).capitalize())
    return {n: COLOURS[i % 4] for i, n in enumerate(sorted(names))}  # each colour 4 times: no prior helps


def test_trained_model_beats_chance_and_untrained_does_not(tmp_path, mesh):
    """pico trained 50 steps on sentences stating each name's colour learns the colours; the same
    model untrained scores at chance. A model ignoring the name scores exactly 25% here."""
    from nanollama_jax.eval import load_any

    rng = random.Random(1)
    (tmp_path / "corpus").mkdir()
    lines = [f"The colour of {n} is {c}." for n, c in facts().items()]
    for d in range(60):
        rng.shuffle(lines)
        (tmp_path / "corpus" / f"doc{d:02d}.txt").write_text("\n".join(lines) + "\n")
    task = write_jsonl(tmp_path / "colours.jsonl", [{"query": f"The colour of {n} is", "choices": COLOURS,
                                                     "gold": COLOURS.index(c)} for n, c in facts().items()])
    subprocess.run([sys.executable, "-m", "data.prepare", "--input", tmp_path / "corpus", "--output",
                    tmp_path / "data", "--vocab-size", "300", "--quiet"], check=True, capture_output=True)
    r = subprocess.run([sys.executable, "-m", "nanollama_jax.train", "--size", "pico", "--data", tmp_path / "data",
                        "--steps", "50", "--batch-size", "16", "--tokens-per-step", "1024", "--mesh", "1x1",
                        "--model-tag", "facts", "--runs-dir", tmp_path / "runs", "--sample-every", "0",
                        "--save-every", "1000"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    held_out = tmp_path / "corpus" / "doc00.txt"
    out = run_eval("--checkpoint", tmp_path / "runs" / "facts", "--tasks", task, "--bpb-text", held_out, "--quiet")
    assert out.returncode == 0, out.stderr
    results = json.loads((tmp_path / "runs" / "facts" / "eval" / "step_50.json").read_text())
    trained = results["tasks"]["colours"]
    assert trained["accuracy"] >= 0.9 and trained["centred"] >= 0.85
    assert results["bpb"]["bytes"] == len(held_out.read_bytes()) and results["bpb"]["bpb"] < 1.0

    run = checkpoint.open_run(tmp_path / "runs" / "facts")
    checkpoint.write_params_run(tmp_path / "untrained", run.config, M.init_params(run.config, 0), run.tokenizer_path)
    m = load_any(tmp_path / "untrained", mesh)
    untrained = evaluate_tasks(m.params, m.config, m.tokenizer, T.load_tasks([task]), mesh=mesh)["tasks"]["colours"]
    assert untrained["accuracy"] <= 0.375 and untrained["centred"] <= 0.17
    windows = text_windows(m.tokenizer, [held_out.read_text()], m.config.sequence_len, batch_size=4)
    assert bits_per_byte(m.params, m.config, windows, token_byte_table(m.tokenizer), mesh=mesh)["bpb"] > 2.0
