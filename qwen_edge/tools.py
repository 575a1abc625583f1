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
        if fn.get("description") is not None and not isinstance(fn.get("description"), str):
            raise QwenEdgeError(f"{where}: tool {name!r}: description must be a string")
        out.append({"type": "function", "function": dict(fn)})
    return out


def load_tools(path: str | Path) -> list[dict[str, Any]]:
    """`--tools FILE`: a JSON list of OpenAI tool dicts."""
    from .generate import read_json

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


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """(the text without its tool calls, the calls) of a reply; blocks that are not a JSON {"name", "arguments"}
    object stay in the text as they were."""
    calls: list[ToolCall] = []
    kept: list[str] = []
    pos = 0
    for m in _BLOCK.finditer(text):
        call = _parse_one(m.group(1))
        if call is None:
            continue
        kept.append(text[pos: m.start()])
        pos = m.end()
        calls.append(call)
    kept.append(text[pos:])
    rest = "".join(kept)
    return (rest.strip() if calls else rest), calls


def _parse_one(body: str) -> ToolCall | None:
    try:
        doc = json.loads(body.strip())
    except (json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("name"), str):
        return None
    args = doc.get("arguments", doc.get("parameters", {}))
    if isinstance(args, str):  # some models send the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(new_call_id(), doc["name"], json.dumps(args, ensure_ascii=False))


class ToolCallFilter:
    """Holds back streamed text from the first `<tool_call>` on (and any text that could start one), so tool-call
    markup never reaches `on_text`; `finish(release)` lets the held text out when it turned out not to be a call."""

    def __init__(self, on_text: Callable[[str], None] | None):
        self.on_text = on_text
        self.pending = ""
        self.inside = False

    def feed(self, piece: str) -> None:
        if self.inside:
            self.pending += piece
            return
        self.pending += piece
        at = self.pending.find(TOOL_CALL_START)
        if at >= 0:
            self._emit(self.pending[:at])
            self.pending, self.inside = self.pending[at:], True
            return
        hold = next((k for k in range(min(len(TOOL_CALL_START) - 1, len(self.pending)), 0, -1)
                     if self.pending.endswith(TOOL_CALL_START[:k])), 0)
        cut = len(self.pending) - hold
        self._emit(self.pending[:cut])
        self.pending = self.pending[cut:]

    def _emit(self, s: str) -> None:
        if s and self.on_text is not None:
            self.on_text(s)

    def finish(self, release: bool) -> None:
        if release or not self.inside:
            self._emit(self.pending)
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
                        fn["arguments"] = json.loads(fn["arguments"])
                    except json.JSONDecodeError:
                        pass
                c["function"] = fn
                calls.append(c)
            d["tool_calls"] = calls
        out.append(d)
    return out


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """An OpenAI-shaped conversation, checked: system/user/assistant/tool messages with string content (an
    assistant's may be null beside tool_calls; a tool's carries tool_call_id)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise QwenEdgeError("messages: expected a non-empty list")
    out = []
    for n, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise QwenEdgeError(f"messages[{n}]: expected an object")
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant", "tool"):
            raise QwenEdgeError(f"messages[{n}]: role {role!r} (expected system, user, assistant or tool)")
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
        d["content"] = content
        calls = m.get("tool_calls")
        if calls is not None:
            if role != "assistant" or not isinstance(calls, list):
                raise QwenEdgeError(f"messages[{n}]: tool_calls belong to an assistant message, as a list")
            for c in calls:
                fn = c.get("function") if isinstance(c, Mapping) else None
                if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
                    raise QwenEdgeError(f"messages[{n}]: each tool call needs function.name")
        out.append(d)
    return out
