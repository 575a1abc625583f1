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
    from qwen_edge.model.train import DEFAULT_STEPS, fidelity_key, train_fidelity_checkpoint

    key = fidelity_key(arch, seed, DEFAULT_STEPS)
    path = cache_root() / "fidelity" / f"{arch}-s{seed}-{key}"
    if not (path / "model.safetensors").is_file():
        train_fidelity_checkpoint(path, arch=arch, seed=seed, steps=DEFAULT_STEPS)
    return path


def degraded_checkpoint(out: Path, layer: int = 1, factor: float = 1.6, src: Path | None = None) -> Path:
    """A copy of the fidelity checkpoint with one layer's MLP weights (gate, up, down) multiplied by `factor`: a
    plausible wrong model (a bad merge, a mis-scaled conversion) for gates that must fail."""
    import shutil

    import numpy as np

    from qwen_edge.model.safetensors_io import SafetensorsFile, bf16_to_f32, f32_to_bf16, write_safetensors

    src = src or fidelity_checkpoint()
    if (out / "model.safetensors").is_file():
        return out
    shutil.copytree(src, out)
    st = SafetensorsFile(src / "model.safetensors")
    try:
        tensors = [(n, i.dtype, i.shape, np.array(st.raw(n))) for n, i in sorted(st.tensors.items())]
        meta = dict(st.metadata)
    finally:
        st.close()
    mlp = tuple(f"model.layers.{layer}.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj"))
    assert sum(n in mlp for n, *_ in tensors) == 3, "no such layer"
    assert all(d == "BF16" for n, d, *_ in tensors if n in mlp)  # as train.py stores them
    scaled = [(n, d, s, f32_to_bf16(bf16_to_f32(x) * np.float32(factor)) if n in mlp else x)
              for n, d, s, x in tensors]
    write_safetensors(out / "model.safetensors", scaled, metadata=meta)
    return out
