"""Behaviour every Runtime backend shares, asserted the same way for each (imported by the backend tests)."""

from __future__ import annotations

import json
import re
from pathlib import Path

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


def artifact_facts(path) -> tuple[int, list[int]]:
    """(context length, stop ids) as an artifact directory's manifest.json records them."""
    m = json.loads((Path(path) / "manifest.json").read_text(encoding="utf-8"))
    return m["context_length"], m["tokenizer"]["stop_ids"]


def assert_info_describes_artifact(rt, context_length: int, stop_ids: list[int]) -> None:
    """RuntimeInfo carries the artifact's own context length (typed, apart from the KV cache size) and stop ids."""
    i = rt.info
    assert type(i.artifact_context_length) is int and i.artifact_context_length == context_length
    assert isinstance(i.stop_ids, list) and all(type(t) is int for t in i.stop_ids)
    assert i.stop_ids == list(stop_ids)
    assert type(i.context_length) is int and 0 < i.context_length <= i.artifact_context_length


def _names(msg: str, *numbers: int) -> bool:
    return all(re.search(rf"(?<!\d){n}(?!\d)", msg) for n in numbers)


def assert_max_context_bounded(load, path, context_length: int, **kwargs) -> None:
    """`max_context` above the artifact's context length is a one-line QwenEdgeError naming both numbers (no silent
    clamp on any backend); exactly the artifact's context length loads with a KV cache of that size."""
    with pytest.raises(QwenEdgeError) as e:
        load(path, max_context=context_length + 1, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg and _names(msg, context_length + 1, context_length), msg
    with load(path, max_context=context_length, **kwargs) as rt:
        assert rt.info.context_length == context_length
        assert rt.info.artifact_context_length == context_length


def assert_cli_max_context_refused(cli, path, context_length: int) -> None:
    """The same overflow through `qwen-edge generate`: exit 2 and one `error:` line naming both numbers."""
    r = cli("generate", str(path), "--prompt", "hi", "--max-new-tokens", "1", "--max-context", str(context_length + 1))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert _names(lines[0], context_length + 1, context_length), lines[0]
