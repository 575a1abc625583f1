"""The `qwen-edge` command: the CLI runs in a child process, so a native crash becomes one line and exit 1.

llama.cpp, onnxruntime and torch run native kernels inside the process. If one of them dies of a signal (a
segmentation fault in a kernel path this CPU takes), Python cannot catch it: the shell would print "Segmentation
fault" and exit 139, with no word on what crashed. The console command therefore starts the real CLI
(`python -m qwen_edge.cli`) as a child with the same terminal, standard streams and environment, waits for it, and:

- passes its exit code through;
- where it died of a fatal signal (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT), prints one line naming the signal and
  what the child said it was running (the backends write it before they enter native code), and exits 1: the run
  failed, the input was not bad;
- forwards SIGINT, SIGTERM, SIGHUP and SIGQUIT sent to the command by another process (a terminal's Ctrl-C already
  reaches the child, which shares the terminal's process group, so that one is not sent twice).

`QWEN_EDGE_SUPERVISE=0` runs the CLI in this process instead (and so does `python -m qwen_edge.cli`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from typing import Sequence

from .errors import signal_name

FATAL = frozenset(getattr(signal, n) for n in ("SIGSEGV", "SIGBUS", "SIGILL", "SIGFPE", "SIGABRT", "SIGSYS")
                  if hasattr(signal, n))
FORWARDED = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT") if hasattr(signal, n))
_SI_KERNEL = 0x80
"""si_code of a signal the kernel sent itself, e.g. a terminal's ^C (Linux); kill() from a process gives SI_USER."""


def crash_message(signum: int, note: str) -> str:
    """The one line for a child that died of fatal signal `signum` while doing `note` (may be empty)."""
    what = f" while {note.strip()}" if note.strip() else ""
    hint = "re-run with -v to see the engine's log and report it"
    if "llama.cpp" in note:
        hint = ("llama.cpp's CPU kernels: QWEN_EDGE_LLAMA_EXTRA_BUFFERS=none runs its plain kernels "
                "(or llama_extra_buffers: none in a target profile); re-run with -v and report it")
    return f"error: qwen-edge crashed with {signal_name(signum)} in native code{what} ({hint})"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    from .errors import CRASH_NOTE_ENV

    if (os.name != "posix" or not hasattr(signal, "sigtimedwait") or os.environ.get("QWEN_EDGE_SUPERVISE") == "0"
            or os.environ.get(CRASH_NOTE_ENV)):
        from .cli import main as cli_main

        return cli_main(args)
    fd, note_path = tempfile.mkstemp(prefix="qwen-edge-note-", suffix=".txt")
    os.close(fd)
    try:
        return _supervise(args, note_path, CRASH_NOTE_ENV)
    finally:
        try:
            os.unlink(note_path)
        except OSError:
            pass


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the supervisor dies, even of SIGKILL, so no CLI is orphaned."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def _supervise(args: list[str], note_path: str, note_env: str, command: list[str] | None = None) -> int:
    """Run the CLI with `args` in a child (`command` replaces its command line: tests) and report how it ended."""
    early: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: early.append(signum)) for s in FORWARDED}
    try:
        child = subprocess.Popen(command or [sys.executable, "-m", "qwen_edge.cli", *args],
                                 env={**os.environ, note_env: note_path}, preexec_fn=_die_with_parent)
    except OSError as e:
        for s, h in previous.items():
            signal.signal(s, h)
        print(f"error: cannot start the qwen-edge CLI ({e})", file=sys.stderr)
        return 2
    waited = set(FORWARDED) | {signal.SIGCHLD}
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, waited)
    try:
        for s in early:  # arrived while the child was starting: pass on
            child.send_signal(s)
        while True:
            rc = child.poll()
            if rc is not None:
                break
            info = signal.sigtimedwait(waited, 0.5)
            if info is not None and info.si_signo in FORWARDED and info.si_code != _SI_KERNEL:
                try:
                    child.send_signal(info.si_signo)
                except ProcessLookupError:
                    pass
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        for s, h in previous.items():
            signal.signal(s, h)
    if rc >= 0:
        return rc
    signum = -rc
    if signum in FATAL:
        try:
            with open(note_path, encoding="utf-8", errors="replace") as f:
                note = f.read(1000)
        except OSError:
            note = ""
        sys.stderr.flush()
        print(crash_message(signum, note), file=sys.stderr)
        return 1
    if signum == signal.SIGKILL:
        print("error: qwen-edge was killed with SIGKILL (the kernel's out-of-memory killer sends it when memory runs "
              "out; a smaller --max-context or model needs less)", file=sys.stderr)
        return 1
    return 128 + signum  # stopped by SIGINT, SIGTERM, ...: the shell's convention


if __name__ == "__main__":
    sys.exit(main())
