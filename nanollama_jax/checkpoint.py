"""Run folders and orbax checkpoints.

    runs/<tag>/config.json          model config, training settings, data and tokenizer fingerprints
    runs/<tag>/tokenizer.model      a copy, so export and generation need nothing else
    runs/<tag>/checkpoints/<step>/  orbax: params, optimizer state (training runs), meta
    runs/<tag>/metrics.jsonl        one JSON line per logged step

orbax writes each step to a temporary folder and renames it when complete, so a checkpoint
interrupted mid-write is never the one restored; which steps are complete is orbax's answer
(`ocp.step`), not a listing of folder names. Once a save has finished, the sha256 of every
file in its folder is recorded in `<step>/checksums.json`; restoring verifies them, so a file
damaged later is named in one line with the newest good step to fall back to. A disk that fills
during a save stops the run with one line; the previous checkpoint is untouched. Restoring takes
the target shardings, so a checkpoint saved on one mesh restores onto another.
"""
from __future__ import annotations

import errno
import json
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from nanollama_base.files import atomic_path, sha256_file, write_json_atomic

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
    """Completed checkpoint steps, as orbax sees them (its temporary folders are not counted)."""
    ckpt = Path(run_dir) / "checkpoints"
    return sorted(ocp.step.checkpoint_steps(ckpt)) if ckpt.is_dir() else []


CHECKSUMS = "checksums.json"


def step_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / str(step)


def seal(folder: Path) -> None:
    """Record the sha256 of every file of a finished checkpoint folder."""
    sums = {str(f.relative_to(folder)): sha256_file(f) for f in sorted(folder.rglob("*"))
            if f.is_file() and f.name != CHECKSUMS}
    write_json_atomic(folder / CHECKSUMS, sums)


class CheckpointDamaged(ValueError):
    """A checkpoint file is missing or differs from its recorded checksum (the message names it)."""


def verify(folder: Path) -> None:
    """Raise CheckpointDamaged naming the first file of a checkpoint folder that is missing or differs
    from its recorded checksum. A folder without checksums (the process died between the end of
    the save and sealing it) is left to orbax's own reading."""
    sums_file = folder / CHECKSUMS
    if not sums_file.is_file():
        return
    try:
        sums = json.loads(sums_file.read_text())
    except json.JSONDecodeError:
        raise CheckpointDamaged(f"{sums_file}: corrupted checksum list") from None
    for name, digest in sums.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointDamaged(f"{path}: missing from the checkpoint")
        if sha256_file(path) != digest:
            raise CheckpointDamaged(f"{path}: corrupted (its sha256 differs from the one recorded at save)")


def good_step_before(run_dir: str | Path, step: int) -> int | None:
    """The newest checkpoint before `step` that verifies, or None."""
    for earlier in reversed([s for s in saved_steps(run_dir) if s < step]):
        try:
            verify(step_dir(run_dir, earlier))
            return earlier
        except CheckpointDamaged:
            continue
    return None


def resume_step(run_dir: str | Path, resume: bool, config: LlamaConfig, tokenizer: Path, tokenizer_sha256: str,
                data_fingerprint: str, step: int | None = None) -> int:
    """The step a training run starts from: 0 for a new run, its last checkpoint (or `step`) with
    `resume`. Refuses to overwrite a run, or to resume it with another model, tokenizer or data."""
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
    if step is not None and step not in steps:
        raise ValueError(f"{run_dir}: no checkpoint at step {step} (saved: {', '.join(map(str, steps))})")
    return steps[-1] if step is None else step


class Manager(ocp.CheckpointManager):
    """orbax's CheckpointManager that seals each step it saved once the save has finished, and
    turns a full disk during a save into one line."""

    def __init__(self, directory: Path, options: ocp.CheckpointManagerOptions, saving: str = "the checkpoint",
                 run_dir: Path | None = None):
        super().__init__(directory, options=options)
        if not getattr(sys.unraisablehook, "quiets_closed_loop", False):
            sys.unraisablehook = quiet_closed_loop(sys.unraisablehook)
        self.unsealed: list[int] = []
        self.saving = saving  # what a save writes, for the full-disk line
        self.run_dir = Path(run_dir or Path(directory).parent)  # the run that --resume continues

    def save(self, step: int, *args, **kwargs) -> bool:
        self.wait_until_finished()  # orbax waits for the previous save anyway; seal it first
        try:
            saved = super().save(step, *args, **kwargs)
        except Exception as e:  # the disk may fill during the save's synchronous part too
            if not disk_full(e):
                raise
            self.unsealed.clear()
            raise self.disk_full_error(step) from None
        if saved:
            self.unsealed.append(step)
        return saved

    def wait_until_finished(self) -> None:
        try:
            super().wait_until_finished()
        except Exception as e:  # the async save's error surfaces here, wrapped by tensorstore
            if not disk_full(e):
                raise
            failed = self.unsealed.pop() if self.unsealed else "?"
            self.unsealed.clear()
            raise self.disk_full_error(failed) from None
        if jax.process_index() == 0:
            for step in self.unsealed:
                seal(Path(self.directory) / str(step))
        self.unsealed.clear()

    def disk_full_error(self, failed) -> OSError:
        # orbax leaves its failed writes' asyncio tasks unretrieved, and asyncio would log each one at
        # exit, after the one line that reports them
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        own = self.run_dir == Path(self.directory).parent
        good = [s for s in saved_steps(self.run_dir) if not (own and s == failed)]
        which = "the previous checkpoint" if own else "the run's last checkpoint"
        kept = f"{which} (step {good[-1]}) is intact" if good else "no earlier checkpoint"
        return OSError(errno.ENOSPC, f"no space left on device while saving {self.saving} of step {failed}; {kept}; "
                                     "free some space and continue with --resume", str(self.directory))


def quiet_closed_loop(hook):
    """`hook` (sys.unraisablehook), except for asyncio's "Event loop is closed" raised straight from
    a native thread's call_soon_threadsafe: tensorstore's threads report each write of a save that a
    full disk stopped to orbax's event loop, closed by then, and print the refusal as a traceback
    that tells the user nothing the one line does not. Anything else still shows."""
    def quiet(unraisable):
        tb = unraisable.exc_traceback
        if not (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"
                and tb is not None and tb.tb_frame.f_code.co_name == "call_soon_threadsafe"):
            hook(unraisable)
    quiet.quiets_closed_loop = True
    return quiet


def disk_full(e: BaseException) -> bool:
    while e is not None:
        if getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def manager(run: Run, keep: int = 3, async_save: bool = True, saving: str = "the checkpoint",
            resumed_from: Path | None = None) -> ocp.CheckpointManager:
    """The checkpoint manager of `run`; `saving` names what it writes and `resumed_from` the run
    that --resume continues (default `run` itself) in the line a full disk gives."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
                                           cleanup_tmp_directories=True)
    resumed_from = Path(resumed_from).resolve() if resumed_from else None
    return Manager(run.checkpoint_dir.resolve(), options, saving, resumed_from)


def save(mgr: ocp.CheckpointManager, step: int, params: Params, meta: dict, opt_state=None) -> None:
    items = {"params": ocp.args.StandardSave(params), "meta": ocp.args.JsonSave(meta)}
    if opt_state is not None:
        items["opt_state"] = ocp.args.StandardSave(opt_state)
    mgr.save(step, args=ocp.args.Composite(**items))


def restore(mgr: ocp.CheckpointManager, step: int, params_target, opt_target=None):
    """Restore (params, opt_state or None, meta) onto the shardings the abstract targets carry
    (`sharding.abstract`), whatever mesh the checkpoint was saved from. A damaged checkpoint is
    one ValueError naming the file and the newest good step before it."""
    folder = Path(mgr.directory) / str(step)
    items = {"params": ocp.args.StandardRestore(params_target), "meta": ocp.args.JsonRestore()}
    if opt_target is not None:
        items["opt_state"] = ocp.args.StandardRestore(opt_target)
    try:
        verify(folder)
        out = mgr.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:
        if isinstance(e, CheckpointDamaged):
            problem = str(e)
        else:  # orbax / tensorstore could not read it: their message, on one line
            problem = f"{folder}: unreadable checkpoint ({type(e).__name__}: {' '.join(str(e).split())[:300]})"
        good = good_step_before(folder.parent.parent, step)
        hint = (f"the previous good checkpoint is step {good}: resume from it with --resume-step {good}"
                if good is not None else "no earlier good checkpoint")
        raise ValueError(f"{problem}; {hint}") from None
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
