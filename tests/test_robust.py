"""Training and data preparation lose nothing: torn metrics, damaged checkpoints, a full disk,
preemption of one of several processes, prompt stops, killed data preparation."""
import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from data.prepare import prepare
from nanollama_base.shards import DataError, load_meta
from nanollama_jax import checkpoint, train
from nanollama_jax.metrics import MetricsLog, read_metrics
from soak_runs import soak

PICO = ["--size", "pico", "--log-every", "100", "--sample-every", "0", "--eval-batches", "1", "--mesh", "1x1",
        "--steps", "8", "--save-every", "2", "--eval-every", "2"]


def train_cmd(data, runs, tag, *extra):
    return [sys.executable, "-m", "nanollama_jax.train", *PICO, "--data", str(data), "--runs-dir", str(runs),
            "--model-tag", tag, *extra]


def run_train(tmp_path, data, tag, *extra):
    train.main([*PICO, "--data", str(data), "--runs-dir", str(tmp_path), "--model-tag", tag, *extra])
    return tmp_path / tag


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "loss" in r}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, text_data):
    """8 steps in one go: what every interrupted run must reproduce bit for bit."""
    return run_train(tmp_path_factory.mktemp("runs"), text_data, "reference")


# --- 2. metrics and plots ----------------------------------------------------------------------

def test_metrics_reader_drops_only_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 2.25}\n{"step": 3, "lo')
    warnings = []
    assert read_metrics(path, warnings.append) == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.25}]
    assert warnings == [f"{path}:3: dropped a torn last line (the run was interrupted while writing it)"]
    log = MetricsLog(path, resume_step=1)  # a resume rewrites the file: no torn line, nothing past step 1
    log.write(step=2, loss=1.0)
    assert path.read_text() == '{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 1.0}\n'
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')  # damage in the middle is not a torn write
    with pytest.raises(ValueError, match=f"{path}:2: not a JSON line"):
        read_metrics(path)


def test_resume_after_a_torn_metrics_line_is_exact_and_plots_are_fresh(tmp_path, text_data, reference, capsys):
    run = run_train(tmp_path, text_data, "torn", "--stop-after", "4")
    assert (run / "curves.png").stat().st_size > 1000  # drawn at the evaluations and on exit, not only at the end
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 3.1')  # a kill in the middle of an append
    run_train(tmp_path, text_data, "torn", "--resume")
    assert "dropped a torn last line" in capsys.readouterr().err
    assert losses(run) == losses(reference)


# --- 3. checkpoints: orbax's steps, verified on restore ------------------------------------------

def test_a_damaged_checkpoint_is_named_and_the_previous_good_step_offered(tmp_path, text_data, reference, capsys):
    run = run_train(tmp_path, text_data, "damaged", "--stop-after", "4")
    assert checkpoint.saved_steps(run) == [2, 4]
    with checkpoint.manager(checkpoint.open_run(run)) as mgr:  # the same answer as orbax's own manager
        assert list(mgr.all_steps()) == [2, 4] and mgr.latest_step() == 4
    (run / "checkpoints" / "6.orbax-checkpoint-tmp-99").mkdir()  # a save that never finished
    assert checkpoint.saved_steps(run) == [2, 4]
    data_file = max((run / "checkpoints" / "4" / "params").rglob("d/*"), key=lambda p: p.stat().st_size)
    blob = bytearray(data_file.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # one flipped byte in the middle of the weights
    data_file.write_bytes(bytes(blob))

    with pytest.raises(SystemExit) as e:
        run_train(tmp_path, text_data, "damaged", "--resume")
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1
    assert err[-1] == (f"nanollama_jax.train: {data_file}: corrupted (its sha256 differs from the one recorded at "
                       "save); the previous good checkpoint is step 2: resume from it with --resume-step 2")
    with pytest.raises(ValueError, match="corrupted"):  # export and generation read through the same check
        checkpoint.load_params(run)
    run_train(tmp_path, text_data, "damaged", "--resume", "--resume-step", "2")
    assert losses(run) == losses(reference)


# --- 4. a full disk during a save --------------------------------------------------------------

def test_disk_full_during_a_save_stops_with_one_line_and_keeps_the_previous_checkpoint(tmp_path, text_data,
                                                                                       reference):
    # A filesystem sized from the uninterrupted run: a checkpoint and the best-validation weights
    # (runs/<tag>/best, up to two copies while one replaces the other) fit; before the run ends a save
    # meets the full disk. A private mount namespace (unshare) gives the run a real ENOSPC
    # without touching the machine's mounts.
    if shutil.which("unshare") is None:
        pytest.fail("this test needs `unshare` (util-linux) to mount a small tmpfs: apt-get install util-linux")
    step_dir = reference / "checkpoints" / str(checkpoint.saved_steps(reference)[-1])  # every step is the same size
    step_bytes = sum(f.stat().st_size for f in step_dir.rglob("*") if f.is_file())
    best_bytes = sum(f.stat().st_size for f in (reference / "best").rglob("*") if f.is_file())
    size_kib = (step_bytes + 2 * best_bytes + step_bytes // 2 + (1 << 20)) // 1024  # + 1 MiB for the run's small files
    small, kept = tmp_path / "small", tmp_path / "kept"
    small.mkdir()
    cmd = " ".join(train_cmd(text_data, small, "full"))
    script = (f"mount -t tmpfs -o size={size_kib}k tmpfs {small} || exit 99; {cmd}; echo exit=$? >&2; "
              f"cp -r {small}/full {kept}")
    out = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert "exit=99" not in out.stderr, f"cannot mount a tmpfs in a user namespace here: {out.stderr[-500:]}"
    lines = out.stderr.strip().splitlines()
    assert lines[-1] == "exit=1", out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-4000:]  # tensorstore's closed-loop reports are quieted
    # the save that meets the full disk is the run's checkpoint or the best-validation weights
    told = re.search(r"no space left on device while saving (?:the checkpoint|the best-validation weights \(best/\)) "
                     r"of step (\d+); the (?:previous|run's last) checkpoint \(step (\d+)\) is intact", lines[-2])
    assert lines[-2].startswith("nanollama_jax.train: ") and told, out.stderr[-4000:]
    failed, intact = int(told.group(1)), int(told.group(2))
    assert failed > intact >= 2 and checkpoint.saved_steps(kept)[-1] == intact
    # proven by restoring it: the copy resumes from the intact step and ends where the uninterrupted run did
    run_train(tmp_path, text_data, "kept", "--resume")
    assert losses(kept) == losses(reference)


def test_only_closed_loop_reports_from_native_threads_are_quieted():
    """What a full disk leaves behind: tensorstore's threads calling orbax's closed event loop, with no
    Python caller. The same error raised from Python code, and any other error, still reach the hook."""
    loop = asyncio.new_event_loop()
    loop.close()
    try:
        loop.call_soon_threadsafe(print)
    except RuntimeError as e:
        closed = e
    seen = []
    quiet = checkpoint.quiet_closed_loop(seen.append)
    native = SimpleNamespace(exc_type=RuntimeError, exc_value=closed, exc_traceback=closed.__traceback__.tb_next)
    from_python = SimpleNamespace(exc_type=RuntimeError, exc_value=closed, exc_traceback=closed.__traceback__)
    other = SimpleNamespace(exc_type=RuntimeError, exc_value=RuntimeError("boom"), exc_traceback=None)
    for report in (native, from_python, other):
        quiet(report)
    assert seen == [from_python, other]


# --- 5. preemption of one of several processes -----------------------------------------------------

def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_saved_step(tmp_path, text_data):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen(
        [*train_cmd(text_data, tmp_path, "two", "--mesh", "4x1", "--batch-size", "2", "--steps", "500",
                    "--save-every", "100"),
         "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        deadline = time.time() + 300
        metrics = tmp_path / "two" / "metrics.jsonl"
        while time.time() < deadline and all(p.poll() is None for p in procs):
            if metrics.exists() and max(losses(tmp_path / "two"), default=0) >= 3:
                break
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGTERM)  # the preempted host is not the one that logs
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    step = checkpoint.saved_steps(tmp_path / "two")[-1]
    assert 3 <= step < 100
    assert f"a signal to process 1: saved a checkpoint at step {step}; continue with --resume" in outs[0]
    assert "SIGTERM: saving a checkpoint at the end of the current step" in outs[1]
    assert max(losses(tmp_path / "two")) == step


# --- 6. stopping is prompt ------------------------------------------------------------------------

def test_a_signal_is_answered_at_once_and_a_second_one_exits_leaving_the_last_good_checkpoint(tmp_path, text_data):
    # 256 accumulation micro-steps make one optimizer step last several seconds even on a quiet CPU
    proc = subprocess.Popen(train_cmd(text_data, tmp_path, "slow", "--steps", "50", "--save-every", "1",
                                      "--tokens-per-step", str(256 * 8 * 128), "--batch-size", "8",
                                      "--seq-len", "128", "--eval-every", "1000"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: [lines.append((time.monotonic(), x)) for x in proc.stdout], daemon=True)
    reader.start()
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and len(checkpoint.saved_steps(tmp_path / "slow")) < 2:
            time.sleep(0.1)
        rows = read_metrics(tmp_path / "slow" / "metrics.jsonl")
        step_time = 256 * 8 * 128 / [r for r in rows if "tokens_per_sec" in r][-1]["tokens_per_sec"]
        assert step_time > 3, f"a step took {step_time:.1f}s: too short to tell a prompt answer from a late one"
        time.sleep(0.5)  # inside step 3
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        while time.monotonic() < sent + 1.5 and not any("saving a checkpoint" in x for _, x in lines):
            time.sleep(0.05)
        answer = next((t, x) for t, x in lines if "saving a checkpoint" in x)
        assert answer[0] - sent < 1.5 and "in about" in answer[1], answer
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=3)  # well before the step (seconds) could end
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=5)
    last = lines[-1][1]
    assert proc.returncode == 128 + signal.SIGTERM
    good = checkpoint.saved_steps(tmp_path / "slow")[-1]
    assert good == 2 and f"SIGTERM again: exiting now without saving; the last good checkpoint is step {good}" in last
    _, params = checkpoint.load_params(tmp_path / "slow")
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(params))


# --- 7. a killed data.prepare -----------------------------------------------------------------------

def test_a_killed_prepare_leaves_nothing_that_reads_as_complete_and_the_next_run_cleans_up(tmp_path):
    from pydoc_data.topics import topics

    src = tmp_path / "corpus"
    src.mkdir()
    text = "\n\n\n".join(topics.values())
    for i in range(60):  # ~40 MB: tokenising takes seconds, time enough to kill it in the middle
        (src / f"part{i:02d}.txt").write_text(text)
    out = tmp_path / "prepared"
    cmd = [sys.executable, "-m", "data.prepare", "--input", str(src), "--output", str(out), "--vocab-size", "512",
           "--quiet", "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not list(tmp_path.glob(".prepared.partial-*/train")):
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    staging = [p for p in tmp_path.glob(".prepared.partial-*") if p.is_dir()]
    assert len(staging) == 1 and not out.exists()  # killed mid-way: nothing published
    with pytest.raises(DataError, match="prepared: data folder not found"):
        load_meta(out)
    # A restarted container hands out the same PIDs: give the dead run's folder a live PID (ours).
    # Its released lock, not its PID, must tell that nobody is building it any more.
    alive = staging[0].with_name(f".prepared.partial-{os.getpid()}-dead")
    staging[0].rename(alive)
    lock = staging[0].with_name(staging[0].name + ".lock")
    if lock.exists():  # (the lock file goes with its folder)
        lock.rename(alive.with_name(alive.name + ".lock"))
    prepare(out, inputs=[str(src)], vocab_size=512, workers=1, progress=False, log=lambda _: None)
    assert not alive.exists() and not list(tmp_path.glob(".prepared.partial-*"))
    meta = load_meta(out)
    again = prepare(tmp_path / "fresh", inputs=[str(src)], vocab_size=512, workers=1, progress=False,
                    log=lambda _: None)
    for split in ("train", "val"):  # the same bytes as a preparation never interrupted
        for shard in meta["raw"][split]["shards"]:
            assert (out / shard["file"]).read_bytes() == (again / shard["file"]).read_bytes()


# --- 1. the soak test, short: one kill in each phase ---------------------------------------------

def test_soak_four_kills_in_step_save_metrics_and_eval_lose_nothing(tmp_path, text_data):
    """With seed 1 the plan is eval, step, metrics, save, and all four kills are injected ones
    (NANOLLAMA_KILL_AT at an exact point): the step and save kills fall on odd turns, which always
    inject, so this short run has none of the parent's timer or watch kills; benchmarks/soak.py's
    longer run covers those."""
    result = soak(text_data, tmp_path, kills=4, steps=24, every=4, seed=1, log=lambda _: None)
    assert result["by_phase"] == {"step": 1, "save": 1, "metrics": 1, "eval": 1}, result["kills"]
    assert result["loss_mismatches"] == 0 and result["steps_compared"] == 24 + 6
    assert result["unreadable_checkpoints"] == []
    assert result["redone_over_bound"] == 0, result["kills"]
