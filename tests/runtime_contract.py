"""Behaviour every Runtime backend shares, asserted the same way for each (imported by the backend tests)."""

from __future__ import annotations

import numpy as np
import pytest

from qwen_edge.errors import QwenEdgeError


def assert_rewind_reuses_prefix(rt, a: list[int], b: list[int], c: list[int], atol: float) -> None:
    """Prefill a+b, rewind to a, prefill c: the logits equal a fresh prefill of a+c (the cached prefix is reused)."""
    rt.reset()
    rt.prefill(a + b)
    rt.rewind(len(a))
    assert rt.n_cached == len(a)
    with pytest.raises(QwenEdgeError, match="no logits"):
        rt.logits()
    rt.prefill(c)
    reused = rt.logits()
    rt.reset()
    rt.prefill(a + c)
    fresh = rt.logits()
    np.testing.assert_allclose(reused, fresh, atol=atol)
