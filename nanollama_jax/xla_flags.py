"""XLA runtime set-up that must happen before JAX starts its backend: the GPU flags that let FSDP's
all-gathers and reduce-scatters overlap with compute, and the persistent compilation cache.

    apply_xla_flags()            # first thing in a command, before anything asks jax for devices
    apply_xla_flags(deterministic=True)   # also bit-exact GPU reductions (train --deterministic)
    enable_compilation_cache()   # any time before the first compile

Flags the user already put in XLA_FLAGS win (matched by name); NANOLLAMA_XLA_DEFAULTS=0 turns our
defaults off. The cache lives in ~/.cache/nanollama_jax/xla unless NANOLLAMA_COMPILATION_CACHE names
another folder, or "off".
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

# XLA's latency-hiding scheduler reorders collectives to run under compute; the combine thresholds
# let it gather a whole layer's FSDP shards in one collective; the pipelined all-gather fetches the
# next layer's weights of the scanned stack while this one computes.
GPU_FLAGS = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_highest_priority_async_stream=true",
    "--xla_gpu_enable_pipelined_all_gather=true",
    "--xla_gpu_all_gather_combine_threshold_bytes=134217728",
    "--xla_gpu_reduce_scatter_combine_threshold_bytes=134217728",
)
# Bit-exact reruns on GPU (a killed and resumed run equal to a straight one): XLA picks only
# deterministic kernels (no atomics in scatters and reductions; cuDNN's deterministic backward).
# Slower by a few percent; CPU is deterministic already.
DETERMINISTIC_GPU_FLAGS = (
    "--xla_gpu_deterministic_ops=true",
    "--xla_gpu_exclude_nondeterministic_ops=true",
)
DEFAULTS_ENV = "NANOLLAMA_XLA_DEFAULTS"
CACHE_ENV = "NANOLLAMA_COMPILATION_CACHE"
DEFAULT_CACHE = Path("~/.cache/nanollama_jax/xla")


def flag_name(flag: str) -> str:
    return flag.split("=", 1)[0]


def with_default_flags(existing: str, platform: str, deterministic: bool = False, defaults: bool = True) -> str:
    """XLA_FLAGS with our flags for `platform` added after the user's own: the overlap defaults
    (unless `defaults` is off) and, with `deterministic`, the bit-exact ones. A flag the user set
    (by name, whatever its value) is left as the user set it. Only GPUs get flags."""
    if platform != "gpu":
        return existing
    present = {flag_name(f) for f in existing.split()}
    wanted = (GPU_FLAGS if defaults else ()) + (DETERMINISTIC_GPU_FLAGS if deterministic else ())
    added = [f for f in wanted if flag_name(f) not in present]
    return " ".join(existing.split() + added)


def detect_platform() -> str:
    """'gpu' or 'cpu'/'tpu' as the backend will be, found without starting it: JAX_PLATFORMS when set,
    else whether a CUDA plugin for jax is installed."""
    wanted = os.environ.get("JAX_PLATFORMS", "").lower()
    if wanted:
        first = wanted.split(",")[0].strip()
        return "gpu" if first in ("cuda", "gpu", "rocm") else first
    cuda = ("jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13", "jax_cuda12_plugin", "jax_cuda13_plugin")
    return "gpu" if any(_installed(name) for name in cuda) else "cpu"


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the parent package is absent
        return False


def apply_xla_flags(platform: str | None = None, environ=os.environ, deterministic: bool = False) -> str:
    """Set XLA_FLAGS (in `environ`) with the platform's defaults and, with `deterministic`, the flags
    for bit-exact GPU reruns (NANOLLAMA_XLA_DEFAULTS=0 drops the defaults, not these); returns the
    flags now in force. Call before the backend starts: XLA reads the variable once."""
    existing = environ.get("XLA_FLAGS", "")
    flags = with_default_flags(existing, platform or detect_platform(), deterministic,
                               defaults=environ.get(DEFAULTS_ENV, "1") != "0")
    if flags != existing:
        environ["XLA_FLAGS"] = flags
    return flags


def cache_dir(environ=os.environ) -> Path | None:
    """Where compiled programs are kept across runs; None when NANOLLAMA_COMPILATION_CACHE is 'off'."""
    value = environ.get(CACHE_ENV, "").strip()
    if value.lower() in ("off", "0", "none"):
        return None
    return Path(value or DEFAULT_CACHE).expanduser()


def enable_compilation_cache(path: Path | None | str = "default", environ=os.environ) -> Path | None:
    """Turn on JAX's persistent compilation cache (a second run of the same step skips compiling).
    path: a folder, None to leave it off, or "default" for `cache_dir()`. Returns the folder used."""
    import jax

    folder = cache_dir(environ) if path == "default" else (Path(path).expanduser() if path else None)
    if folder is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    # cache every program that took a second to compile; tiny ones are faster to rebuild than to read
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return folder


def set_up_runtime(deterministic: bool = False, environ=os.environ) -> str:
    """A command's XLA set-up in one call, before the backend starts: the platform's flags
    (`apply_xla_flags`) and the compilation cache (on by default on accelerators; on CPU only when
    NANOLLAMA_COMPILATION_CACHE names a folder, compiles there being quick to redo). Returns a line
    saying what is in force, for the log."""
    platform = detect_platform()
    flags = apply_xla_flags(platform, environ, deterministic)
    wanted = platform != "cpu" or environ.get(CACHE_ENV, "").strip()
    folder = enable_compilation_cache("default", environ) if wanted else None
    exact = ("deterministic ops" if platform == "gpu" else "deterministic (as CPU always is)") if deterministic else ""
    return (f"XLA ({platform}): flags {flags or '(none)'}; compilation cache {folder or 'off'}"
            + (f"; {exact}" if exact else ""))
