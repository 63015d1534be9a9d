"""The Go engine builds for every platform we ship (cross-compiled here) and its
GGUF reader survives a bounded native fuzzing run (FuzzReadGGUF: reader -> model
-> tokenizer -> generation, from the seed corpus in go/testdata/fuzz/)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import go_fixtures as F  # noqa: E402


@pytest.mark.parametrize("target", ["linux/amd64", "linux/arm64", "darwin/arm64", "windows/amd64"])
def test_cross_compiles(target, tmp_path):
    goos, goarch = target.split("/")
    env = {**os.environ, "GOOS": goos, "GOARCH": goarch, "CGO_ENABLED": "0"}
    out = tmp_path / ("nanollama.exe" if goos == "windows" else "nanollama")
    r = subprocess.run([F.go_bin(), "build", "-o", str(out), "."], cwd=F.GO_DIR, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{target}: {r.stderr}"
    magic = out.read_bytes()[:4]
    want = {"linux": b"\x7fELF", "windows": b"MZ", "darwin": b"\xcf\xfa\xed\xfe"}[goos]
    assert magic.startswith(want), f"{target}: not a {goos} executable ({magic!r})"


def test_fuzz_gguf_reader_bounded_run():
    # Minimisation of an 8 KB input takes long; capping it keeps the run bounded.
    r = subprocess.run([F.go_bin(), "test", "-run=^$", "-fuzz=^FuzzReadGGUF$", "-fuzztime=15s",
                        "-fuzzminimizetime=20x", "-parallel=1", "."],
                       cwd=F.GO_DIR, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, "fuzzing found a failure (input saved under go/testdata/fuzz/):\n" + r.stdout[-4000:]
    assert "execs:" in r.stdout, r.stdout[-2000:]
