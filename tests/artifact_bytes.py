"""Helpers for tests that compare two exports of one model: a GGUF's tensors with their bytes, and the logits an
artifact gives for a fixed short prompt."""

from __future__ import annotations

from pathlib import Path

import numpy as np

PROMPT = [9707, 11, 1879, 0, 576, 3974]


def gguf_tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """name -> (type name, shape, the tensor's bytes in the file)."""
    from qwen_edge.formats.gguf import read_gguf

    g = read_gguf(path)
    raw = path.read_bytes()
    return {t.name: (t.type_name, tuple(t.shape), raw[g.data_offset + t.offset:g.data_offset + t.offset + t.nbytes])
            for t in g.tensors}


def prompt_logits(artifact: Path) -> np.ndarray:
    """The next-token logits after PROMPT, float64, through the artifact's own runtime."""
    from qwen_edge.backends import load

    with load(artifact, max_context=64) as rt:
        rt.prefill(PROMPT)
        return np.asarray(rt.logits(), dtype=np.float64)
