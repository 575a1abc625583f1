"""Constrained decoding: JSON Schema, any JSON object, regex and Lark grammars as token masks (llguidance).

A `Constraint` is a compiled-to-text grammar, independent of any model; `generate` binds it to the artifact's own
tokenizer (its byte-level BPE vocabulary, read from tokenizer.json) and the model's logits width, and masks the
logits before every sampling step. The stop ids are the grammar's end: they are allowed exactly when the grammar
accepts, and they are the only choice once it can take nothing more.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from ..errors import QwenEdgeError, first_line

if TYPE_CHECKING:
    from ..text.tokenizer import Tokenizer

JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""How generated JSON is spelled: no free whitespace (random weights could emit it forever), Python's json.dumps
separators (so a reply re-rendered by a chat template's `tojson` matches the tokens that were generated)."""

CONSTRAINT_KINDS = ("json_schema", "json_object", "regex", "grammar", "tool_call")

_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
_SUBSCHEMA_ONE = ("items", "additionalItems", "contains", "not", "if", "then", "else", "propertyNames",
                  "additionalProperties", "unevaluatedItems")


def close_objects(schema: Any) -> Any:
    """A copy of `schema` where every object schema that does not say `"additionalProperties"` (or
    `unevaluatedProperties`) gets `"additionalProperties": false`: only its declared properties.

    LangChain, instructor and Pydantic send object schemas without `additionalProperties`; read as JSON Schema says
    (any further key allowed), the grammar lets a weak model append keys until the token limit. llama.cpp's
    schema converter and xgrammar's strict mode read a missing `additionalProperties` as closed; so do we. A schema
    that wants extra keys says `"additionalProperties": true` (or a schema for them). The members of an `allOf` are
    left open at their own level (closing each would refuse the keys the others declare). A schema nested too deep
    to walk is a ConstraintError."""
    try:
        return _close(schema)
    except RecursionError:
        raise ConstraintError("json_schema: the schema is nested too deeply") from None


def _close(schema: Any) -> Any:
    if isinstance(schema, list):
        return [_close(s) for s in schema]
    if not isinstance(schema, Mapping):
        return schema
    out = dict(schema)
    for k in _SUBSCHEMA_MAPS:
        if isinstance(out.get(k), Mapping):
            out[k] = {name: _close(sub) for name, sub in out[k].items()}
    for k in _SUBSCHEMA_LISTS:
        if isinstance(out.get(k), list):
            out[k] = [_close(sub) for sub in out[k]]
    for k in _SUBSCHEMA_ONE:
        if k in out:
            out[k] = _close(out[k])
    if isinstance(out.get("allOf"), list):
        out["allOf"] = [_close_inside(sub) for sub in out["allOf"]]
    kind = out.get("type")
    is_object = kind == "object" or (isinstance(kind, list) and "object" in kind) or (
        kind is None and any(k in out for k in ("properties", "required", "patternProperties")))
    if is_object and "additionalProperties" not in out and "unevaluatedProperties" not in out:
        out["additionalProperties"] = False
    return out


def _close_inside(schema: Any) -> Any:
    """An allOf member: closed below, left as it is at its own level."""
    if not isinstance(schema, Mapping):
        return schema
    had = "additionalProperties" in schema
    out = _close(schema)
    if not had:
        out.pop("additionalProperties", None)
    return out


class ConstraintError(QwenEdgeError, ValueError):
    """A schema, regex or grammar that the engine cannot compile (bad input: exit 2, HTTP 400)."""


def _llg() -> Any:
    try:
        import llguidance
    except ImportError:  # a dependency; only a broken install lacks it
        raise QwenEdgeError("constrained decoding needs llguidance: pip install 'llguidance==1.9.1'") from None
    return llguidance


@dataclass(frozen=True)
class Constraint:
    """What the output must match, as an llguidance grammar (JSON text); build one with the functions below."""

    kind: str
    """One of CONSTRAINT_KINDS."""
    grammar: str
    """The llguidance grammar (a serialized TopLevelGrammar)."""
    source: str = ""
    """The schema, regex or Lark text it came from (for messages)."""

    def matcher(self, tokenizer: Tokenizer, n_vocab: int, stop_ids: Sequence[int]) -> "Matcher":
        """A fresh matcher over `tokenizer`'s vocabulary padded to the logits width `n_vocab`."""
        llg = _llg()
        llt = _ll_tokenizer(tokenizer, n_vocab, tuple(int(i) for i in stop_ids))
        m = llg.LLMatcher(llt, self.grammar, log_level=0)
        if m.is_error():
            raise ConstraintError(f"{self.kind}: {first_line(m.get_error())}")
        # without stop ids llguidance falls back on the tokenizer's own end token: nothing may end the output then
        return Matcher(m, n_vocab, refused=() if stop_ids else tuple(llt.eos_tokens), ends=stop_ids)


def _validated(kind: str, grammar: str, source: str) -> Constraint:
    err = _llg().LLMatcher.validate_grammar(grammar, None)
    if err:
        raise ConstraintError(f"{kind}: {first_line(err)}")
    return Constraint(kind, grammar, source)


def json_schema(schema: Mapping[str, Any] | str | bool, *, closed: bool = True) -> Constraint:
    """Output is one JSON value valid under `schema` (a dict or its JSON text). `closed`: object schemas without
    `additionalProperties` take no undeclared keys (`close_objects`)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ConstraintError(f"json_schema: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(schema, (Mapping, bool)):
        raise ConstraintError(f"json_schema: a schema is a JSON object, not {type(schema).__name__}")
    doc = close_objects(schema) if closed and isinstance(schema, Mapping) else schema
    try:
        grammar = _llg().LLMatcher.grammar_from_json_schema(doc if isinstance(doc, bool) else dict(doc),
                                                            overrides=JSON_OPTIONS)
        source = json.dumps(doc)
    except (ValueError, TypeError, RecursionError) as e:
        raise ConstraintError(f"json_schema: {first_line(e) or 'nested too deeply'}") from None
    return _validated("json_schema", grammar, source)


def json_object() -> Constraint:
    """Output is one JSON object (any keys and values)."""
    c = json_schema({"type": "object"}, closed=False)
    return Constraint("json_object", c.grammar, c.source)


def regex(pattern: str) -> Constraint:
    """Output matches the regular expression `pattern` in full."""
    if not isinstance(pattern, str) or not pattern:
        raise ConstraintError("regex: expected a non-empty string")
    return _validated("regex", _llg().LLMatcher.grammar_from_regex(pattern), pattern)


def grammar(lark: str) -> Constraint:
    """Output matches a Lark grammar (llguidance's dialect: `start:` rule, /regex/ terminals, `%json {...}`)."""
    if not isinstance(lark, str) or not lark.strip():
        raise ConstraintError("grammar: expected a non-empty Lark grammar")
    return _validated("grammar", _llg().LLMatcher.grammar_from_lark(lark), lark)


def tool_call(tools: Sequence[Mapping[str, Any]], name: str | None = None) -> Constraint:
    """Output is one or more Qwen tool calls, `<tool_call>\\n{"name": N, "arguments": {...}}\\n</tool_call>`, each
    naming one of `tools` (OpenAI tool dicts, already checked) or only `name`, its arguments valid under the tool's
    `parameters` schema (closed: `close_objects`). `<tool_call>` and `</tool_call>` are single added tokens of the Qwen vocabulary."""
    options = []
    for t in tools:
        fn = t["function"]
        if name is not None and fn["name"] != name:
            continue
        params = close_objects(fn.get("parameters") or {"type": "object", "properties": {}})
        options.append({"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": params},
                        "required": ["name", "arguments"], "additionalProperties": False})
    if not options:
        raise ConstraintError(f"tool_choice names {name!r}, which is not among the tools")
    call: dict[str, Any] = {"anyOf": options} if len(options) > 1 else options[0]
    call = {**call, "x-guidance": JSON_OPTIONS}
    # named, single call: exactly one; "required": one or more, separated as the templates render them.
    more = "" if name is not None else ' ("\\n" call)*'
    lark = (f"start: call{more}\ncall: <tool_call> \"\\n\" body \"\\n\" </tool_call>\n"
            f"body: %json {json.dumps(call)}")
    c = _validated("tool_call", _llg().LLMatcher.grammar_from_lark(lark), lark)
    return c


def from_response_format(fmt: Mapping[str, Any] | None) -> Constraint | None:
    """The constraint of an OpenAI `response_format`: None, {"type": "text"}, {"type": "json_object"} or
    {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}."""
    if fmt is None:
        return None
    if not isinstance(fmt, Mapping):
        raise ConstraintError("response_format must be an object")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_object()
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("schema", {}), (Mapping, bool)):
            raise ConstraintError("response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}")
        return json_schema(spec.get("schema", {}))
    raise ConstraintError(f"response_format type {kind!r}: expected text, json_object or json_schema")


def schema_file(path: str | Path) -> Constraint:
    """`--json-schema FILE`: a JSON Schema file as a constraint (errors name the file)."""
    from .inputs import read_json

    doc = read_json(path)
    try:
        return json_schema(doc)
    except ConstraintError as e:
        raise ConstraintError(f"{path}: {e}") from None


# --- binding to a vocabulary --------------------------------------------------------------------------------------
_TOKENIZERS: dict[tuple[int, int, tuple[int, ...]], Any] = {}
_TOKENIZERS_LOCK = threading.Lock()


def _ll_tokenizer(tokenizer: Tokenizer, n_vocab: int, stop_ids: tuple[int, ...]) -> Any:
    """The llguidance tokenizer of `tokenizer` (built from its tokenizer.json: ~1 s for Qwen's vocabulary, so cached
    per tokenizer object, logits width and stop ids)."""
    key = (id(tokenizer.backend), int(n_vocab), stop_ids)
    with _TOKENIZERS_LOCK:
        hit = _TOKENIZERS.get(key)
        if hit is not None and hit[0] is tokenizer.backend:
            return hit[1]
        if n_vocab < tokenizer.vocab_size:
            raise QwenEdgeError(f"the model's logits have {n_vocab} entries but the tokenizer knows "
                                f"{tokenizer.vocab_size} tokens")
        llt = _llg().LLTokenizer(tokenizer.backend.to_str(), n_vocab=int(n_vocab), eos_token=list(stop_ids) or None)
        _TOKENIZERS[key] = (tokenizer.backend, llt)
        return llt


class Matcher:
    """One generation's position in a grammar: `mask` the logits, then `advance` with the chosen token."""

    def __init__(self, matcher: Any, n_vocab: int, refused: Sequence[int] = (), ends: Sequence[int] = ()):
        self._m = matcher
        self._ends = {int(i) for i in ends}
        self.n_vocab = n_vocab
        self._refused = [int(i) for i in refused if 0 <= int(i) < n_vocab]

    def allowed(self) -> np.ndarray:
        """Boolean vector over the vocabulary: the tokens the grammar allows next."""
        bits = np.frombuffer(self._m.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[: self.n_vocab].astype(bool)
        allowed[self._refused] = False
        if self._m.is_error():
            raise QwenEdgeError(f"constrained decoding failed: {first_line(self._m.get_error())}")
        return allowed

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """A copy of `logits` where every token the grammar refuses is -inf."""
        x = np.asarray(logits, dtype=np.float32)
        allowed = self.allowed()
        if x.shape[-1] != allowed.shape[0]:
            raise QwenEdgeError(f"logits have {x.shape[-1]} entries, the constraint {allowed.shape[0]}")
        if not allowed.any():
            raise QwenEdgeError("constrained decoding: the grammar allows no token here")
        return np.where(allowed, x, np.float32(-np.inf))

    def ff_tokens(self) -> list[int]:
        """The tokens the grammar forces next (llguidance's fast-forward: the one continuation it allows, in its
        canonical tokenization); [] when there is a choice."""
        out = []
        for t in self._m.compute_ff_tokens():
            if int(t) in self._refused or int(t) in self._ends:  # an end is chosen by the mask, never forced
                break
            out.append(int(t))
        return out

    def advance(self, token: int) -> None:
        if not self._m.consume_token(int(token)):
            raise QwenEdgeError(f"constrained decoding: token {token} refused ({first_line(self._m.get_error())})")

    @property
    def accepting(self) -> bool:
        return bool(self._m.is_accepting())

    @property
    def stopped(self) -> bool:
        """The grammar can take nothing more: only a stop id may follow."""
        return bool(self._m.is_stopped())
