"""The Qwen tokenizer: encode/decode over a tokenizer.json and the chat template that travels with it.

The jobs around it live in sibling modules, and their names are re-exported here: `tokenizer_build` (tokenizer.json
from the tiktoken ranks), `chat_template` (the sandboxed renderer), `streaming` (detokenizer, thinking split).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenizers import Tokenizer as HFTokenizer

from .chat_template import (
    TEMPLATE_MAX_OUTPUT_CHARS,
    TEMPLATE_TIME_BUDGET_S,
    TemplateError,
    load_template,
    render_template,
    template_names,
)
from ..errors import QwenEdgeError, first_line
from .streaming import THINK_END, THINK_START, StreamDecoder, split_thinking
from .tokenizer_build import (
    NUM_BASE_TOKENS,
    QWEN_PRETOKENIZE_PATTERN,
    _template_tokens,
    _unicode_to_bytes,
    build_tokenizer_config,
    build_tokenizer_json,
    bytes_to_unicode,
    derive_merges,
    load_qwen_ranks,
    save_qwen_tokenizer,
)

__all__ = [
    "NUM_BASE_TOKENS",
    "QWEN_PRETOKENIZE_PATTERN",
    "TEMPLATE_MAX_OUTPUT_CHARS",
    "TEMPLATE_TIME_BUDGET_S",
    "THINK_END",
    "THINK_START",
    "StreamDecoder",
    "TemplateError",
    "Tokenizer",
    "build_tokenizer_config",
    "build_tokenizer_json",
    "bytes_to_unicode",
    "derive_merges",
    "load_qwen_ranks",
    "load_template",
    "render_template",
    "save_qwen_tokenizer",
    "split_thinking",
    "template_names",
]


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class Tokenizer:
    """Encode/decode with a Hugging Face tokenizer.json and render the chat template that travels with it."""

    def __init__(
        self,
        backend: HFTokenizer,
        chat_template: str | None = None,
        special_tokens: Mapping[str, str | None] | None = None,
    ) -> None:
        """`backend`: a `tokenizers.Tokenizer`; `special_tokens`: bos/eos/pad/unk token strings for templates."""
        self._backend = backend
        self.chat_template = chat_template
        self.special_tokens: dict[str, str | None] = dict(special_tokens or {})
        self._plain: Any = None
        added = backend.get_added_tokens_decoder()
        self._added_text: dict[int, str] = {i: t.content for i, t in added.items()}
        self._special_ids: frozenset[int] = frozenset(i for i, t in added.items() if t.special)
        self._bytes_cache: dict[int, bytes] = {}

    # -- construction ---------------------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load tokenizer.json and the chat template (chat_template.jinja, else tokenizer_config.json) from a dir."""
        from tokenizers import Tokenizer as HFTokenizer

        root = Path(path)
        tj = root / "tokenizer.json"
        if not tj.is_file():
            raise QwenEdgeError(f"{root}: no tokenizer.json")
        try:
            backend = HFTokenizer.from_file(str(tj))
        except Exception as e:
            raise QwenEdgeError(f"{tj}: cannot load ({first_line(e)})") from None
        config: dict[str, Any] = {}
        cfg_path = root / "tokenizer_config.json"
        if cfg_path.is_file():
            try:
                config = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise QwenEdgeError(f"{cfg_path}: invalid JSON ({first_line(e)})") from None
        template: str | None = None
        jinja_path = root / "chat_template.jinja"
        if jinja_path.is_file():
            try:
                template = jinja_path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise TemplateError(f"{jinja_path}: chat template is unreadable ({first_line(e)})") from None
        else:
            template = _template_from_config(config.get("chat_template"))
            legacy = root / "chat_template.json"
            if template is None and legacy.is_file():
                try:
                    legacy_doc = json.loads(legacy.read_text(encoding="utf-8"))
                    template = _template_from_config(legacy_doc.get("chat_template"))
                except (OSError, ValueError, AttributeError):
                    template = None
        specials = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        return cls(backend, template, specials)

    @classmethod
    def for_family(cls, family: str) -> Tokenizer:
        """The Qwen vocabulary with a family's added tokens and bundled template (`qwen2`, `qwen2_5`, `qwen3`)."""
        _template_tokens(family)
        backend = _family_backend(family)
        specials = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None}
        return cls(backend, load_template(family), specials)

    @property
    def backend(self) -> HFTokenizer:
        """The underlying `tokenizers.Tokenizer`."""
        return self._backend

    # -- vocabulary -----------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows, added tokens included (the model's embedding may be larger)."""
        return int(self._backend.get_vocab_size(with_added_tokens=True))

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(int(token_id))

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of added tokens flagged special (those `skip_special` drops)."""
        return self._special_ids

    def is_special(self, token_id: int) -> bool:
        return int(token_id) in self._special_ids

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes a token stands for (b'' for an id outside the vocabulary)."""
        token_id = int(token_id)
        cached = self._bytes_cache.get(token_id)
        if cached is not None:
            return cached
        if token_id in self._added_text:
            data = self._added_text[token_id].encode("utf-8")
        else:
            token = self._backend.id_to_token(token_id)
            if token is None:
                data = b""
            else:
                u2b = _unicode_to_bytes()
                data = b"".join(bytes([u2b[c]]) if c in u2b else c.encode("utf-8") for c in token)
        self._bytes_cache[token_id] = data
        return data

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def eos_token_id(self) -> int | None:
        eos = self.eos_token
        return self.token_to_id(eos) if eos else None

    # -- encode / decode --------------------------------------------------------------------------------------------

    def _plain_backend(self) -> Any:
        """The same model and pipeline without added tokens (shares the model, so it costs nothing to build)."""
        if self._plain is None:
            from tokenizers import Tokenizer as HFTokenizer

            plain = HFTokenizer(self._backend.model)
            if self._backend.normalizer is not None:
                plain.normalizer = self._backend.normalizer
            if self._backend.pre_tokenizer is not None:
                plain.pre_tokenizer = self._backend.pre_tokenizer
            if self._backend.decoder is not None:
                plain.decoder = self._backend.decoder
            self._plain = plain
        return self._plain

    def encode(self, text: str, parse_special: bool = True) -> list[int]:
        """Token ids of `text`; with parse_special=False, added-token text (e.g. '<|im_end|>') is plain text."""
        backend = self._backend if parse_special else self._plain_backend()
        return list(backend.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of `ids` (invalid UTF-8 becomes U+FFFD); skip_special drops added tokens flagged special."""
        return str(self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special))

    # -- chat -------------------------------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **extra: Any,
    ) -> str:
        """Render a conversation with this tokenizer's chat template (sandboxed; TemplateError on failure)."""
        if not self.chat_template:
            raise TemplateError("this tokenizer has no chat template")
        context: dict[str, Any] = {k: v for k, v in self.special_tokens.items() if v is not None}
        context.update(extra)
        context["messages"] = [dict(m) for m in messages]
        context["tools"] = [dict(t) for t in tools] if tools else None
        context["add_generation_prompt"] = add_generation_prompt
        if enable_thinking is not None:
            context["enable_thinking"] = enable_thinking
        return render_template(self.chat_template, context)

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **extra: Any,
    ) -> list[int]:
        """Token ids of the rendered conversation (the template's special tokens become single ids)."""
        text = self.apply_chat_template(messages, add_generation_prompt, enable_thinking, tools, **extra)
        return self.encode(text, parse_special=True)


@functools.lru_cache(maxsize=4)
def _family_backend(family: str) -> HFTokenizer:
    """One parsed `tokenizers.Tokenizer` per family, shared by `Tokenizer.for_family` (never mutated)."""
    from tokenizers import Tokenizer as HFTokenizer

    return HFTokenizer.from_str(build_tokenizer_json(_template_tokens(family)))


def _template_from_config(value: Any) -> str | None:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, list):  # HF's named templates: [{"name": "default", "template": "..."}]
        named = {d.get("name"): d.get("template") for d in value if isinstance(d, Mapping)}
        chosen = named.get("default")
        return chosen if isinstance(chosen, str) and chosen else None
    return None
