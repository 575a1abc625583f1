"""Tool calls in Qwen's format: check OpenAI tool dicts, parse `<tool_call>` blocks, hold them back from streams."""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union, cast

from ..errors import QwenEdgeError
from ..text.streaming import held_back

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"

ToolChoice = Union[str, Mapping[str, Any]]
""""auto" | "none" | "required" | {"type": "function", "function": {"name": N}} (or {"name": N})."""

_ALNUM = string.ascii_letters + string.digits


def new_call_id() -> str:
    """An id for a tool call, like OpenAI's: `call_` and 24 random letters and digits."""
    return "call_" + "".join(secrets.choice(_ALNUM) for _ in range(24))


@dataclass
class ToolCall:
    """One parsed call: the tool's name and its arguments as the JSON text generated (an object; unfinished when the
    reply was cut short, finish_reason "length")."""

    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict[str, Any]:
        """The call as an OpenAI `tool_calls` entry."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def check_tools(tools: Any, where: str = "tools") -> list[dict[str, Any]]:
    """OpenAI tool dicts, checked: [{"type": "function", "function": {"name", "description"?, "parameters"?}}]."""
    if not isinstance(tools, list):
        raise QwenEdgeError(f"{where}: expected a JSON list of tools")
    names: set[str] = set()
    out = []
    for n, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, Mapping) else None
        if not isinstance(t, Mapping) or t.get("type", "function") != "function" or not isinstance(fn, Mapping):
            raise QwenEdgeError(f"{where}: tool {n} must be {{'type': 'function', 'function': {{'name': ...}}}}")
        name = fn.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
            raise QwenEdgeError(f"{where}: tool {n} needs a name of 1-64 letters, digits, '_', '.' or '-'")
        if name in names:
            raise QwenEdgeError(f"{where}: tool name {name!r} appears twice")
        names.add(name)
        params = fn.get("parameters")
        if params is not None and not isinstance(params, Mapping):
            raise QwenEdgeError(f"{where}: tool {name!r}: parameters must be a JSON Schema object")
        if params is not None and _depth_of(params) > MAX_JSON_DEPTH:
            raise QwenEdgeError(f"{where}: tool {name!r}: parameters nested deeper than {MAX_JSON_DEPTH}")
        if fn.get("description") is not None and not isinstance(fn.get("description"), str):
            raise QwenEdgeError(f"{where}: tool {name!r}: description must be a string")
        out.append({"type": "function", "function": dict(fn)})
    return out


def load_tools(path: str | Path) -> list[dict[str, Any]]:
    """`--tools FILE`: a JSON list of OpenAI tool dicts."""
    from .inputs import read_json

    return check_tools(read_json(path), str(path))


def choice_name(choice: ToolChoice, tools: Sequence[Mapping[str, Any]]) -> tuple[str, str | None]:
    """(mode, name) of a tool_choice: mode "auto", "none", "required" or "named" (then with the tool's name)."""
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise QwenEdgeError(f"tool_choice {choice!r}: expected auto, none, required or a function name")
        if choice == "required" and not tools:
            raise QwenEdgeError("tool_choice 'required' needs tools")
        return choice, None
    if isinstance(choice, Mapping):
        fn = choice.get("function", choice)
        name = fn.get("name") if isinstance(fn, Mapping) else None
        if isinstance(name, str):
            if name not in {t["function"]["name"] for t in tools}:
                raise QwenEdgeError(f"tool_choice names {name!r}, which is not among the tools")
            return "named", name
    raise QwenEdgeError("tool_choice must be 'auto', 'none', 'required' or {'type': 'function', 'function': "
                        "{'name': ...}}")


MAX_JSON_DEPTH = 64
"""The deepest nesting of arrays and objects taken in tool-call arguments (parsed or sent back in messages): deeper
JSON is not a call (parsing) or a bad message (400), never a RecursionError."""


def json_depth(text: str) -> int:
    """How deep arrays and objects nest in JSON `text` (brackets inside strings not counted; linear, no recursion)."""
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', "", text)
    opens = bare.count("[") + bare.count("{")
    if not opens:
        return 0
    import numpy as np

    b = np.frombuffer(bare.encode("utf-8", "replace"), dtype=np.uint8)
    steps = np.isin(b, (ord("["), ord("{"))).astype(np.int32) - np.isin(b, (ord("]"), ord("}"))).astype(np.int32)
    return int(np.cumsum(steps).max())


def _depth_of(doc: Any) -> int:
    """json_depth of a parsed document (any too deep or odd to serialize counts as too deep)."""
    try:
        return json_depth(json.dumps(doc))
    except (RecursionError, ValueError, TypeError):
        return MAX_JSON_DEPTH + 1


def _loads_shallow(text: str) -> Any:
    """json.loads, refusing JSON nested deeper than MAX_JSON_DEPTH (ValueError, as for bad JSON)."""
    if json_depth(text) > MAX_JSON_DEPTH:
        raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH}")
    return json.loads(text)


def parse_tool_calls(text: str, names: Sequence[str] | None = None) -> tuple[str, list[ToolCall]]:
    """(the reply's content, its calls), read as a stream of it is (ToolCallFilter): each `<tool_call>` block on its
    own; a call names one of `names` (None: any name). Content is the text outside the blocks, no tool-call markup
    in it: with blocks, the whitespace around them is trimmed."""
    f = ToolCallFilter(None, names)
    f.feed(text)
    f.finish()
    return cast(str, f.content), f.calls


def tool_calls_finish(calls: Sequence[ToolCall], finish_reason: str) -> str:
    """A reply's finish reason: "tool_calls" when it made calls and ended on its own; a reply cut short (out of
    tokens or context, cancelled) keeps its reason, as OpenAI's "length" with an unfinished call does."""
    return "tool_calls" if calls and finish_reason not in ("length", "context", "cancelled") else finish_reason


def content_around_calls(pieces: Sequence[str]) -> str:
    """The content of a reply cut into the text pieces between its tool-call blocks: each trimmed of the newlines
    and spaces next to a block, empty ones dropped, joined by a newline."""
    kept = [p.rstrip() if i == 0 else p.strip() for i, p in enumerate(pieces)]
    return "\n".join(p for p in kept if p)


_HEAD = re.compile(r'\s{0,8}\{\s{0,8}"name"\s{0,8}:\s{0,8}"([A-Za-z0-9_.\-]{1,64})"\s{0,8},\s{0,8}'
                   r'"(?:arguments|parameters)"\s{0,8}:\s{0,8}(?=\{)')
"""The head of a call block, up to its arguments object: `{"name": "N", "arguments": ` (bounded whitespace)."""
_HEAD_MAX = 200
"""A block body this long that does not start with _HEAD never will (every match is shorter): it is no call."""


class ToolCallFilter:
    """Reads a streamed reply's `<tool_call>` blocks as they are generated, so the stream and the finished reply
    say the same (`parse_tool_calls` is this filter fed the whole text at once).

    Content (text outside the blocks) goes to `on_text`: from the first `<tool_call>` on it is held back (and any
    text that could start one, and trailing whitespace that may precede one); `finish` sends the rest of the final
    content. A block is a call once its head `{"name": "N", "arguments": {` is read and N is one of `names` (None:
    any name): `on_call` then gets OpenAI's first tool-call delta (index, id, type, name, arguments ""), then one
    delta per fed piece with the argument text it adds, up to the end of the arguments object. A block that does
    not start that way, or names a tool that was not offered, is no call (OpenAI never returns one). A call whose
    block ends early (`</tool_call>`, the next `<tool_call>`, the end of the reply: out of tokens) keeps the
    arguments it had, unfinished, as OpenAI's do at finish_reason "length"; arguments stop at MAX_JSON_DEPTH."""

    def __init__(self, on_text: Callable[[str], None] | None, names: Sequence[str] | None = None,
                 on_call: Callable[[dict[str, Any]], None] | None = None):
        self.on_text, self.on_call = on_text, on_call
        self.names = None if names is None else set(names)
        self.text = ""
        self.pos = 0
        """Where reading goes on in `text`."""
        self.state = "out"
        """out (content), head (a block before its arguments), args (a call's arguments), skip (the rest of a
        block that is no call or whose arguments are complete)."""
        self.piece_at = 0
        self.pieces: list[str] = []
        """The content pieces between blocks, closed so far."""
        self.calls: list[ToolCall] = []
        self.depth, self.in_string, self.escaped = 0, False, False
        self.emitted = ""
        self.content: str | None = None
        """The reply's content, once `finish` has run."""

    def feed(self, piece: str) -> None:
        self.text += piece
        self._read(final=False)

    def _read(self, final: bool) -> None:
        while True:
            if self.state == "out":
                at = self.text.find(TOOL_CALL_START, self.pos)
                if at < 0:
                    if not self.pieces:
                        hold = 0 if final else held_back(self.text, (TOOL_CALL_START,))
                        self._emit(self.text[self.piece_at: len(self.text) - hold].rstrip())
                    self.pos = max(self.pos, len(self.text) - len(TOOL_CALL_START) + 1)
                    return
                if not self.pieces:
                    self._emit(self.text[self.piece_at: at].rstrip())
                self.pieces.append(self.text[self.piece_at: at])
                self.state, self.pos = "head", at + len(TOOL_CALL_START)
                continue
            end, marker = self._block_end()
            avail = end if end >= 0 else len(self.text) - (0 if final else held_back(self.text[self.pos:],
                                                                                 (TOOL_CALL_START, TOOL_CALL_END)))
            if self.state == "head":
                m = _HEAD.match(self.text, self.pos, avail)
                if m is None and (end >= 0 or final or avail - self.pos >= _HEAD_MAX):
                    self.state = "skip"
                elif m is not None:
                    self.pos = m.end()
                    if self.names is not None and m.group(1) not in self.names:
                        self.state = "skip"
                    else:
                        self.state = "args"
                        self.depth, self.in_string, self.escaped = 0, False, False
                        self.calls.append(ToolCall(new_call_id(), m.group(1), ""))
                        self._call({"index": len(self.calls) - 1, "id": self.calls[-1].id, "type": "function",
                                    "function": {"name": m.group(1), "arguments": ""}})
            if self.state == "args":
                self._arguments(avail)
            if end < 0:  # the block goes on (or, at the end, ran to the end of the reply)
                if self.state == "skip":
                    self.pos = avail
                return
            self.pos = end + (len(marker) if marker == TOOL_CALL_END else 0)
            self.piece_at, self.state = self.pos, "out"

    def _block_end(self) -> tuple[int, str]:
        """Where the current block ends (-1: not yet seen) and the marker that ends it."""
        close = self.text.find(TOOL_CALL_END, self.pos)
        nxt = self.text.find(TOOL_CALL_START, self.pos)
        if close >= 0 and (nxt < 0 or close < nxt):
            return close, TOOL_CALL_END
        return (nxt, TOOL_CALL_START) if nxt >= 0 else (-1, "")

    def _arguments(self, upto: int) -> None:
        """Read the call's arguments up to `upto`: each character that belongs to the object is added and sent."""
        start = i = self.pos
        while i < upto:
            c = self.text[i]
            i += 1
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif c == "\\":
                    self.escaped = True
                elif c == '"':
                    self.in_string = False
            elif c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
                if self.depth > MAX_JSON_DEPTH:
                    i -= 1
                    self.state = "skip"
                    break
            elif c in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.state = "skip"
                    break
        self.pos = i
        if i > start:
            self.calls[-1].arguments += self.text[start:i]
            self._call({"index": len(self.calls) - 1, "function": {"arguments": self.text[start:i]}})

    def _call(self, delta: dict[str, Any]) -> None:
        if self.on_call is not None:
            self.on_call(delta)

    def _emit(self, upto: str) -> None:
        """Send what `upto` (the content so far, from its start) adds to what was sent."""
        if not upto.startswith(self.emitted):
            return
        s = upto[len(self.emitted):]
        if s:
            self.emitted = upto
            if self.on_text is not None:
                self.on_text(s)

    def finish(self, content: str | None = None) -> None:
        """The reply is over: read what was held back, then send the rest of the content (`content`: the reply's
        final content as the caller has it; None: this filter's own, `self.content`)."""
        self._read(final=True)
        if self.state == "out":
            self.pieces.append(self.text[self.piece_at:])
        self.content = self.text if TOOL_CALL_START not in self.text else content_around_calls(self.pieces)
        self._emit(self.content if content is None else content)


def template_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages as the Qwen templates want them: an assistant tool call's `arguments` as an object (OpenAI sends
    JSON text; Qwen2.5's template would render a string quoted), `content` None as ""."""
    out = []
    for m in messages:
        d = dict(m)
        if d.get("content") is None:
            d["content"] = ""
        if d.get("tool_calls"):
            calls = []
            for c in d["tool_calls"]:
                c = dict(c)
                fn = dict(c.get("function") or {})
                if isinstance(fn.get("arguments"), str):
                    try:
                        fn["arguments"] = _loads_shallow(fn["arguments"])
                    except (ValueError, RecursionError):
                        pass
                c["function"] = fn
                calls.append(c)
            d["tool_calls"] = calls
        out.append(d)
    return out


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """An OpenAI-shaped conversation, checked by the one set of rules the CLI (`--messages`), the library
    (`ChatSession.complete`) and the server share: system (or developer, taken as system) / user / assistant / tool
    messages with string content or text parts; an assistant's content may be null or absent beside `tool_calls`,
    whose `function.arguments` are JSON text or an object nested at most MAX_JSON_DEPTH deep."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise QwenEdgeError("messages: expected a non-empty list")
    out = []
    for n, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise QwenEdgeError(f"messages[{n}]: expected an object")
        role, content = m.get("role"), m.get("content")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant", "tool"):
            raise QwenEdgeError(f"messages[{n}]: role {role!r} (expected system, developer, user, assistant or tool)")
        if isinstance(content, list):  # OpenAI content parts: text only
            parts = [p.get("text") for p in content if isinstance(p, Mapping) and p.get("type") == "text"]
            if len(parts) != len(content) or not all(isinstance(p, str) for p in parts):
                raise QwenEdgeError(f"messages[{n}]: only text content parts are supported")
            content = "".join(parts)  # type: ignore[arg-type]
        if content is None and not (role == "assistant" and m.get("tool_calls")):
            raise QwenEdgeError(f"messages[{n}]: content is missing")
        if content is not None and not isinstance(content, str):
            raise QwenEdgeError(f"messages[{n}]: content must be a string")
        d = dict(m)
        d["role"], d["content"] = role, content
        calls = m.get("tool_calls")
        if calls is not None:
            if role != "assistant" or not isinstance(calls, list):
                raise QwenEdgeError(f"messages[{n}]: tool_calls belong to an assistant message, as a list")
            for c in calls:
                _check_call(c, n)
        out.append(d)
    return out


def _check_call(call: Any, n: int) -> None:
    fn = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
        raise QwenEdgeError(f"messages[{n}]: each tool call needs function.name")
    args = fn.get("arguments", "{}")
    if not isinstance(args, (str, Mapping)):
        raise QwenEdgeError(f"messages[{n}]: a tool call's function.arguments must be JSON text or an object")
    if (json_depth(args) if isinstance(args, str) else _depth_of(args)) > MAX_JSON_DEPTH:
        raise QwenEdgeError(f"messages[{n}]: tool call arguments nested deeper than {MAX_JSON_DEPTH}")


def read_messages(path: str | Path) -> list[dict[str, Any]]:
    """A messages file: a JSON list of OpenAI-shaped messages (UTF-8), checked by the same rules as the library's
    and the server's (`check_messages`); errors name the file."""
    from .inputs import read_json

    p = Path(path)
    data = read_json(p)
    try:
        return check_messages(data)
    except QwenEdgeError as e:
        raise QwenEdgeError(f"{p}: {e}") from None
