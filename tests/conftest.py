"""Test setup: 4 simulated CPU devices for the whole session (tests choose their mesh explicitly),
and small model configs."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import importlib.util  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402

from nanollama_jax.config import LlamaConfig  # noqa: E402

# What the suite compares against; none is optional (no test is skipped for want of one).
TEST_DEPENDENCIES = {"llama_cpp": "llama-cpp-python", "torch": "torch", "transformers": "transformers",
                     "gguf": "gguf", "sentencepiece": "sentencepiece", "openai": "openai", "selenium": "selenium",
                     "lm_eval": "lm_eval", "pyarrow": "pyarrow"}
# Programs on PATH: the Go toolchain, and Chromium + its driver for the chat page's browser test.
TEST_PROGRAMS = {"go": "go (the Go toolchain)", "chromium": "chromium", "chromedriver": "chromedriver (chromium-driver)"}


def missing_dependencies() -> list[str]:
    missing = [pkg for mod, pkg in TEST_DEPENDENCIES.items() if importlib.util.find_spec(mod) is None]
    missing += [what for program, what in TEST_PROGRAMS.items() if shutil.which(program) is None]
    return missing


def pytest_sessionstart(session):
    missing = missing_dependencies()
    if missing:
        raise pytest.UsageError(f"missing test dependencies: {', '.join(missing)}; "
                                "install them with `bash scripts/setup.sh test`")


@pytest.fixture(scope="session")
def mha_config():
    return LlamaConfig(n_layer=2, n_embd=128, n_head=2, n_kv_head=2, vocab_size=1000, sequence_len=128)


@pytest.fixture(scope="session")
def gqa_config():
    return LlamaConfig(n_layer=3, n_embd=256, n_head=4, n_kv_head=2, vocab_size=512, sequence_len=128)


@pytest.fixture(scope="session")
def text_data(tmp_path_factory):
    """A small prepared corpus (vocab 512) made from the interpreter's own help topics."""
    import subprocess
    import sys

    from pydoc_data.topics import topics

    src = tmp_path_factory.mktemp("corpus")
    for i, name in enumerate(sorted(topics)):
        (src / f"doc{i:03d}.txt").write_text(topics[name])
    out = tmp_path_factory.mktemp("data") / "prepared"
    subprocess.run([sys.executable, "-m", "data.prepare", "--input", str(src), "--output", str(out),
                    "--vocab-size", "512", "--quiet"], check=True)
    return out


@pytest.fixture(scope="session")
def chat_tokenizer_file(tmp_path_factory):
    """A 448-piece tokenizer (its last three pieces the chat tokens) trained once for the chat, LoRA and
    SFT tests on the first 60 built-in documents; tests that use it set VOCAB = 448."""
    import itertools

    from data import builtin, tokenizer

    path = tmp_path_factory.mktemp("chat_tok") / "tokenizer.model"
    path.write_bytes(tokenizer.train(list(itertools.islice(builtin.documents(), 60)), 448))
    return path
