"""One CLI convention for every command: a usage error is one line `<command>: … (see --help)` with
exit 2; a user-facing failure is one line `<command>: <file>: <problem>` with exit 1, never a
traceback; progress bars only on a terminal."""
from __future__ import annotations

import importlib
import io
import re
import sys

import numpy as np
import pytest

from nanollama_base.cli import Progress, run_cli

USAGE, FAILURE = 2, 1


def call(module: str, argv: list[str], capsys) -> tuple[int, list[str]]:
    """Run a command's main in-process (jax is already imported); its exit code and stderr lines."""
    main = importlib.import_module(module).main
    code = 0
    try:
        main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.fixture
def files(tmp_path):
    """Inputs that exist but are wrong: an empty folder, a file that is no GGUF, a corrupt .npz."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "not.gguf").write_bytes(b"GGUF but not really")
    (tmp_path / "corrupt.npz").write_bytes(b"PK not a zip")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "badrun").mkdir()
    (tmp_path / "badrun" / "config.json").write_text("{bad")
    (tmp_path / "badrun" / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "lo\n')
    np.save(tmp_path / "ids.npy", np.arange(4))
    return tmp_path


# (command, argv with {t} for the temporary folder, exit code, the file the line must name or None
# for a usage error, a word of the problem)
CASES = [
    ("data.prepare", ["--input", "{t}/missing.txt", "--output", "{t}/out"], FAILURE, "{t}/missing.txt",
     "no such file"),
    ("data.prepare", ["--output", "{t}/out", "--shard-size", "lots"], USAGE, None, "not a count"),
    ("data.prepare_personality", ["--input", "{t}/a.jsonl", "--tokenizer-dir", "{t}/empty", "--output", "{t}/out"],
     FAILURE, "{t}/empty/meta.json", "not a prepared data folder"),
    ("data.prepare_personality", ["--input", "{t}/a.jsonl"], USAGE, None, "--tokenizer-dir"),
    ("nanollama_jax.train", ["--data", "{t}/nodata", "--steps", "1"], FAILURE, "{t}/nodata",
     "data folder not found"),
    ("nanollama_jax.train", ["--init-from", "{t}/norun"], FAILURE, "{t}/norun", "no such run"),
    ("nanollama_jax.train", ["--optimizer", "sgd"], USAGE, None, "invalid choice"),
    ("nanollama_jax.generate", ["--checkpoint", "{t}/norun"], FAILURE, "{t}/norun", "no such run"),
    ("nanollama_jax.generate", ["--checkpoint", "{t}/norun", "--tokens", "{t}/ids.npy"], USAGE, None,
     "--dump-logits"),
    ("nanollama_jax.plot", ["{t}/empty"], FAILURE, "{t}/empty/metrics.jsonl", "no metrics"),
    ("nanollama_jax.plot", ["{t}/badrun"], FAILURE, "{t}/badrun/metrics.jsonl:2", "not a JSON line"),
    ("nanollama_jax.gamma", ["extract", "--personality", "{t}/p", "--base", "{t}/b", "-o", "{t}/g.npz"], FAILURE,
     "{t}/p", "no such run"),
    ("nanollama_jax.gamma", ["inject", "--base", "{t}/b", "--gamma", "{t}/corrupt.npz", "-o", "{t}/out"], FAILURE,
     "{t}/corrupt.npz", "not a readable .npz"),
    ("nanollama_jax.gamma", ["compose", "{t}/missing.npz", "-o", "{t}/out.npz"], FAILURE, "{t}/missing.npz",
     "no such gamma file"),
    ("nanollama_jax.gamma", ["stats", "{t}/missing.npz"], FAILURE, "{t}/missing.npz", "no such gamma file"),
    ("nanollama_jax.gamma", ["compress", "{t}/g.npz"], USAGE, None, "-o/--output"),
    ("nanollama_jax.gamma", [], USAGE, None, "COMMAND"),
    ("export.gguf", ["--checkpoint", "{t}/norun", "--output", "{t}/m.gguf"], FAILURE, "{t}/norun", "no such run"),
    ("export.gguf", ["--checkpoint", "{t}/badrun", "--output", "{t}/m.gguf"], FAILURE, "{t}/badrun/config.json",
     "unreadable run config"),
    ("export.gguf", ["--checkpoint", "{t}/norun", "--output", "{t}/m.gguf", "--dtype", "q9"], USAGE, None,
     "invalid choice"),
    ("export.gguf_read", ["{t}/not.gguf", "--output", "{t}/out"], FAILURE, "{t}/not.gguf", "not a readable GGUF"),
    ("export.gguf_read", ["{t}/missing.gguf", "--output", "{t}/out"], FAILURE, "{t}/missing.gguf", "no such GGUF"),
    ("export.hf", ["--from-hf", "{t}/empty", "--output", "{t}/out"], FAILURE, "{t}/empty", "no config.json"),
    ("export.hf", ["--checkpoint", "{t}/norun", "--from-hf", "{t}/empty", "--output", "{t}/out"], USAGE, None,
     "not allowed with"),
    ("export.nanollama", ["--from-pt", "{t}/missing.pt", "--output", "{t}/out"], FAILURE, "{t}/missing.pt",
     "no such checkpoint file"),
    ("export.nanollama", ["--checkpoint", "{t}/norun", "--output", "{t}/x.pt"], FAILURE, "{t}/norun", "no such run"),
    ("export.lora", ["{t}/missing.npz", "--base", "{t}/not.gguf", "-o", "{t}/a.gguf"], FAILURE, "{t}/missing.npz",
     "no such gamma file"),
    ("export.lora", ["{t}/missing.npz"], USAGE, None, "--base"),
    ("nanollama_jax.sft", ["--base", "{t}/norun", "--data", "{t}/c.jsonl", "--model-tag", "x", "--runs-dir", "{t}"],
     FAILURE, "{t}/norun", "no such run"),
    ("nanollama_jax.sft", ["--base", "{t}/b", "--data", "{t}/c.jsonl", "--model-tag", "x", "--merge"], USAGE, None,
     "--lora"),
    ("nanollama_jax.chat", ["--checkpoint", "{t}/norun"], FAILURE, "{t}/norun", "no such run"),
    ("data.chatset", ["--output", "{t}/c.jsonl", "--limit", "0"], USAGE, None, "--limit"),
]


@pytest.mark.parametrize("module,argv,code,file,problem", CASES,
                         ids=[f"{c[0]}-{'usage' if c[2] == USAGE else 'failure'}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_is_one_line_and_the_right_exit_code(module, argv, code, file, problem, files, capsys):
    got, lines = call(module, [a.format(t=files) for a in argv], capsys)
    command = module + (f" {argv[0]}" if module == "nanollama_jax.gamma" and argv else "")
    assert got == code, (got, lines)
    assert len(lines) == 1, lines
    if code == USAGE:
        assert re.fullmatch(rf"{re.escape(command)}: .+ \(see --help\)", lines[0]), lines
    else:
        assert lines[0].startswith(f"{command}: {file.format(t=files)}: "), lines
    assert problem in lines[0], lines
    assert not (files / "out").exists() and not (files / "m.gguf").exists()


def test_a_missing_optional_dependency_is_one_line_naming_the_install(files, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # what `import torch` meets when torch is not installed
    code, lines = call("export.nanollama", ["--from-pt", files / "empty.pt", "--output", files / "out"], capsys)
    assert code == FAILURE and lines == [
        "export.nanollama: torch is not installed (an optional dependency): pip install 'nanollama-jax[torch]' "
        "(or bash scripts/setup.sh test)"]


def test_only_expected_errors_become_one_line(capsys):
    """A bug (a missing module that is no optional dependency, a TypeError) keeps its traceback."""
    def missing_core():
        import nanollama_jax_no_such_module  # noqa: F401

    with pytest.raises(ModuleNotFoundError):
        run_cli("python -m x", missing_core)
    with pytest.raises(TypeError):
        run_cli("python -m x", lambda: len(3))
    with pytest.raises(SystemExit) as e:
        run_cli("python -m x", lambda: open("/nonexistent/file"))
    assert e.value.code == 1
    assert capsys.readouterr().err == "x: /nonexistent/file: No such file or directory\n"


def test_progress_in_a_log_file_is_plain_lines(monkeypatch):
    """Not a terminal: no tqdm redraws (no carriage returns), a plain line with the ETA instead."""
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    with Progress(4, desc="train", unit="step", every=0.0) as bar:
        for loss in (4.0, 3.5):
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.1f}")
    lines = err.getvalue().splitlines()
    assert "\r" not in err.getvalue() and len(lines) == 2, lines
    assert lines[0].startswith("train: 1/4 step (25%), about ") and lines[0].endswith(" min left"), lines
    assert lines[1].startswith("train: 2/4 step (50%), loss=4.0, about "), lines
    silent = io.StringIO()
    monkeypatch.setattr(sys, "stderr", silent)
    Progress(4, desc="quiet", enabled=False, every=0.0).update(2)
    assert silent.getvalue() == ""
