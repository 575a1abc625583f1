"""The OpenAI protocol of `qwen-edge serve`, plain Python with no web framework: request parsing and validation
(`parse_chat_request`, `parse_completion_request`: a bad field is an `ApiError`, 400 with an OpenAI-style body
naming it), the operator's caps (`Limits`), and the response shapes and SSE chunks."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, cast

from ..errors import QwenEdgeError, first_line
from ..runtime.sampling import Sampling

FINISH_TO_OPENAI = {"stop": "stop", "stop_string": "stop", "length": "length", "context": "length",
                    "tool_calls": "tool_calls", "cancelled": "stop"}
"""TurnResult / GenerationResult finish reasons -> OpenAI's."""

THINKING_BUDGET_FIELD = "thinking_budget"
"""The request field that caps Qwen3's thinking, in tokens (the Python API's name; llama.cpp's server calls its flag
--reasoning-budget)."""


# --- errors --------------------------------------------------------------------------------------------------------
class ApiError(Exception):
    """An HTTP error with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(param: str | None, message: str) -> ApiError:
    return ApiError(400, message, param=param)


# --- operator caps ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Limits:
    """What one request may hold (the `serve` flags in brackets): a request over a cap gets 400 naming the field."""

    max_tokens: int = 4096
    """[--max-tokens] The most tokens one request may generate; a request without max_tokens gets this many (or what
    the context has left)."""
    deadline_s: float = 300.0
    """[--timeout] Seconds one generation may run (prefill included); past it the reply ends as it is, finish_reason
    "length"."""
    max_stop: int = 16
    """[--max-stop] Stop strings per request (OpenAI takes 4)."""
    max_stop_chars: int = 256
    """The longest stop string, in characters."""
    parse_timeout_s: float = 10.0
    """Seconds a request's schema may take to compile (off the event loop); longer is 400."""

    def __post_init__(self) -> None:
        for name in ("max_tokens", "max_stop", "max_stop_chars"):
            if getattr(self, name) < 1:
                raise QwenEdgeError(f"--{name.replace('_', '-')} must be >= 1, not {getattr(self, name)}")
        if not (self.deadline_s > 0 and math.isfinite(self.deadline_s)):
            raise QwenEdgeError(f"--timeout must be a positive number of seconds, not {self.deadline_s}")


DEFAULT_LIMITS = Limits()
PREFILL_CHUNK = 256
"""Prompt tokens prefilled between two looks at the request's cancel flag and deadline."""


# --- request parsing ----------------------------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


SEED_RANGE = (-(2**63), 2**64)
"""Seeds taken: any int64 or uint64 (a negative one is read as its two's complement, as a C client's would be)."""


def _opt(body: Mapping[str, Any], name: str, check: Callable[[Any], bool], what: str) -> Any:
    v = body.get(name)
    if v is not None and not check(v):
        raise bad_request(name, f"'{name}' must be {what}, not {json.dumps(v)[:60]}")
    return v


def _checked(param: str, check: Callable[[], Any]) -> Any:
    """Run one of the library's checks; its QwenEdgeError becomes a 400 naming the field (messages[3], tools...)."""
    try:
        return check()
    except QwenEdgeError as e:
        msg = first_line(e)
        m = re.match(r"(messages\[\d+\])", msg)
        raise bad_request(m.group(1) if m else param, msg) from None


def parse_messages(raw: Any) -> list[dict[str, Any]]:
    """OpenAI messages, checked by the chat's own rules (tools.check_messages); "developer" is a system message."""
    from ..runtime.tools import check_messages

    if isinstance(raw, list):
        raw = [dict(m, role="system") if isinstance(m, dict) and m.get("role") == "developer" else m for m in raw]
    return cast("list[dict[str, Any]]", _checked("messages", lambda: check_messages(raw)))


def _parse_stop(body: Mapping[str, Any], limits: Limits) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise bad_request("stop", "'stop' must be a string or a list of strings")
    if len(stop) > limits.max_stop:
        raise bad_request("stop", f"'stop' has {len(stop)} strings; at most {limits.max_stop} (--max-stop)")
    if any(len(s) > limits.max_stop_chars for s in stop):
        raise bad_request("stop", f"'stop' strings are at most {limits.max_stop_chars} characters")
    return [s for s in stop if s]


def _parse_sampling(body: Mapping[str, Any], generation_config: Mapping[str, Any]) -> Sampling:
    """The model's generation_config defaults, overridden by the request (temperature 0 = greedy)."""
    t = _opt(body, "temperature", lambda v: _is_num(v) and 0 <= v <= 2, "a number in [0, 2]")
    top_p = _opt(body, "top_p", lambda v: _is_num(v) and 0 < v <= 1, "a number in (0, 1]")
    top_k = _opt(body, "top_k", lambda v: _is_int(v) and v >= 0, "an integer >= 0")
    min_p = _opt(body, "min_p", lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)")
    rep = _opt(body, "repetition_penalty", lambda v: _is_num(v) and v > 0, "a number > 0")
    seed = _opt(body, "seed", lambda v: _is_int(v) and SEED_RANGE[0] <= v < SEED_RANGE[1], "a 64-bit integer")
    presence, frequency = (_opt(body, name, lambda v: _is_num(v) and -2 <= v <= 2, "a number in [-2, 2]")
                           for name in ("presence_penalty", "frequency_penalty"))
    try:
        s = Sampling.from_generation_config(generation_config, temperature=t, top_p=top_p, top_k=top_k,
                                            min_p=min_p, repetition_penalty=rep, presence_penalty=presence,
                                            frequency_penalty=frequency)
    except QwenEdgeError as e:
        raise bad_request("temperature", first_line(e)) from None
    # An unseeded sampled request differs run to run, as OpenAI's do; a seed makes it repeatable.
    return dataclasses.replace(s, seed=None if seed is None else seed % 2**64)


def _parse_n(body: Mapping[str, Any]) -> None:
    n = body.get("n")
    if n is not None and n != 1:
        raise bad_request("n", f"'n' must be 1 (one choice per request), not {json.dumps(n)[:20]}")


def _parse_max_tokens(body: Mapping[str, Any], limits: Limits, *names: str) -> int | None:
    out = None
    for name in names:
        v = _opt(body, name, lambda v: _is_int(v) and v >= 1, "an integer >= 1")
        if v is not None and v > limits.max_tokens:
            raise bad_request(name, f"'{name}' is {v}; this server generates at most {limits.max_tokens} tokens per "
                       "request (--max-tokens)")
        out = v if v is not None else out
    return out


def _parse_stream(body: Mapping[str, Any]) -> tuple[bool, bool]:
    stream = _opt(body, "stream", lambda v: isinstance(v, bool), "a boolean") or False
    opts = _opt(body, "stream_options", lambda v: isinstance(v, dict), "an object") or {}
    usage = opts.get("include_usage", False)
    if not isinstance(usage, bool):
        raise bad_request("stream_options.include_usage", "'stream_options.include_usage' must be a boolean")
    return stream, usage


@dataclass
class ChatRequest:
    """A validated /v1/chat/completions request, in the terms of ChatSession.complete."""

    messages: list[dict[str, Any]]
    sampling: Sampling
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = "auto"
    response_format: dict[str, Any] | None = None
    thinking: bool | None = None
    thinking_budget: int | None = None
    stream: bool = False
    include_usage: bool = False


def _parse_tools(body: Mapping[str, Any]) -> tuple[list[dict[str, Any]] | None, Any]:
    """The tools and tool_choice; a forced choice's grammar is compiled now (a bad parameters schema is a 400)."""
    from ..runtime.constrain import tool_call
    from ..runtime.tools import check_tools, choice_name

    tools = body.get("tools")
    checked = _checked("tools", lambda: check_tools(tools)) if tools is not None else None
    choice = body.get("tool_choice")
    if choice is None:
        return checked or None, "auto"
    mode, name = _checked("tool_choice", lambda: choice_name(choice, checked or []))
    if mode in ("required", "named") and checked:
        _checked("tools", lambda: tool_call(checked, name))
    return checked or None, choice


def _parse_response_format(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """The response_format, checked by compiling its constraint now (a bad schema is a 400, not a failed job)."""
    from ..runtime.constrain import from_response_format

    rf = body.get("response_format")
    if rf is None:
        return None
    return None if _checked("response_format", lambda: from_response_format(rf)) is None else dict(rf)


def parse_chat_request(body: Any, generation_config: Mapping[str, Any], limits: Limits = DEFAULT_LIMITS
                       ) -> ChatRequest:
    """Validate a /v1/chat/completions body (ApiError 400 naming the bad field)."""
    if not isinstance(body, dict):
        raise bad_request(None, "the request body must be a JSON object")
    _parse_n(body)
    messages = parse_messages(body.get("messages"))
    tools, choice = _parse_tools(body)
    kwargs = _opt(body, "chat_template_kwargs", lambda v: isinstance(v, dict), "an object") or {}
    thinking = kwargs.get("enable_thinking")
    if thinking is not None and not isinstance(thinking, bool):
        raise bad_request("chat_template_kwargs.enable_thinking", "'chat_template_kwargs.enable_thinking' must be a boolean")
    budget = _opt(body, THINKING_BUDGET_FIELD, lambda v: _is_int(v) and v >= 0, "an integer >= 0")
    stream, usage = _parse_stream(body)
    return ChatRequest(messages=messages, sampling=_parse_sampling(body, generation_config),
                       max_tokens=_parse_max_tokens(body, limits, "max_tokens", "max_completion_tokens"),
                       stop=_parse_stop(body, limits), tools=tools, tool_choice=choice,
                       response_format=_parse_response_format(body), thinking=thinking, thinking_budget=budget,
                       stream=stream, include_usage=usage)


@dataclass
class CompletionRequest:
    """A validated /v1/completions request."""

    prompt: str | list[int]
    sampling: Sampling
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def parse_completion_request(body: Any, generation_config: Mapping[str, Any], limits: Limits = DEFAULT_LIMITS
                             ) -> CompletionRequest:
    """Validate a /v1/completions body: one prompt (a string, a one-string list, or token ids)."""
    if not isinstance(body, dict):
        raise bad_request(None, "the request body must be a JSON object")
    _parse_n(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    ok_ids = isinstance(prompt, list) and prompt and all(_is_int(i) and i >= 0 for i in prompt)
    if not (isinstance(prompt, str) and prompt) and not ok_ids:
        raise bad_request("prompt", "'prompt' must be a non-empty string (or a list of token ids); one prompt per request")
    if body.get("echo"):
        raise bad_request("echo", "'echo' is not supported")
    stream, usage = _parse_stream(body)
    max_tokens = _parse_max_tokens(body, limits, "max_tokens")
    return CompletionRequest(prompt=cast("str | list[int]", prompt), sampling=_parse_sampling(body, generation_config),
                             max_tokens=min(16, limits.max_tokens) if max_tokens is None else max_tokens,
                             stop=_parse_stop(body, limits),
                             stream=stream, include_usage=usage)


# --- responses ----------------------------------------------------------------------------------------------------
class Reply(Protocol):
    """What a response names of its job (engine.Job): its id, creation time and kind ("chat" or "completion")."""

    id: str
    created: int
    kind: str


def _usage(result: Any) -> dict[str, Any]:
    p, c = len(result.prompt_ids), len(result.output_ids)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": int(result.stats.reused_tokens)}}


def _tool_calls(result: Any) -> list[dict[str, Any]]:
    return [c.to_openai() for c in result.tool_calls]


def _finish(result: Any) -> str:
    return FINISH_TO_OPENAI.get(result.finish_reason, "stop")


def chat_response(job: Reply, model: str, result: Any) -> dict[str, Any]:
    calls = _tool_calls(result)
    msg: dict[str, Any] = {"role": "assistant", "content": result.text if (result.text or not calls) else None}
    if result.thinking is not None:
        msg["reasoning_content"] = result.thinking
    if calls:
        msg["tool_calls"] = calls
    return {"id": job.id, "object": "chat.completion", "created": job.created, "model": model,
            "choices": [{"index": 0, "message": msg, "logprobs": None, "finish_reason": _finish(result)}],
            "usage": _usage(result)}


def completion_response(job: Reply, model: str, result: Any) -> dict[str, Any]:
    return {"id": job.id, "object": "text_completion", "created": job.created, "model": model,
            "choices": [{"index": 0, "text": result.text, "logprobs": None,
                         "finish_reason": FINISH_TO_OPENAI.get(result.finish_reason, "stop")}],
            "usage": _usage(result)}


def sse(doc: Any) -> str:
    return f"data: {json.dumps(doc, ensure_ascii=False)}\n\n"


class Chunks:
    """The SSE chunks of one streamed response (chat.completion.chunk or text_completion)."""

    def __init__(self, job: Reply, model: str, include_usage: bool):
        self.job, self.model, self.include_usage = job, model, include_usage
        self.chat = job.kind == "chat"

    def chunk(self, delta: dict[str, Any] | None = None, text: str = "", finish: str | None = None) -> str:
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            choice["delta"] = delta or {}
        else:
            choice["text"] = text
        choice.update({"logprobs": None, "finish_reason": finish})
        doc: dict[str, Any] = {"id": self.job.id, "object": "chat.completion.chunk" if self.chat else
                               "text_completion", "created": self.job.created, "model": self.model,
                               "choices": [choice]}
        if self.include_usage:
            doc["usage"] = None
        return sse(doc)

    def event(self, kind: str, value: Any) -> str:
        """A "text", "thinking" or "tool" event (a tool call as generated, as OpenAI streams them: its index, id,
        type and name first with arguments "", then the argument text in pieces)."""
        if not self.chat:
            return self.chunk(text=value)
        key = {"text": "content", "thinking": "reasoning_content", "tool": "tool_calls"}[kind]
        return self.chunk({key: [value] if kind == "tool" else value})

    def end(self, result: Any) -> list[str]:
        out = [self.chunk(finish=_finish(result))]
        if self.include_usage:
            out.append(sse({"id": self.job.id, "object": "chat.completion.chunk" if self.chat else
                             "text_completion", "created": self.job.created, "model": self.model, "choices": [],
                             "usage": _usage(result)}))
        return out
