"""The fidelity checkpoint for tests: trained once, cached on disk under a key of the code that shapes it."""

from __future__ import annotations

import os
from pathlib import Path

FIDELITY_ARCH = "tiny-qwen3-256"


def cache_root() -> Path:
    root = os.environ.get("QWEN_EDGE_TEST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "qwen_edge", "test")
    return Path(root)


def fidelity_checkpoint(arch: str = FIDELITY_ARCH, seed: int = 0) -> Path:
    """Path of the trained checkpoint; trains it (a few minutes on a busy 2-core machine) when the cache lacks this key."""
    from qwen_edge.train import DEFAULT_STEPS, fidelity_key, train_fidelity_checkpoint

    key = fidelity_key(arch, seed, DEFAULT_STEPS)
    path = cache_root() / "fidelity" / f"{arch}-s{seed}-{key}"
    if not (path / "model.safetensors").is_file():
        train_fidelity_checkpoint(path, arch=arch, seed=seed, steps=DEFAULT_STEPS)
    return path
