"""benchmarks/train_throughput.py --reference DIR: a folder that is not a nanollama checkout is
one clear line and exit 1, before any benchmarking."""
import subprocess
import sys

import pytest


@pytest.mark.parametrize("layout,problem", [
    ({}, "not a nanollama checkout (no nanollama/llama.py)"),
    ({"nanollama/__init__.py": "", "nanollama/llama.py": "import no_such_module_here\n"},
     "cannot import the reference model (ModuleNotFoundError"),
    ({"nanollama/__init__.py": "", "nanollama/llama.py": "class LlamaConfig:\n    pass\n"},
     "no Llama in the reference model module"),
])
def test_reference_dir_without_the_expected_modules_is_one_line(tmp_path, layout, problem):
    for name, text in layout.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    out = subprocess.run([sys.executable, "-m", "benchmarks.train_throughput", "--reference", str(tmp_path)],
                         capture_output=True, text=True)
    err = out.stderr.strip()
    assert out.returncode == 1 and "\n" not in err and problem in err and err.startswith("benchmarks.train_throughput:")
