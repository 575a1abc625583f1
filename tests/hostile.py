"""Hostile-input helpers: byte mutations, clean-rejection checks (API and CLI) and a tried/rejected counter."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import pytest

from qwen_edge.errors import QwenEdgeError

CLI_TIMEOUT_S = 60.0
"""A hostile input must be rejected well within this; hitting it counts as a hang."""

TRIED: Counter[str] = Counter()
REJECTED: Counter[str] = Counter()
COUNT_FILE = "hostile_counts.json"


# --- mutations -----------------------------------------------------------------------------------------------
def truncate(data: bytes, at: int) -> bytes:
    return data[: max(0, min(at, len(data) - 1))]


def flip_bits(data: bytes, positions: Sequence[int]) -> bytes:
    """Flip one bit per position (positions index bits, wrapped into the data)."""
    buf = bytearray(data)
    for pos in positions:
        pos %= len(buf) * 8
        buf[pos // 8] ^= 1 << (pos % 8)
    return bytes(buf)


def overwrite(data: bytes, offset: int, new: bytes) -> bytes:
    offset = max(0, min(offset, len(data) - len(new)))
    return data[:offset] + new + data[offset + len(new):]


def deep_json(depth: int) -> str:
    return "[" * depth + "]" * depth


# --- checks --------------------------------------------------------------------------------------------------
def expect_rejected(category: str, fn: Callable[[], Any], *, match: str | None = None) -> QwenEdgeError:
    """Run `fn` on a hostile input: it must raise QwenEdgeError with a non-empty one-line message."""
    TRIED[category] += 1
    with pytest.raises(QwenEdgeError) as info:
        fn()
    msg = str(info.value)
    assert msg and "\n" not in msg, f"{category}: message is not one line: {msg!r}"
    assert len(msg) < 2000, f"{category}: message is {len(msg)} characters"
    if match is not None:
        assert match.lower() in msg.lower(), f"{category}: {msg!r} does not mention {match!r}"
    REJECTED[category] += 1
    return info.value


def run_cli(*args: str, timeout: float = CLI_TIMEOUT_S, env: dict[str, str] | None = None,
            input: str | None = None) -> subprocess.CompletedProcess:
    full = dict(os.environ)
    full.pop("QWEN_EDGE_DEBUG", None)
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "qwen_edge.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=full, input=input)


def expect_cli_rejected(category: str, *args: str, timeout: float = CLI_TIMEOUT_S, match: str | None = None,
                        allow_internal: bool = False, env: dict[str, str] | None = None) -> str:
    """Run the real CLI on a hostile input: exit 2, one `error: ` line on stderr, no traceback, no signal, no hang.

    Returns the error line. `allow_internal=False` also refuses `error: internal error: ...` (an unexpected
    exception the CLI caught: bad input must be named, not fall through as a bug).
    """
    TRIED[category] += 1
    try:
        r = run_cli(*args, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{category}: hung (no answer in {timeout:g} s): qwen-edge {' '.join(args)}")
    assert r.returncode >= 0, f"{category}: crashed with signal {-r.returncode}: {r.stderr[-2000:]}"
    assert "Traceback" not in r.stderr, f"{category}: traceback on stderr:\n{r.stderr[-3000:]}"
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, f"{category}: exit {r.returncode}, stderr: {r.stderr[-2000:]!r}"
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1, f"{category}: expected one `error: ` line, stderr: {r.stderr[-2000:]!r}"
    if not allow_internal:
        assert not errors[0].startswith("error: internal error"), f"{category}: {errors[0]}"
    if match is not None:
        assert match.lower() in errors[0].lower(), f"{category}: {errors[0]!r} does not mention {match!r}"
    REJECTED[category] += 1
    return errors[0]


def record(category: str, ok: bool) -> bool:
    """Count a hostile input whose defined behaviour is not a rejection (e.g. an empty prompt that is served).

    `ok` must be the outcome the test then asserts (`assert hostile.record(cat, ok), detail`): the count never
    claims a clean outcome the test did not check. Returns `ok`.
    """
    TRIED[category] += 1
    if ok:
        REJECTED[category] += 1
    return ok


def require_module(name: str) -> None:
    """Import `name`: a qwen_edge module that cannot be imported is a failure (a rename, a broken import).

    Only a missing optional third-party extra (llama_cpp, onnxruntime, ...) that the module needs skips, and the
    reason names it.
    """
    import importlib

    try:
        importlib.import_module(name)
    except ImportError as e:
        missing = e.name or ""
        if missing and missing.split(".")[0] != "qwen_edge":
            pytest.skip(f"{name} needs the optional package {missing!r}, not installed here ({e})")
        pytest.fail(f"{name} cannot be imported: {type(e).__name__}: {e}", pytrace=False)


# --- pytest plugin (registered from tests/conftest.py) -------------------------------------------------------
def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: Any) -> None:
    tried, rejected = sum(TRIED.values()), sum(REJECTED.values())
    if not tried:
        return
    terminalreporter.write_sep("-", "hostile inputs")
    terminalreporter.write_line(f"hostile inputs: {tried} tried, {rejected} rejected cleanly")
    for cat in sorted(TRIED):
        terminalreporter.write_line(f"  {cat}: {TRIED[cat]} tried, {REJECTED[cat]} clean")
    doc = {"tried": tried, "rejected_cleanly": rejected,
           "by_category": {c: {"tried": TRIED[c], "rejected_cleanly": REJECTED[c]} for c in sorted(TRIED)}}
    out = Path(os.environ.get("QWEN_EDGE_HOSTILE_COUNTS", Path(str(config.rootpath)) / ".pytest_cache" / COUNT_FILE))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2) + "\n")
    except OSError:
        pass


def scratch() -> "tempfile.TemporaryDirectory[str]":
    """A throw-away directory, in memory (/dev/shm) when available: mutated copies are written many times."""
    shm = Path("/dev/shm")
    base = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
    return tempfile.TemporaryDirectory(prefix="qwen-edge-hostile-", dir=base)
