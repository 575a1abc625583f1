"""Exception types that map onto the CLI's exit codes (2: bad input, 1: a gate failed)."""

from __future__ import annotations


class QwenEdgeError(Exception):
    """Bad input or usage: the CLI prints `error: <message>` and exits 2."""

    exit_code = 2


class GateFailed(Exception):
    """A quality or speed gate failed (verify thresholds, bench budget): exit 1."""

    exit_code = 1


class NativeCrash(Exception):
    """A native library (llama.cpp, onnxruntime) killed a worker process with a signal: the run failed (exit 1), the
    input was not bad. The message names the artifact and the signal."""

    exit_code = 1


class NotAvailable(QwenEdgeError):
    """A capability that needs an optional dependency or hardware that is not present."""


CRASH_NOTE_ENV = "QWEN_EDGE_CRASH_NOTE"


def crash_note(text: str) -> None:
    """Say what this process is about to run in native code (e.g. "llama.cpp running <file>"): the `qwen-edge`
    command's supervisor names it if the process dies of a signal there. A no-op outside the supervised CLI. Here
    rather than in .log so that a backend can say it without importing logging (load time, issue 24)."""
    import os

    path = os.environ.get(CRASH_NOTE_ENV)
    if not path:
        return
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text[:1000])
    except OSError:
        pass


def first_line(e: BaseException, limit: int = 300) -> str:
    """An exception as one short line: its first non-empty line, capped, or its type name."""
    lines = str(e).strip().splitlines()
    msg = lines[0] if lines else type(e).__name__
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def signal_name(signum: int) -> str:
    """`SIGSEGV` for 11: how a native crash is named (the console command, the bench's and the probe's children)."""
    import signal

    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
