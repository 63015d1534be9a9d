"""The mesh (jax.make_mesh, device subsets), indivisible dimensions as errors, the GPU XLA flags and
the persistent compilation cache."""
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from nanollama_jax import sharding as S
from nanollama_jax import xla_flags as X
from nanollama_jax.config import LlamaConfig


def test_mesh_from_make_mesh_with_device_subsets():
    mesh = S.make_mesh("2x1")
    assert mesh.axis_names == ("fsdp", "tensor") and dict(mesh.shape) == {"fsdp": 2, "tensor": 1}
    assert mesh.devices.size == 2
    chosen = jax.devices()[2:]
    mesh = S.make_mesh("1x2", devices=chosen)
    assert set(mesh.devices.flat) == set(chosen)
    assert S.make_mesh().devices.size == jax.device_count()  # default: every device on fsdp


def test_indivisible_dimension_is_an_error_naming_the_parameter():
    config = LlamaConfig(n_layer=1, n_embd=128, n_head=2, n_kv_head=2, vocab_size=256, ffn_dim=99)
    with pytest.raises(ValueError, match="^layers/ffn/down_proj/kernel: dimension mlp of size 99 does not divide "
                                         "over mesh axis tensor of size 2"):
        S.param_shardings(config, S.make_mesh("2x2"))
    S.param_shardings(config, S.make_mesh("4x1"))  # mlp is not split along fsdp: fine


def test_gpu_flags_added_and_user_flags_win():
    flags = X.with_default_flags("", "gpu").split()
    assert flags == list(X.GPU_FLAGS)
    mine = "--xla_gpu_enable_latency_hiding_scheduler=false --xla_dump_to=/tmp/d"
    flags = X.with_default_flags(mine, "gpu").split()
    assert flags[:2] == mine.split()  # the user's flags first, as given
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" not in flags
    assert len(flags) == 2 + len(X.GPU_FLAGS) - 1
    assert X.with_default_flags(mine, "cpu") == mine  # other platforms: untouched


def test_apply_xla_flags_sets_the_environment_and_can_be_turned_off():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    X.apply_xla_flags("gpu", environ=env)
    assert env["XLA_FLAGS"].split()[0] == "--xla_force_host_platform_device_count=2"
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in env["XLA_FLAGS"].split()
    env = {X.DEFAULTS_ENV: "0"}
    X.apply_xla_flags("gpu", environ=env)
    assert "XLA_FLAGS" not in env
    env = {}
    X.apply_xla_flags("cpu", environ=env)
    assert "XLA_FLAGS" not in env


def test_deterministic_adds_its_flags_on_gpu_even_without_the_defaults():
    env = {X.DEFAULTS_ENV: "0", "XLA_FLAGS": "--xla_gpu_deterministic_ops=false"}
    X.apply_xla_flags("gpu", environ=env, deterministic=True)
    assert env["XLA_FLAGS"].split() == ["--xla_gpu_deterministic_ops=false",  # the user's own value wins
                                        "--xla_gpu_exclude_nondeterministic_ops=true"]
    env = {}
    X.apply_xla_flags("gpu", environ=env, deterministic=True)
    assert set(X.GPU_FLAGS + X.DETERMINISTIC_GPU_FLAGS) == set(env["XLA_FLAGS"].split())
    env = {}
    X.apply_xla_flags("cpu", environ=env, deterministic=True)
    assert "XLA_FLAGS" not in env  # CPU is deterministic already


def test_every_gpu_flag_is_one_xla_knows():
    """XLA parses XLA_FLAGS against all of its options on any platform and aborts on a name it does
    not know, so a CPU process checks the GPU flags' names (a made-up one is the control)."""
    def run(flags):
        code = "import jax.numpy as jnp; print(float(jnp.ones(3).sum()))"
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                              env={"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(flags)})

    ours = run(X.GPU_FLAGS + X.DETERMINISTIC_GPU_FLAGS)
    assert ours.returncode == 0 and ours.stdout.strip() == "3.0", ours.stderr[-2000:]
    made_up = run(("--xla_gpu_enable_made_up_overlap=true",))
    assert made_up.returncode != 0 and "Unknown flag" in made_up.stderr


def test_platform_detection_follows_jax_platforms(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert X.detect_platform() == "gpu"
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert X.detect_platform() == "cpu"


def test_cache_dir_default_override_and_off():
    assert X.cache_dir({}) == Path.home() / ".cache/nanollama_jax/xla"
    assert X.cache_dir({X.CACHE_ENV: "/tmp/elsewhere"}) == Path("/tmp/elsewhere")
    assert X.cache_dir({X.CACHE_ENV: "off"}) is None


def test_compilation_cache_is_written_and_reused(tmp_path):
    """A real compile lands in the cache folder, and a second process finds it there."""
    script = f"""
import jax, jax.numpy as jnp
from nanollama_jax.xla_flags import enable_compilation_cache
enable_compilation_cache({str(tmp_path)!r})
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
print(float(jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((64, 64))).sum()))
"""
    first = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    entries = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert entries
    second = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert second.stdout == first.stdout
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == entries  # reused, not recompiled
