"""A broken copy of a faithful artifact, for gates that must fail (verify --on-device in tests and .ci/arm64)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np


def break_onnx_weights(src: Path, dst: Path, noise: float = 0.3) -> Path:
    """Copy an ONNX artifact and multiply a quarter of its weight data, read as float32 words, by 1 + noise * N(0, 1)
    (fp32: perturbed weights; int8/int4: scrambled bytes), manifest hashes refreshed: what a miscompiled kernel or a
    corrupted copy on a device computes, not a tampered file."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    from qwen_edge.formats.onnx import DATA_FILE

    data = dst / DATA_FILE
    w = np.fromfile(data, dtype=np.float32)
    rng = np.random.default_rng(1)
    lo, hi = len(w) // 4, len(w) // 2
    with np.errstate(over="ignore", invalid="ignore"):  # int8/int4 bytes read as floats overflow: broken all the same
        w[lo:hi] *= (1 + noise * rng.standard_normal(hi - lo)).astype(np.float32)
    w.tofile(data)
    m = json.loads((dst / "manifest.json").read_text())
    for f in m["files"]:
        if f["path"] == data.name:
            f["sha256"], f["bytes"] = hashlib.sha256(data.read_bytes()).hexdigest(), data.stat().st_size
    (dst / "manifest.json").write_text(json.dumps(m, indent=2))
    return dst
