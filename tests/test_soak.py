"""Runtime under load: 200 sequential generations keep RSS flat; a ChatSession shared by two threads refuses."""

from __future__ import annotations

import gc
import threading
from pathlib import Path

import pytest

import hostile

N_GENERATIONS = 200
WARMUP = 20
RSS_GROWTH_LIMIT = 50 * 1024 * 1024


def _rss() -> int:
    import psutil

    gc.collect()
    return psutil.Process().memory_info().rss


@pytest.mark.parametrize("fmt,quant", [("gguf", "q8_0"), ("onnx", "fp32")])
def test_rss_flat_over_generations(exported, fmt, quant):
    hostile.require_module("qwen_edge.runtime.generate")
    hostile.require_module(f"qwen_edge.backends.{'llama_cpp' if fmt == 'gguf' else 'onnxruntime'}")
    from qwen_edge.backends import load
    from qwen_edge.runtime.generate import generate
    from qwen_edge.runtime.sampling import Sampling
    from qwen_edge.text.tokenizer import Tokenizer

    art = exported("tiny-qwen3", fmt, quant)
    tok = Tokenizer.from_dir(art)
    prompts = [tok.encode(f"{i} plus {i} is") for i in range(8)]
    rt = load(art, max_context=64, threads=1)
    try:
        base = None
        for i in range(N_GENERATIONS):
            rt.reset()
            res = generate(rt, prompts[i % len(prompts)], sampling=Sampling(temperature=0.8, seed=i),
                           max_new_tokens=2, tokenizer=tok)
            assert 1 <= len(res.output_ids) <= 2
            if i == WARMUP - 1:
                base = _rss()
        grown = _rss() - base
    finally:
        rt.close()
    print(f"{fmt}: RSS growth over {N_GENERATIONS - WARMUP} generations: {grown / 2**20:.1f} MiB")
    assert grown < RSS_GROWTH_LIMIT, f"RSS grew {grown / 2**20:.1f} MiB over {N_GENERATIONS} generations"


def test_chat_session_two_threads(exported):
    """Two threads sending at once: one reply is generated, the other gets a clear QwenEdgeError."""
    hostile.require_module("qwen_edge.runtime.chat")
    from qwen_edge.runtime.chat import ChatSession
    from qwen_edge.errors import QwenEdgeError

    art = exported("tiny-qwen3", "gguf", "q8_0")
    chat = ChatSession.load(art, max_context=512, max_new_tokens=24)
    started, release = threading.Event(), threading.Event()
    results: dict[str, object] = {}

    def slow_text(piece: str) -> None:
        started.set()
        release.wait(5)

    def first() -> None:
        try:
            results["first"] = chat.send("hello there", on_text=slow_text)
        except BaseException as e:  # noqa: BLE001 - reported through the dict
            results["first"] = e

    t = threading.Thread(target=first)
    t.start()
    refused: BaseException | str | None = None
    try:
        assert started.wait(30), "first turn never produced text"
        try:
            chat.send("me too")
            refused = "the second send was served"
        except QwenEdgeError as e:
            refused = e
    finally:
        release.set()
        t.join(60)
    clean = (isinstance(refused, QwenEdgeError) and "another thread" in str(refused)
             and not isinstance(results.get("first"), BaseException) and len(chat.history) == 2)
    assert hostile.record("chat/two-threads", clean), (refused, results.get("first"), chat.history)
    second = chat.send("and now?")  # the refused turn left the session usable
    assert second.finish_reason in ("stop", "length")
    chat.close()


def test_many_chat_turns_rss_flat(exported):
    hostile.require_module("qwen_edge.runtime.chat")
    from qwen_edge.runtime.chat import ChatSession

    art = exported("tiny-qwen3", "gguf", "q8_0")
    chat = ChatSession.load(art, max_context=256, threads=1, max_new_tokens=2)
    base = None
    for i in range(30):
        chat.send(f"turn {i}")
        if i == 4:
            base = _rss()
    grown = _rss() - base
    chat.close()
    assert grown < RSS_GROWTH_LIMIT, f"RSS grew {grown / 2**20:.1f} MiB over 25 chat turns"
