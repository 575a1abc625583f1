"""Type-checked, never run (tests/test_api.py runs mypy on it): the public API's types as an app sees them."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import assert_type

import numpy as np

import qwen_edge
from qwen_edge import (Artifact, ChatSession, GenerationResult, Runtime, RuntimeInfo, Sampling, Tokenizer,
                       TurnResult)
from qwen_edge.quality.reports import BenchReport, Stat, VerifyReport


def app(ckpt: str) -> None:
    art = qwen_edge.export(ckpt, "gguf", "q8_0", "dist")
    assert_type(art, Path)
    rt = qwen_edge.load(art, max_context=512)
    assert_type(rt, Runtime)
    assert_type(rt.info, RuntimeInfo)
    assert_type(rt.info.stop_ids, list[int])
    assert_type(rt.info.context_length, int)
    assert_type(rt.logits(), np.ndarray)
    tok = Tokenizer.from_dir(art)
    ids = tok.encode_chat([{"role": "user", "content": "hi"}], enable_thinking=False)
    assert_type(ids, list[int])
    res = qwen_edge.generate(rt, ids, sampling=Sampling(temperature=0.7), tokenizer=tok, on_text=print,
                             cancel=threading.Event())
    assert_type(res, GenerationResult)
    assert_type(res.stats.decode_tokens_per_s, float | None)
    chat = ChatSession(rt, tok, system="Be brief.", context_policy="error")
    turn = chat.send("hello", thinking=False, cancel=lambda: False)
    assert_type(turn, TurnResult)
    assert_type(turn.thinking, str | None)
    with ChatSession.load(art, max_new_tokens=8) as other:
        assert_type(other, ChatSession)
    report = qwen_edge.verify(art)
    assert_type(report, VerifyReport)
    assert_type(report["passed"], bool)
    bench = qwen_edge.bench([art], repeat=1)
    assert_type(bench, BenchReport)
    assert_type(bench["results"][0]["decode_tokens_per_s"], Stat)
    assert_type(Artifact.open(art).stop_ids, list[int])
    try:
        qwen_edge.load("missing")
    except qwen_edge.QwenEdgeError as e:
        assert_type(str(e), str)
