"""Streaming output: an incremental UTF-8-safe detokenizer and the Qwen3 thinking split."""

from __future__ import annotations

import codecs
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

THINK_START = "<think>"
THINK_END = "</think>"


class StreamDecoder:
    """Incremental detokenizer: emits only complete UTF-8 text, holding back bytes of a split character."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False) -> None:
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


def split_thinking(text: str) -> tuple[str | None, str]:
    """Split Qwen3 output into (thinking, answer); an unterminated `<think>` block is all thinking so far."""
    stripped = text.lstrip()
    if stripped.startswith(THINK_START):
        body = stripped[len(THINK_START) :]
        end = body.find(THINK_END)
        if end < 0:
            return body.strip("\n"), ""
        return body[:end].strip("\n"), body[end + len(THINK_END) :].lstrip("\n")
    end = text.find(THINK_END)
    if end >= 0 and THINK_START not in text[:end]:
        # The template opened the block in the prompt (thinking-only models): the output starts inside it.
        return text[:end].strip("\n"), text[end + len(THINK_END) :].lstrip("\n")
    return None, text
