"""Soak test: a tiny training run SIGKILLed at random moments, resumed each time, must end exactly
where an uninterrupted run ends.

    python -m benchmarks.soak                  # 20 kills; writes benchmarks/results/soak.{json,md}
    python -m benchmarks.soak --kills 4 --steps 24 --workdir /tmp/soak

The run itself is tests/soak_runs.py (the suite runs a 4-kill version of it): kills during a
step, a save, a metrics write and an evaluation, half at moments the parent picks, half at exact
points inside the child (nanollama_jax/faults.py). Figures: kills survived, steps redone (bounded
by the steps since the last save began plus the interval an in-flight async save was writing),
unreadable checkpoints and loss mismatches against an uninterrupted run (both must be 0).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from nanollama_base.cli import ArgumentParser, run_cli

RESULTS = Path("benchmarks") / "results"  # under the working directory, never beside an installed file
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from soak_runs import soak  # noqa: E402  (the same run as the suite's short version)


def write_results(result: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = "".join(f"| {r['kill']} | {r['phase']} | {r['how']} | {r['outcome']} | {r['resumed_from']} | "
                   f"{r['reached']} | {r['checkpoint_after']} | {r['redone_next']} | {r['redone_bound']} |\n"
                   for r in result["kills"])
    (RESULTS / "soak.md").write_text(
        f"# Soak: a {result['steps']}-step pico run SIGKILLed {result['kills_planned']} times, resumed each time\n\n"
        f"- kills survived: **{result['kills_survived']}** of {result['kills_planned']} "
        f"(by phase: {', '.join(f'{k} {v}' for k, v in result['by_phase'].items())})\n"
        f"- loss mismatches against the uninterrupted run: **{result['loss_mismatches']}** "
        f"({result['steps_compared']} training and validation losses compared bit for bit)\n"
        f"- unreadable checkpoints: **{len(result['unreadable_checkpoints'])}** (every checkpoint restored and "
        "verified after every kill)\n"
        f"- steps redone: {result['steps_redone_total']} in all, at most {result['steps_redone_max']} after one kill; "
        f"kills that redid more than the bound: **{result['redone_over_bound']}** (bound: the steps since the last "
        f"save began, plus the {result['save_every']}-step interval that save was writing: an async save in flight "
        "when the kill lands is lost, the one before it never)\n\n"
        f"- wall time: {result.get('seconds', '?')} s on 2 shared CPU cores (every resume pays JAX start-up and "
        "compilation)\n\n"
        "how: `timer` = a random moment chosen by the parent, `watch` = the instant a checkpoint's temporary "
        "folder appears, `inject` = NANOLLAMA_KILL_AT inside the child (the metrics one tears its line).\n\n"
        "| kill | phase | how | outcome | resumed from | reached | newest checkpoint after | steps redone | bound |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n" + rows)


def main(argv=None):
    p = ArgumentParser(prog="python -m benchmarks.soak", description=__doc__)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--every", type=int, default=5, help="save and evaluate every N steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="/tmp/nanollama-soak", help="scratch folder (emptied first)")
    args = p.parse_args(argv)

    def body():
        import shutil

        from pydoc_data.topics import topics

        from data.prepare import prepare

        work = Path(args.workdir)
        shutil.rmtree(work, ignore_errors=True)
        (work / "corpus").mkdir(parents=True)
        for i, name in enumerate(sorted(topics)):
            (work / "corpus" / f"doc{i:03d}.txt").write_text(topics[name])
        data = prepare(work / "data", inputs=[str(work / "corpus")], vocab_size=512, workers=1, progress=False,
                       log=lambda _: None)
        start = time.time()
        result = soak(data, work, args.kills, args.steps, args.every, args.seed)
        result["seconds"] = round(time.time() - start, 1)
        write_results(result)
        print(json.dumps({k: v for k, v in result.items() if k != "kills"}, indent=2))

    run_cli(p.prog, body)


if __name__ == "__main__":
    main()
