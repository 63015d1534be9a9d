"""The accelerator benchmark's shrunken CPU mode, so the script a lent GPU runs cannot rot."""
import json
import subprocess
import sys

import numpy as np


def test_accelerator_benchmark_cpu_mode(tmp_path, text_data):
    subprocess.run([sys.executable, "-m", "benchmarks.accelerator", "--cpu", "--data", str(text_data), "--out",
                    str(tmp_path)], check=True, capture_output=True)
    result = json.loads((tmp_path / "accelerator.json").read_text())
    (row,) = result["throughput"]
    assert row["size"] == "pico" and row["tok_s_per_device"] > 0 and 0 < row["mfu"] < 1
    assert row["predicted_peak_gib"] > 0  # CPUs report no measured peak; GPUs do
    p = result["precision"]
    assert len(p["curves"]["float32"]) == len(p["curves"]["bfloat16"]) == p["steps"]
    assert np.isfinite(p["curves"]["bfloat16"]).all() and p["max_abs_gap"] < 0.1  # tests/test_precision.py's bound
    k = result["resume"]
    assert k["saved_every"] < k["killed_after_step"] < k["steps"]  # killed mid-run, past a checkpoint
    assert k["bit_exact"] and k["max_abs_diff"] == 0
    md = (tmp_path / "accelerator.md").read_text()
    assert "| pico |" in md and "bit-identical" in md
