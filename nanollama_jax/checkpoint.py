"""Run folders and orbax checkpoints.

    runs/<tag>/config.json          model config, training settings, data and tokenizer fingerprints
    runs/<tag>/tokenizer.model      a copy, so export and generation need nothing else
    runs/<tag>/checkpoints/<step>/  orbax: params, optimizer state (training runs), meta
    runs/<tag>/metrics.jsonl        one JSON line per logged step

orbax writes each step to a temporary folder and renames it when complete, so a checkpoint
interrupted mid-write is never the one restored. Restoring takes the target shardings, so a
checkpoint saved on one mesh restores onto another.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from nanollama_base.files import atomic_path, sha256_file

from .config import LlamaConfig
from .model import Params, param_shapes
from .sharding import abstract


@dataclass(frozen=True)
class Run:
    dir: Path
    config: LlamaConfig
    info: dict  # the whole config.json
    step: int | None  # the checkpoint step chosen, None when the run has none yet

    @property
    def tokenizer_path(self) -> Path:
        return self.dir / "tokenizer.model"

    @property
    def checkpoint_dir(self) -> Path:
        return self.dir / "checkpoints"


def create_run(run_dir: str | Path, config: LlamaConfig, tokenizer: str | Path, **sections) -> Run:
    """Write a run's config.json (model + given sections) and copy its tokenizer."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if Path(tokenizer).resolve() != (run_dir / "tokenizer.model").resolve():
        with atomic_path(run_dir / "tokenizer.model") as tmp:
            shutil.copyfile(tokenizer, tmp)
    info = {"model": config.to_dict(), "tokenizer_sha256": sha256_file(run_dir / "tokenizer.model"), **sections}
    with atomic_path(run_dir / "config.json") as tmp:
        tmp.write_text(json.dumps(info, indent=2) + "\n")
    return Run(run_dir, config, info, None)


def open_run(path: str | Path, step: int | None = None) -> Run:
    """A run from its folder (latest checkpoint) or from one of its step folders."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run or checkpoint")
    if path.parent.name == "checkpoints" and path.name.isdigit():
        path, step = path.parent.parent, int(path.name)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{path}: not a run folder (no config.json)")
    try:
        info = json.loads(cfg_file.read_text())
        config = LlamaConfig.from_dict(info["model"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{cfg_file}: unreadable run config ({e})") from None
    steps = saved_steps(path)
    if step is None:
        step = steps[-1] if steps else None
    elif step not in steps:
        raise ValueError(f"{path}: no checkpoint at step {step} (saved: {', '.join(map(str, steps)) or 'none'})")
    return Run(path, config, info, step)


def saved_steps(run_dir: str | Path) -> list[int]:
    """Completed checkpoint steps (orbax's temporary folders are not counted)."""
    ckpt = Path(run_dir) / "checkpoints"
    if not ckpt.is_dir():
        return []
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit() and p.is_dir())


def resume_step(run_dir: str | Path, resume: bool, config: LlamaConfig, tokenizer: Path, tokenizer_sha256: str,
                data_fingerprint: str) -> int:
    """The step a training run starts from: 0 for a new run, its last checkpoint with `resume`.
    Refuses to overwrite a run, or to resume it with another model, tokenizer or data."""
    steps = saved_steps(run_dir)
    if not steps:
        return 0
    if not resume:
        raise ValueError(f"{run_dir} already has checkpoints (steps {steps[0]}…{steps[-1]}); "
                         "pass --resume to continue it or --model-tag for a new run")
    run = open_run(run_dir)
    if run.config != config:
        diff = [f"{k} {v} → {getattr(config, k)}" for k, v in run.config.to_dict().items() if getattr(config, k) != v]
        raise ValueError(f"{run_dir}: cannot resume with a different model ({', '.join(diff)})")
    if run.info.get("tokenizer_sha256") != tokenizer_sha256:
        raise ValueError(f"{run_dir}: cannot resume with a different tokenizer "
                         f"({tokenizer} differs from the run's tokenizer.model)")
    if run.info.get("data", {}).get("fingerprint") != data_fingerprint:
        raise ValueError(f"{run_dir}: cannot resume with different data (corpus, seed, sequence length, "
                         "global batch or personality mix differ from the run's)")
    return steps[-1]


def manager(run: Run, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    return ocp.CheckpointManager(run.checkpoint_dir.resolve(), options=options)


def save(mgr: ocp.CheckpointManager, step: int, params: Params, meta: dict, opt_state=None) -> None:
    items = {"params": ocp.args.StandardSave(params), "meta": ocp.args.JsonSave(meta)}
    if opt_state is not None:
        items["opt_state"] = ocp.args.StandardSave(opt_state)
    mgr.save(step, args=ocp.args.Composite(**items))


def restore(mgr: ocp.CheckpointManager, step: int, params_target, opt_target=None):
    """Restore (params, opt_state or None, meta) onto the shardings the abstract targets carry
    (`sharding.abstract`), whatever mesh the checkpoint was saved from."""
    items = {"params": ocp.args.StandardRestore(params_target), "meta": ocp.args.JsonRestore()}
    if opt_target is not None:
        items["opt_state"] = ocp.args.StandardRestore(opt_target)
    out = mgr.restore(step, args=ocp.args.Composite(**items))
    return out["params"], out.get("opt_state") if opt_target is not None else None, out["meta"]


def load_params(path: str | Path, step: int | None = None, shardings=None) -> tuple[Run, Params]:
    """A run's params at a step (default: the latest), on one device unless shardings are given."""
    run = open_run(path, step)
    if run.step is None:
        raise ValueError(f"{run.dir}: the run has no checkpoint yet")
    shapes = param_shapes(run.config)
    if shardings is None:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree_util.tree_map(lambda _: one, shapes)
    with manager(run, async_save=False) as mgr:
        params, _, _ = restore(mgr, run.step, abstract(shapes, shardings))
    return run, params


def write_params_run(run_dir: str | Path, config: LlamaConfig, params: Params, tokenizer: str | Path,
                     step: int = 0, **sections) -> Run:
    """A run holding only params (an import, an injected personality): usable by export,
    generation, gamma and as the start of continued training."""
    run = create_run(run_dir, config, tokenizer, **sections)
    params = jax.tree_util.tree_map(jax.numpy.asarray, params)
    with manager(run, async_save=False) as mgr:
        save(mgr, step, params, {"step": step, "params_only": True})
        mgr.wait_until_finished()
    return open_run(run.dir)
