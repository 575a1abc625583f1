"""Streaming output: an incremental UTF-8-safe detokenizer and the Qwen3 thinking split."""

from __future__ import annotations

import codecs
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol


class _TokenBytes(Protocol):  # what StreamDecoder needs of a Tokenizer (tokenizer.py imports this module)
    def is_special(self, token_id: int) -> bool: ...

    def token_bytes(self, token_id: int) -> bytes: ...


class _TokenIds(Protocol):  # what think_position needs of a Tokenizer
    def token_to_id(self, token: str) -> int | None: ...


def held_back(text: str, markers: Sequence[str]) -> int:
    """How many characters at the end of streamed `text` could be the start of one of `markers` (never a whole one:
    a whole marker is found, not held). The one hold-back of the stream filters: stop strings (generate.py),
    `</think>` (ThinkingSplitter) and `<tool_call>` (tools.ToolCallFilter) hold these back until the next piece
    tells whether the marker follows."""
    hold = 0
    for m in markers:
        for k in range(min(len(m) - 1, len(text)), hold, -1):
            if text.endswith(m[:k]):
                hold = k
                break
    return hold


def think_position(tokenizer: _TokenIds, prompt: Sequence[int]) -> str:
    """Where a prompt leaves the reply with a Qwen3 `<think>` block, from its last think tag within the last turn:
    "thinking" (the prompt opened a block: a thinking-only template), "answer" (it closed one, or the vocabulary has
    no think tags) or "maybe" (no tag in the last turn: the reply may open a block). The one scan generate's loop and
    ChatSession use."""
    start, end = tokenizer.token_to_id(THINK_START), tokenizer.token_to_id(THINK_END)
    if start is None or end is None:
        return "answer"
    im_start = tokenizer.token_to_id("<|im_start|>")
    for t in reversed(prompt):
        if t == end:
            return "answer"
        if t == start:
            return "thinking"
        if t == im_start:
            break
    return "maybe"


THINK_START = "<think>"
THINK_END = "</think>"


class StreamDecoder:
    """Incremental detokenizer: emits only complete UTF-8 text, holding back bytes of a split character."""

    def __init__(self, tokenizer: _TokenBytes, skip_special: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Feed one token id; return the text it completes (possibly '')."""
        if self._skip_special and self._tokenizer.is_special(token_id):
            return ""
        return str(self._utf8.decode(self._tokenizer.token_bytes(token_id)))

    def push_many(self, ids: Iterable[int]) -> str:
        return "".join(self.push(i) for i in ids)

    def flush(self) -> str:
        """End of stream: return what is held back (an incomplete character becomes U+FFFD) and reset."""
        out = str(self._utf8.decode(b"", final=True))
        self._utf8.reset()
        return out

    def reset(self) -> None:
        self._utf8.reset()


class ThinkingSplitter:
    """Routes streamed text to on_thinking inside a leading <think>...</think> block and to on_text after it.

    The newlines around the thinking and those opening the answer are dropped. `opened=True`: the prompt already
    opened the block (a thinking-only template ends its generation prompt with `<think>`), so the stream starts
    inside it. `saw_block` tells, once the stream is over, whether there was a block (even an empty one).
    """

    def __init__(self, on_text: Callable[[str], None] | None, on_thinking: Callable[[str], None] | None,
                 *, opened: bool = False):
        self.on_text, self.on_thinking = on_text, on_thinking
        self.state = "thinking" if opened else "start"
        self.buf = ""
        self.think_started = False
        self.saw_block = opened

    def _text(self, s: str) -> None:
        if s and self.on_text:
            self.on_text(s)

    def _think(self, s: str) -> None:
        if s and self.on_thinking:
            self.on_thinking(s)

    def feed(self, piece: str) -> None:
        self.buf += piece
        while self.buf:
            if self.state == "start":
                head = self.buf.lstrip()
                if head.startswith(THINK_START):
                    self.buf, self.state, self.saw_block = head[len(THINK_START):], "thinking", True
                elif THINK_START.startswith(head):
                    return  # maybe the start of "<think>": wait
                else:
                    self.state = "answer"
            elif self.state == "thinking":
                if not self.think_started:
                    self.buf = self.buf.lstrip("\n")
                    if not self.buf:
                        return
                    self.think_started = True
                end = self.buf.find(THINK_END)
                if end >= 0:
                    self._think(self.buf[:end].rstrip("\n"))
                    self.buf, self.state = self.buf[end + len(THINK_END):], "after"
                    continue
                hold = held_back(self.buf, (THINK_END,))
                rest = self.buf[: len(self.buf) - hold]
                body = rest.rstrip("\n")  # trailing newlines may precede </think>: hold them too
                self._think(body)
                self.buf = self.buf[len(body):]
                return
            elif self.state == "after":
                self.buf = self.buf.lstrip("\n")
                if not self.buf:
                    return
                self.state = "answer"
            else:
                self._text(self.buf)
                self.buf = ""

    def finish(self) -> None:
        if self.state == "start":
            self._text(self.buf)
        elif self.state == "thinking":
            self._think(self.buf.rstrip("\n"))
        elif self.state == "answer":
            self._text(self.buf)
        self.buf = ""


def split_thinking(text: str, *, opened: bool | None = None) -> tuple[str | None, str]:
    """Split Qwen3 output into (thinking, answer); an unterminated `<think>` block is all thinking so far.

    The whole text run through `ThinkingSplitter`; thinking is None without a block, "" for an empty one.
    `opened=True`: the prompt opened the block (thinking-only templates), so the output starts inside it even
    when it never closes; None guesses from the text: a `</think>` with no `<think>` before it means the same.
    """
    end = text.find(THINK_END)
    if opened is None:
        opened = end >= 0 and THINK_START not in text[:end]
    thinking: list[str] = []
    answer: list[str] = []
    splitter = ThinkingSplitter(answer.append, thinking.append, opened=opened)
    splitter.feed(text)
    splitter.finish()
    return ("".join(thinking) if splitter.saw_block else None), "".join(answer)
