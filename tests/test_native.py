"""The suite's handling of native code: a child process that dies by a signal is one failed comparison that
names the model file, its tensor type and the signal, and the tests after it still run; a missing test
dependency stops the suite with one line naming it and the setup command."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import pytest

import go_fixtures as F
import native

TESTS = Path(__file__).resolve().parent
# a real segmentation fault: reading address 0
SEGFAULT = [sys.executable, "-c", "import ctypes; ctypes.string_at(0)"]


@pytest.fixture(scope="module")
def q4_model(tmp_path_factory):
    params = F.random_params(vocab=64, dim=64, n_layer=1, n_head=2, n_kv=1, head_dim=32, ffn=128)
    return F.write_model(tmp_path_factory.mktemp("native") / "crash-me.gguf", params,
                         qtype=gguf.GGMLQuantizationType.Q4_0, tokenizer=False)


def test_a_child_killed_by_a_signal_is_one_assertion_naming_file_type_and_signal(q4_model):
    with pytest.raises(AssertionError) as e:
        native.run_native(SEGFAULT, what="llama.cpp", model=q4_model)
    first = str(e.value).splitlines()[0]
    assert first.startswith(f"llama.cpp died by SIGSEGV on {q4_model} (")
    assert "Q4_0" in first


def test_the_go_engine_killed_by_a_signal_names_its_model(tmp_path, q4_model):
    engine = tmp_path / "fake-engine"  # stands in for the Go binary: killed by SIGABRT as it starts
    engine.write_text("#!/bin/sh\nkill -ABRT $$\n")
    engine.chmod(0o755)
    with pytest.raises(AssertionError, match=rf"^the Go engine died by SIGABRT on {q4_model} \(Q4_0"):
        native.run_go(engine, "--model", q4_model, "--prompt", "hi")
    # even where a non-zero exit is the expected outcome (error-handling tests), a signal is not
    with pytest.raises(AssertionError, match="SIGABRT"):
        native.run_go(engine, "--model", q4_model, check=False)


def test_a_crash_fails_one_test_and_the_suite_runs_on(tmp_path, q4_model):
    (tmp_path / "test_crash.py").write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        import native

        def test_compare_with_a_crashing_runtime():
            native.run_native({SEGFAULT!r}, what="llama.cpp", model={str(q4_model)!r})

        def test_the_next_one():
            assert 1 + 1 == 2
    """))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_crash.py"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "1 failed, 1 passed" in r.stdout, r.stdout
    assert f"AssertionError: llama.cpp died by SIGSEGV on {q4_model} (" in r.stdout
    assert "Fatal Python error" not in r.stdout + r.stderr  # pytest itself did not crash


def test_a_missing_dependency_stops_the_suite_with_one_line(tmp_path):
    # no `go`, `chromium` or `chromedriver` on PATH: only the interpreter's own folder remains
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TESTS / "test_native.py"),
                        "-k", "nothing_matches_this"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0
    errors = [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("ERROR:")]
    assert errors == ["ERROR: missing test dependencies: go (the Go toolchain), chromium, chromedriver "
                      "(chromium-driver); install them with `bash scripts/setup.sh test`"], r.stdout + r.stderr
