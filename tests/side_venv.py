"""Virtualenvs of their own for the clients whose pins cannot sit beside the project's (optimum-onnx wants
transformers < 4.58; instructor wants jiter < 0.15, the test extra's openai >= 0.16): built once per set of pins
under a cache directory and reused.

The cache directory of `name` is $QWEN_EDGE_<NAME>_CACHE, else /var/cache/qwen-edge-<name>, else
~/.cache/qwen-edge-<name> (the first writable one). Where the virtualenv cannot be built (no package index), the
calling test skips and says why, with pip's last line (the resolver's message when the pins conflict)."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def cache_root(name: str) -> Path:
    env = os.environ.get(f"QWEN_EDGE_{name.upper()}_CACHE")
    roots = [Path(env)] if env else [Path(f"/var/cache/qwen-edge-{name}"), Path.home() / f".cache/qwen-edge-{name}"]
    for root in roots:
        try:
            root.mkdir(parents=True, exist_ok=True)
            if os.access(root, os.W_OK):
                return root
        except OSError:
            continue
    pytest.skip(f"no writable cache directory for the {name} virtualenv (tried {env or '/var/cache, ~/.cache'})")


def side_venv(name: str, pins: tuple[str, ...]) -> Path:
    """The python of the cached virtualenv `name` with `pins` installed (built under a lock, marked complete last;
    the virtualenvs of other pins under the same name are removed)."""
    key = hashlib.sha256("\n".join(pins + (sys.version.split()[0],)).encode()).hexdigest()[:12]
    root = cache_root(name)
    venv = root / f"venv-{key}"
    python = venv / "bin" / "python"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (venv / "complete").is_file():
            return python
        for old in root.glob("venv-*"):
            shutil.rmtree(old, ignore_errors=True)
        base = getattr(sys, "_base_executable", sys.executable)
        steps = ([base, "-m", "venv", str(venv)],
                 [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *pins])
        for cmd in steps:
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode:
                shutil.rmtree(venv, ignore_errors=True)
                tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
                pytest.skip(f"{name} virtualenv cannot be built ({' '.join(cmd[2:4])}: {tail})")
        (venv / "complete").write_text("\n".join(pins) + "\n")
    return python
