"""The installed distribution: which top-level names the wheel installs, its console commands, and
the guard that fails clearly when someone else's `data` / `export` / `configs` shadows ours."""
import configparser
import importlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {"nanollama-prepare", "nanollama-prepare-personality", "nanollama-train", "nanollama-generate",
            "nanollama-plot", "nanollama-gamma", "nanollama-export-gguf", "nanollama-read-gguf", "nanollama-export-hf",
            "nanollama-export-pt", "nanollama-export-lora", "nanollama-sft", "nanollama-chat", "nanollama-chatset"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel built from a copy of the checkout (the build leaves nothing in the worktree)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "go", "tests", "runs", "build",
                                                            "__pycache__", "*.egg-info", "*.gguf"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (whl,) = (tmp / "dist").glob("nanollama_jax-*.whl")
    return zipfile.ZipFile(whl)


def test_wheel_installs_only_the_pipeline_packages(wheel):
    top = {name.split("/")[0] for name in wheel.namelist() if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"nanollama_base", "nanollama_jax", "data", "export", "configs"}, top
    assert "configs/nano.json" in wheel.namelist() and "nanollama_jax/gamma/__main__.py" in wheel.namelist()


def test_the_installed_packages_work_from_anywhere(wheel, tmp_path):
    """Unpacked as pip installs it (a pure wheel) and imported from another folder: the guard passes,
    the named sizes load from the installed `configs`."""
    site = tmp_path / "site"
    wheel.extractall(site)
    code = ("import nanollama_jax.gamma, data.prepare, export.gguf, export.hf; "
            "from nanollama_jax.config import load_size; print(load_size('nano')[0].n_layer, data.__file__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["12", str(site / "data" / "__init__.py")]


def test_console_commands_run_their_main(wheel, capsys):
    (ep_file,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    eps = configparser.ConfigParser()
    eps.read_string(wheel.read(ep_file).decode())
    scripts = dict(eps["console_scripts"])
    assert set(scripts) == COMMANDS
    for name, target in scripts.items():
        module, func = target.split(":")
        with pytest.raises(SystemExit) as e:
            getattr(importlib.import_module(module), func)(["--help"])
        assert e.value.code == 0, name
        # the usage line and at least one example invocation
        assert capsys.readouterr().out.count(f"python -m {module}") >= 2, name


def test_a_shadowing_package_is_one_clear_error(tmp_path):
    fake = tmp_path / "elsewhere" / "data"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    env = {"PYTHONPATH": f"{fake.parent}:{REPO}", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "nanollama_jax.train", "--help"], capture_output=True, text=True,
                       cwd=tmp_path, env=env)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: nanollama-jax: the top-level name 'data' resolves to "
                           f"{fake / '__init__.py'}, not to {REPO / 'data'}"), r.stderr
    ok = subprocess.run([sys.executable, "-c", "import nanollama_jax"], capture_output=True, text=True,
                        cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO)})
    assert ok.returncode == 0, ok.stderr
