"""Export's failures and CLI surface: one-line errors on bad input, nothing half-written, refused models,
GGUFs from other converters, `--help` examples."""
import numpy as np
import pytest

from export import gguf as G
from nanollama_jax import checkpoint

from export_fixtures import (  # noqa: F401 (pytest fixtures, requested by name)
    TEXTS, assert_one_line_error, assert_params_equal_on_real_rows, rewrite_gguf, run_cli, config, corpus,
    f32_gguf, params, run_dir, sp, tokenizer_file,
)


# ---------------------------------------------------------------- bad input

def test_rewrite_helper_keeps_a_good_file_good(tmp_path, f32_gguf):
    from export.gguf_read import read_gguf

    read_gguf(rewrite_gguf(f32_gguf, tmp_path / "copy.gguf"))


def test_bad_inputs_fail_cleanly(tmp_path, f32_gguf, run_dir):
    from gguf import GGUFValueType as V

    out = tmp_path / "out"
    out.mkdir()
    # export: a checkpoint path that does not exist
    r = run_cli("export.gguf", "--checkpoint", tmp_path / "nope", "--output", out / "m.gguf")
    assert_one_line_error(r, "nope", "no such run")
    # export: an unknown --dtype
    r = run_cli("export.gguf", "--checkpoint", run_dir, "--output", out / "m.gguf", "--dtype", "q3_k")
    assert_one_line_error(r, "--dtype", "q3_k")
    # read: a GGUF of another architecture
    gpt2 = rewrite_gguf(f32_gguf, tmp_path / "gpt2.gguf", {"general.architecture": ("gpt2",)})
    r = run_cli("export.gguf_read", gpt2, "--output", out / "run1")
    assert_one_line_error(r, "gpt2.gguf", "architecture is 'gpt2'")
    # read: a tensor with the wrong shape
    bad = rewrite_gguf(f32_gguf, tmp_path / "badshape.gguf",
                       tensor=lambda name, a: a[:64] if name == "blk.1.attn_k.weight" else a)
    r = run_cli("export.gguf_read", bad, "--output", out / "run2")
    assert_one_line_error(r, "badshape.gguf", "blk.1.attn_k.weight", "[64, 128]", "expected [128, 128]")
    # read: a non-SentencePiece (BPE) vocabulary
    bpe = rewrite_gguf(f32_gguf, tmp_path / "bpe.gguf", {"tokenizer.ggml.model": ("gpt2", V.STRING)})
    r = run_cli("export.gguf_read", bpe, "--output", out / "run3")
    assert_one_line_error(r, "bpe.gguf", "'gpt2'", "SentencePiece")
    # read: not a GGUF at all, and a missing file
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    assert_one_line_error(run_cli("export.gguf_read", junk, "--output", out / "run4"), "junk.gguf", "GGUF")
    assert_one_line_error(run_cli("export.gguf_read", tmp_path / "missing.gguf", "--output", out / "run5"),
                          "missing.gguf")
    # .pt import: a missing file
    assert_one_line_error(run_cli("export.nanollama", "--from-pt", tmp_path / "checkpoint_step1.pt", "--output",
                                  out / "run6"), "checkpoint_step1.pt")
    assert list(out.iterdir()) == []  # nothing written, not even a temporary file


def test_qk_norm_run_is_refused_by_the_cli(tmp_path, config, params, tokenizer_file):
    import dataclasses

    run = tmp_path / "qk"
    checkpoint.write_params_run(run, dataclasses.replace(config, use_qk_norm=True), params, tokenizer_file)
    r = run_cli("export.gguf", "--checkpoint", run, "--output", tmp_path / "out" / "m.gguf")
    assert_one_line_error(r, "QK-norm")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_failure_mid_write_leaves_no_partial_file(tmp_path, params, config, tokenizer_file, monkeypatch):
    calls = []
    real = G.encode_tensor

    def flaky(a, qtype):
        calls.append(1)
        if len(calls) == 5:
            raise OSError("disk full")
        return real(a, qtype)

    monkeypatch.setattr(G, "encode_tensor", flaky)
    with pytest.raises(OSError, match="disk full"):
        G.write_gguf(params, config, tokenizer_file, tmp_path / "m.gguf", "q8_0", progress=False)
    assert list(tmp_path.iterdir()) == []



def test_foreign_gguf_without_our_keys_reads_from_llama_metadata_alone(tmp_path, f32_gguf, params, config, sp):
    """As a GGUF from another converter: no nanollama.* keys, and tied embeddings (no output.weight)."""
    import sentencepiece as spm

    from export.gguf_read import read_gguf

    plain = rewrite_gguf(f32_gguf, tmp_path / "plain.gguf", {G.CONFIG_KEY: None, G.TOKENIZER_KEY: None})
    config2, back, tok = read_gguf(plain)
    assert config2 == config  # every field recovered from llama.* metadata (eps as 1e-5, not its float32)
    assert_params_equal_on_real_rows(back, params, config)
    rebuilt = spm.SentencePieceProcessor(model_proto=tok)
    assert all(rebuilt.encode(t) == sp.encode(t) for t in TEXTS)

    tied = rewrite_gguf(f32_gguf, tmp_path / "tied.gguf", {G.CONFIG_KEY: None}, drop={"output.weight"})
    _, back, _ = read_gguf(tied)
    np.testing.assert_array_equal(back["output"]["kernel"], np.asarray(back["tok_embeddings"]["embedding"]).T)


def test_every_cli_has_help_with_an_example(capsys):
    from export import gguf_read, nanollama

    for mod, example in ((G, "python -m export.gguf --checkpoint"), (gguf_read, "python -m export.gguf_read"),
                         (nanollama, "python -m export.nanollama --from-pt")):
        with pytest.raises(SystemExit) as e:
            mod.main(["--help"])
        assert e.value.code == 0
        assert example in capsys.readouterr().out


def test_export_from_a_step_folder(tmp_path, run_dir, f32_gguf):
    G.main(["--checkpoint", str(run_dir / "checkpoints" / "7"), "--output", str(tmp_path / "m.gguf"), "--dtype", "F32",
            "--quiet"])
    assert (tmp_path / "m.gguf").read_bytes() == f32_gguf.read_bytes()  # deterministic, same bytes
