"""ChatSession on the torch reference: prefix reuse counted, thinking split and stripped, context policy, threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from conftest import requires_torch

import qwen_edge
from qwen_edge.backends.base import Runtime
from qwen_edge.runtime.chat import ChatSession
from qwen_edge.errors import QwenEdgeError
from qwen_edge.runtime.sampling import Sampling
from qwen_edge.text.tokenizer import Tokenizer

pytestmark = requires_torch
IM_END = 151645


class ForcedRuntime(Runtime):
    """The real torch runtime with its next-token logits steered to scripted replies (then free greedy)."""

    def __init__(self, inner: Runtime):
        self.inner = inner
        self.info = inner.info
        self.replies: list[list[int]] = []
        self._reply: list[int] | None = None
        self._start = 0

    @property
    def n_cached(self) -> int:  # type: ignore[override]
        return self.inner.n_cached

    def script(self, *replies: list[int]) -> None:
        self.replies = [list(r) for r in replies]

    def prefill(self, ids):
        multi = len(ids) > 1 or self._reply is None
        self.inner.prefill(ids)
        if multi and self.replies:  # a new prompt: the next scripted reply starts here
            self._reply, self._start = self.replies.pop(0), self.inner.n_cached

    def logits(self):
        x = self.inner.logits().copy()
        if self._reply is not None:
            k = self.inner.n_cached - self._start
            if k < len(self._reply):
                x[self._reply[k]] = x.max() + 100.0
        return x

    def rewind(self, n):
        self.inner.rewind(n)

    def reset(self):
        self.inner.reset()


@pytest.fixture(scope="module")
def ckpt(synth_ckpt):
    return synth_ckpt("tiny-qwen3")


@pytest.fixture(scope="module")
def tok(ckpt):
    return Tokenizer.from_dir(ckpt)


@pytest.fixture(scope="module")
def base_rt(ckpt):
    rt = qwen_edge.load(ckpt, max_context=256)
    yield rt
    rt.close()


@pytest.mark.parametrize("arch", ["tiny-qwen3", "tiny-qwen2"])
def test_second_turn_prefills_only_new_tokens(synth_ckpt, arch):
    ckpt = synth_ckpt(arch)
    tok = Tokenizer.from_dir(ckpt)
    rt = ForcedRuntime(qwen_edge.load(ckpt, max_context=256))
    answer1 = tok.encode("Paris is the capital.")
    answer2 = tok.encode("About two million people.")
    rt.script(answer1 + [IM_END], answer2 + [IM_END], tok.encode("Yes.") + [IM_END])
    # thinking left to the template's default: with it off, Qwen3's template would drop the empty think block of
    # the first prompt from the history, and those few tokens would be recomputed (see the thinking test)
    s = ChatSession(rt, tok, system="You answer briefly.", max_new_tokens=32)
    r1 = s.send("What is the capital of France?")
    assert r1.text == "Paris is the capital." and r1.finish_reason == "stop"
    assert r1.reused_tokens == 0 and r1.prefill_tokens == len(r1.prompt_ids)
    r2 = s.send("How many people live there?")
    assert r2.text == "About two million people."
    # the cache held prompt 1 + the reply; only the closing of that reply and the new user turn are prefilled
    assert r2.prompt_ids[: len(r1.prompt_ids) + len(answer1)] == r1.prompt_ids + answer1
    assert r2.reused_tokens == len(r1.prompt_ids) + len(answer1)
    assert r2.prefill_tokens == len(r2.prompt_ids) - r2.reused_tokens
    new_part = tok.decode(r2.prompt_ids[r2.reused_tokens:])
    assert new_part.startswith("<|im_end|>\n<|im_start|>user\nHow many people live there?")
    assert s.last_prefill_tokens == r2.prefill_tokens and s.last_reused_tokens == r2.reused_tokens
    r3 = s.send("Really?")
    assert r3.reused_tokens == len(r2.prompt_ids) + len(answer2)
    assert [m["role"] for m in s.messages] == ["system", "user", "assistant"] * 1 + ["user", "assistant"] * 2
    rt.inner.close()


def test_thinking_split_streamed_and_stripped_from_history(base_rt, tok):
    rt = ForcedRuntime(base_rt)
    think_reply = tok.encode("<think>\nThe user greets me. I should greet back.\n</think>\n\nHello! How can I help?")
    rt.script(think_reply + [IM_END], tok.encode("Sure.") + [IM_END])
    s = ChatSession(rt, tok, max_new_tokens=64)  # Qwen3 template default: thinking on
    thinking_pieces: list[str] = []
    text_pieces: list[str] = []
    r1 = s.send("Hi!", on_text=text_pieces.append, on_thinking=thinking_pieces.append)
    assert r1.thinking == "The user greets me. I should greet back."
    assert r1.text == "Hello! How can I help?"
    assert "".join(thinking_pieces) == r1.thinking and "".join(text_pieces) == r1.text
    assert s.history[-1] == {"role": "assistant", "content": "Hello! How can I help?"}
    r2 = s.send("Tell me more", thinking=False)  # per-turn switch
    rendered = tok.decode(r2.prompt_ids)
    assert "greet back" not in rendered and "Hello! How can I help?<|im_end|>" in rendered
    assert rendered.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # the think block left the history, so the cache is reused up to the first reply's header only
    assert r2.reused_tokens == len(r1.prompt_ids)
    assert r2.text == "Sure." and r2.thinking is None


class ThinkingOnlySession(ChatSession):
    """A session whose template ends the generation prompt with an open think block (as thinking-only Qwen3
    releases' templates do): the reply starts inside the thinking and carries no <think> of its own."""

    def render(self, messages, thinking, tools=None):
        return super().render(messages, thinking, tools) + self.tokenizer.encode("<think>\n")


def test_prompt_that_opens_the_think_block_streams_the_same_split(base_rt, tok):
    rt = ForcedRuntime(base_rt)
    rt.script(tok.encode("I should greet back.\n</think>\n\nHello!") + [IM_END])
    s = ThinkingOnlySession(rt, tok, max_new_tokens=64)
    thinking_pieces: list[str] = []
    text_pieces: list[str] = []
    r = s.send("Hi!", on_text=text_pieces.append, on_thinking=thinking_pieces.append)
    assert tok.decode(r.prompt_ids).endswith("<|im_start|>assistant\n<think>\n")
    assert r.thinking == "I should greet back." and r.text == "Hello!"
    assert "".join(thinking_pieces) == r.thinking and "".join(text_pieces) == r.text  # no </think> leaks


def test_unclosed_thinking_opened_by_the_prompt_is_thinking_as_streamed(base_rt, tok):
    """A reply cut inside a think block the prompt opened: all thinking, in the result as in the stream."""
    rt = ForcedRuntime(base_rt)
    rt.script(tok.encode("Still weighing the options"))
    s = ThinkingOnlySession(rt, tok, max_new_tokens=4)
    thinking_pieces: list[str] = []
    text_pieces: list[str] = []
    r = s.send("Hi!", on_text=text_pieces.append, on_thinking=thinking_pieces.append)
    assert r.finish_reason == "length" and r.thinking and r.text == "" and not text_pieces
    assert "".join(thinking_pieces) == r.thinking


def test_long_conversation_drops_oldest_turns_and_keeps_system(ckpt, tok):
    with qwen_edge.load(ckpt, max_context=256) as rt:
        s = ChatSession(rt, tok, system="SYSTEM PROMPT", thinking=False, max_new_tokens=24,
                        sampling=Sampling(repetition_penalty=1.3))
        dropped = 0
        for i in range(12):
            r = s.send(f"Question number {i}: tell me something about the number {i} please.")
            assert r.finish_reason in ("stop", "length", "context")
            assert r.context_used <= 256
            dropped += r.dropped_turns
        assert dropped > 0
        assert s.messages[0] == {"role": "system", "content": "SYSTEM PROMPT"}
        assert s.history[-2]["content"].startswith("Question number 11")
        assert not any("Question number 0:" in m["content"] for m in s.history)
        n_hist = len(s.history)
        with pytest.raises(QwenEdgeError, match="context holds 256"):
            s.send("word " * 400)
        assert len(s.history) == n_hist  # the refused message changed nothing
        r = s.send("Still there?")
        assert r.finish_reason in ("stop", "length", "context")


def test_context_policy_error(ckpt, tok):
    with qwen_edge.load(ckpt, max_context=128) as rt:
        s = ChatSession(rt, tok, context_policy="error", max_new_tokens=60)
        s.send("first message here")
        with pytest.raises(QwenEdgeError, match="context_policy"):
            s.send("word " * 50)  # fits alone (about 60 + 60 tokens), not after the first exchange
        assert len(s.history) == 2


def test_reset_and_cancel(base_rt, tok):
    s = ChatSession(base_rt, tok, thinking=False, max_new_tokens=20)
    s.send("Hello")

    def ctrl_c(piece):
        raise KeyboardInterrupt

    r = s.send("Count to ten", on_text=ctrl_c)
    assert r.finish_reason == "cancelled"
    r2 = s.send("Again")  # the session survives and keeps reusing its cache
    assert r2.finish_reason in ("stop", "length") and r2.reused_tokens > 0
    s.reset()
    assert s.history == [] and base_rt.n_cached == 0
    assert s.send("Fresh start").reused_tokens == 0


def test_second_thread_is_refused(base_rt, tok):
    s = ChatSession(base_rt, tok, thinking=False, max_new_tokens=8)
    started, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def on_text(piece):
        started.set()
        release.wait(30)

    def worker():
        try:
            s.send("Hello from thread A", on_text=on_text)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    t = threading.Thread(target=worker)
    t.start()
    assert started.wait(60)
    with pytest.raises(QwenEdgeError, match="already generating in another thread"):
        s.send("Hello from thread B")
    release.set()
    t.join(60)
    assert not errors and len(s.history) == 2


def test_sampled_chat_is_reproducible(base_rt, tok):
    outs = []
    for _ in range(2):
        s = ChatSession(base_rt, tok, thinking=False, max_new_tokens=10,
                        sampling=Sampling(temperature=0.9, top_k=40, seed=123))
        outs.append(s.send("Tell me a story").output_ids)
    assert outs[0] == outs[1] and np.unique(outs[0]).size > 1
