"""Tool calls in Qwen's format: check OpenAI tool dicts, parse `<tool_call>` blocks, hold them back from streams."""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union

from .errors import QwenEdgeError

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"

ToolChoice = Union[str, Mapping[str, Any]]
""""auto" | "none" | "required" | {"type": "function", "function": {"name": N}} (or {"name": N})."""

_ALNUM = string.ascii_letters + string.digits
_BLOCK = re.compile(re.escape(TOOL_CALL_START) + r"(.*?)(?:" + re.escape(TOOL_CALL_END) + r"|\Z)", re.S)


def new_call_id() -> str:
    """An id for a tool call, like OpenAI's: `call_` and 24 random letters and digits."""
    return "call_" + "".join(secrets.choice(_ALNUM) for _ in range(24))


@dataclass
class ToolCall:
    """One parsed call: the tool's name and its arguments as JSON text (an object)."""

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
    from .runtime.inputs import read_json

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


def _blocks(text: str) -> list[tuple[int, int, str]]:
    """(start, end, body) of each `<tool_call>` block: a block ends at its `</tool_call>`, at the next `<tool_call>`
    (one that never closed) or at the end of the text, so a malformed block never swallows the next one."""
    out = []
    at = text.find(TOOL_CALL_START)
    while at >= 0:
        body_from = at + len(TOOL_CALL_START)
        nxt = text.find(TOOL_CALL_START, body_from)
        close = text.find(TOOL_CALL_END, body_from)
        if close >= 0 and (nxt < 0 or close < nxt):
            out.append((at, close + len(TOOL_CALL_END), text[body_from:close]))
        else:
            end = nxt if nxt >= 0 else len(text)
            out.append((at, end, text[body_from:end]))
        at = text.find(TOOL_CALL_START, out[-1][1])
    return out


def parse_tool_calls(text: str, names: Sequence[str] | None = None) -> tuple[str, list[ToolCall]]:
    """(the reply's content, its calls). Each `<tool_call>` block is parsed on its own: a JSON {"name",
    "arguments"} object naming one of `names` (None: any name) is a call; a block that is not (malformed,
    truncated, nested too deep, a tool that was not offered) is dropped, as OpenAI never returns one. Content is
    the text outside the blocks, no tool-call markup in it: with blocks, the whitespace around them is trimmed."""
    blocks = _blocks(text)
    if not blocks:
        return text, []
    allowed = None if names is None else set(names)
    calls: list[ToolCall] = []
    pieces: list[str] = []
    pos = 0
    for start, end, body in blocks:
        pieces.append(text[pos:start])
        pos = end
        call = _parse_one(body)
        if call is not None and (allowed is None or call.name in allowed):
            calls.append(call)
    pieces.append(text[pos:])
    return content_around_calls(pieces), calls


def content_around_calls(pieces: Sequence[str]) -> str:
    """The content of a reply cut into the text pieces between its tool-call blocks: each trimmed of the newlines
    and spaces next to a block, empty ones dropped, joined by a newline."""
    kept = [p.rstrip() if i == 0 else p.strip() for i, p in enumerate(pieces)]
    return "\n".join(p for p in kept if p)


def _parse_one(body: str) -> ToolCall | None:
    try:
        doc = _loads_shallow(body.strip())
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("name"), str):
        return None
    args = doc.get("arguments", doc.get("parameters", {}))
    if isinstance(args, str):  # some models send the arguments as a JSON string
        try:
            args = _loads_shallow(args)
        except (ValueError, RecursionError):
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(new_call_id(), doc["name"], json.dumps(args, ensure_ascii=False))


class ToolCallFilter:
    """Holds back streamed text from the first `<tool_call>` on (and any text that could start one, and trailing
    whitespace that may precede one), so tool-call markup never reaches `on_text`. `finish(content)` sends the rest
    of the reply's final content (`parse_tool_calls`), so the stream adds up to exactly what a non-streamed reply
    says."""

    def __init__(self, on_text: Callable[[str], None] | None):
        self.on_text = on_text
        self.pending = ""
        self.inside = False
        self.emitted = ""

    def feed(self, piece: str) -> None:
        self.pending += piece
        if self.inside:
            return
        at = self.pending.find(TOOL_CALL_START)
        if at >= 0:
            self._emit(self.pending[:at].rstrip())
            self.inside = True
            return
        hold = next((k for k in range(min(len(TOOL_CALL_START) - 1, len(self.pending)), 0, -1)
                     if self.pending.endswith(TOOL_CALL_START[:k])), 0)
        self._emit(self.pending[: len(self.pending) - hold].rstrip())

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
        """The reply is over: `content` is its final content (None: all the text held back was content)."""
        self._emit(self.pending if content is None else content)
        self.pending = ""

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
