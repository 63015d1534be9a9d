"""benchmarks/train_throughput.py --reference DIR: a folder that is not a nanollama checkout is
one clear line and exit 1, before any benchmarking."""
import pytest

from benchmarks import train_throughput


@pytest.mark.parametrize("layout,problem", [
    ({}, "not a nanollama checkout (no nanollama/model.py)"),
    ({"nanollama/__init__.py": "", "nanollama/model.py": "import no_such_module_here\n"},
     "cannot import the reference model (ModuleNotFoundError"),
    ({"nanollama/__init__.py": "", "nanollama/model.py": "class LlamaConfig:\n    pass\n"},
     "no Llama in the reference model module"),
])
def test_reference_dir_without_the_expected_modules_is_one_line(tmp_path, capsys, layout, problem):
    for name, text in layout.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    with pytest.raises(SystemExit) as e:
        train_throughput.main(["--reference", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and "\n" not in err and problem in err and err.startswith("benchmarks.train_throughput:")
