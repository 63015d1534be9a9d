"""What every command shares: one way to parse flags, one way to fail, one way to show progress.

* A usage error (a flag argparse rejects) is one line `<command>: <problem> (see --help)`, exit 2.
* A user-facing failure (bad file, mismatch, missing optional dependency) is one line
  `<command>: <file>: <problem>`, e.g. `export.gguf: runs/x: no checkpoint found`, exit 1;
  never a traceback. Code raises ValueError (or OSError) whose message starts with the file.
* Progress: a tqdm bar when stderr is a terminal; in a log file, a plain line now and then.

`<command>` is what follows `python -m` (`export.gguf`, `nanollama_jax.gamma extract`).
"""
from __future__ import annotations

import argparse
import sys
import time

# Optional dependencies by top-level module: the pyproject extra that installs each.
OPTIONAL_EXTRAS = {"torch": "torch", "transformers": "test", "llama_cpp": "test"}


def command_name(prog: str) -> str:
    return prog.removeprefix("python -m ").strip()


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the house conventions: the description and epilog printed as written, and a
    usage error as one line and exit 2. Subcommand parsers inherit it."""

    def __init__(self, *args, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message):
        sys.stderr.write(f"{command_name(self.prog)}: {message} (see --help)\n")
        sys.exit(2)


def one_line(e: BaseException) -> str:
    """The message of an expected error as one line, naming the file first when the error knows it."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        text = f"{e.filename}: {e.strerror}"
    else:
        text = str(e) or type(e).__name__
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())


def missing_dependency(e: ModuleNotFoundError) -> str | None:
    """The one line for a missing optional dependency, or None when the module is not optional."""
    top = (e.name or "").split(".")[0]
    if top not in OPTIONAL_EXTRAS:
        return None
    return (f"{top} is not installed (an optional dependency): pip install 'nanollama-jax[{OPTIONAL_EXTRAS[top]}]' "
            f"(or bash scripts/setup.sh test)")


def run_cli(prog: str, fn, interrupted: str = "interrupted") -> None:
    """Run a command body; an expected failure prints one line `<command>: <message>` and exits 1
    (130 on Ctrl-C) instead of a traceback. Anything else is a bug and keeps its traceback."""
    command = command_name(prog)
    try:
        fn()
    except (ValueError, OSError) as e:
        _fail(command, one_line(e), 1)
    except ModuleNotFoundError as e:
        line = missing_dependency(e)
        if line is None:
            raise
        _fail(command, line, 1)
    except KeyboardInterrupt:
        _fail(command, interrupted, 130)


def _fail(command: str, message: str, code: int):
    sys.stderr.write(f"{command}: {message}\n")
    sys.exit(code)


class Progress:
    """A tqdm bar with ETA when stderr is a terminal; otherwise (a log file, CI) a plain line to
    stderr (or to `log`) every `every` seconds, so a redirected log gets lines, not every redraw of
    a bar. The same calls as a tqdm bar: update, set_postfix, write, close."""

    def __init__(self, total: int | None = None, *, desc: str, unit: str = "it", initial: int = 0,
                 enabled: bool = True, every: float = 30.0, log=None):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.enabled, self.done, self.start = enabled, initial, initial
        self.postfix = ""
        self.t0 = time.monotonic()
        self.next_line = self.t0 + every
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit == "B",
                            dynamic_ncols=True, file=sys.stderr)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and time.monotonic() >= self.next_line:
            self.next_line = time.monotonic() + self.every
            self.log(self.line())

    def line(self) -> str:
        """`desc: 120/600 step (20%), loss=3.2, about 1.5 min left`."""
        scale, unit = (1e6, "MB") if self.unit == "B" else (1, self.unit)
        text = f"{self.desc}: {self.done / scale:,.{1 if scale > 1 else 0}f}"
        if self.total:
            frac = min(1.0, self.done / self.total)
            text += f"/{self.total / scale:,.{1 if scale > 1 else 0}f} {unit} ({frac:.0%})"
        else:
            text += f" {unit}"
        if self.postfix:
            text += f", {self.postfix}"
        work, elapsed = self.done - self.start, time.monotonic() - self.t0
        if self.total and work > 0:
            text += f", about {(self.total - self.done) * elapsed / work / 60:.1f} min left"
        return text

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())
        if self.bar is not None:
            self.bar.set_postfix(values)

    def write(self, message: str) -> None:
        """A line of output that does not tear the bar."""
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
