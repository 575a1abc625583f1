"""`qwen-edge serve`: an OpenAI-compatible HTTP server over one loaded artifact (the `[serve]` extra).

Starlette routes on uvicorn. The model runs in one worker thread, never on the event loop: one generation at a time,
a bounded queue of waiting requests (503 when full), a cancel Event per request (set when its client disconnects or
the server shuts down). Chat requests go through `ChatSession.complete` on one session, so a conversation extended
request after request reuses its KV-cache prefix; `/v1/completions` runs `generate` on the same runtime.

Request parsing (`parse_chat_request`, `parse_completion_request`) is plain Python with no web framework, so the
OpenAI field rules live in one place: a bad field is an `ApiError` (400, OpenAI-style body naming the field).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import ipaddress
import json
import math
import os
import re
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Mapping, Sequence, cast

from .errors import NotAvailable, QwenEdgeError, first_line
from .log import logger
from .runtime.sampling import Sampling

if TYPE_CHECKING:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response

    from .runtime.chat import ChatSession

EXTRA_HINT = "pip install 'qwen-edge[serve]'"

FINISH_TO_OPENAI = {"stop": "stop", "stop_string": "stop", "length": "length", "context": "length",
                    "tool_calls": "tool_calls", "cancelled": "stop"}
"""TurnResult / GenerationResult finish reasons -> OpenAI's."""

THINKING_BUDGET_FIELD = "thinking_budget"
"""The request field that caps Qwen3's thinking, in tokens (the Python API's name; llama.cpp's server calls its flag
--reasoning-budget)."""


def require_extra() -> None:
    """NotAvailable (exit 2, one line) when the [serve] extra is not installed."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise NotAvailable(f"qwen-edge serve needs the [serve] extra ({e.name or e} missing): {EXTRA_HINT}") from None


# --- errors --------------------------------------------------------------------------------------------------------
class ApiError(Exception):
    """An HTTP error with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(param: str | None, message: str) -> ApiError:
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
        raise _bad(name, f"'{name}' must be {what}, not {json.dumps(v)[:60]}")
    return v


def _checked(param: str, check: Callable[[], Any]) -> Any:
    """Run one of the library's checks; its QwenEdgeError becomes a 400 naming the field (messages[3], tools...)."""
    try:
        return check()
    except QwenEdgeError as e:
        msg = first_line(e)
        m = re.match(r"(messages\[\d+\])", msg)
        raise _bad(m.group(1) if m else param, msg) from None


def parse_messages(raw: Any) -> list[dict[str, Any]]:
    """OpenAI messages, checked by the chat's own rules (tools.check_messages); "developer" is a system message."""
    from .tools import check_messages

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
        raise _bad("stop", "'stop' must be a string or a list of strings")
    if len(stop) > limits.max_stop:
        raise _bad("stop", f"'stop' has {len(stop)} strings; at most {limits.max_stop} (--max-stop)")
    if any(len(s) > limits.max_stop_chars for s in stop):
        raise _bad("stop", f"'stop' strings are at most {limits.max_stop_chars} characters")
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
        raise _bad("temperature", first_line(e)) from None
    # An unseeded sampled request differs run to run, as OpenAI's do; a seed makes it repeatable.
    return dataclasses.replace(s, seed=None if seed is None else seed % 2**64)


def _parse_n(body: Mapping[str, Any]) -> None:
    n = body.get("n")
    if n is not None and n != 1:
        raise _bad("n", f"'n' must be 1 (one choice per request), not {json.dumps(n)[:20]}")


def _parse_max_tokens(body: Mapping[str, Any], limits: Limits, *names: str) -> int | None:
    out = None
    for name in names:
        v = _opt(body, name, lambda v: _is_int(v) and v >= 1, "an integer >= 1")
        if v is not None and v > limits.max_tokens:
            raise _bad(name, f"'{name}' is {v}; this server generates at most {limits.max_tokens} tokens per "
                       "request (--max-tokens)")
        out = v if v is not None else out
    return out


def _parse_stream(body: Mapping[str, Any]) -> tuple[bool, bool]:
    stream = _opt(body, "stream", lambda v: isinstance(v, bool), "a boolean") or False
    opts = _opt(body, "stream_options", lambda v: isinstance(v, dict), "an object") or {}
    usage = opts.get("include_usage", False)
    if not isinstance(usage, bool):
        raise _bad("stream_options.include_usage", "'stream_options.include_usage' must be a boolean")
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
    from .runtime.constrain import tool_call
    from .tools import check_tools, choice_name

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
    from .runtime.constrain import from_response_format

    rf = body.get("response_format")
    if rf is None:
        return None
    return None if _checked("response_format", lambda: from_response_format(rf)) is None else dict(rf)


def parse_chat_request(body: Any, generation_config: Mapping[str, Any], limits: Limits = DEFAULT_LIMITS
                       ) -> ChatRequest:
    """Validate a /v1/chat/completions body (ApiError 400 naming the bad field)."""
    if not isinstance(body, dict):
        raise _bad(None, "the request body must be a JSON object")
    _parse_n(body)
    messages = parse_messages(body.get("messages"))
    tools, choice = _parse_tools(body)
    kwargs = _opt(body, "chat_template_kwargs", lambda v: isinstance(v, dict), "an object") or {}
    thinking = kwargs.get("enable_thinking")
    if thinking is not None and not isinstance(thinking, bool):
        raise _bad("chat_template_kwargs.enable_thinking", "'chat_template_kwargs.enable_thinking' must be a boolean")
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
        raise _bad(None, "the request body must be a JSON object")
    _parse_n(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    ok_ids = isinstance(prompt, list) and prompt and all(_is_int(i) and i >= 0 for i in prompt)
    if not (isinstance(prompt, str) and prompt) and not ok_ids:
        raise _bad("prompt", "'prompt' must be a non-empty string (or a list of token ids); one prompt per request")
    if body.get("echo"):
        raise _bad("echo", "'echo' is not supported")
    stream, usage = _parse_stream(body)
    max_tokens = _parse_max_tokens(body, limits, "max_tokens")
    return CompletionRequest(prompt=cast("str | list[int]", prompt), sampling=_parse_sampling(body, generation_config),
                             max_tokens=min(16, limits.max_tokens) if max_tokens is None else max_tokens,
                             stop=_parse_stop(body, limits),
                             stream=stream, include_usage=usage)


# --- the engine: one model, one worker thread, a bounded queue ----------------------------------------------------
class Job:
    """One request's generation: its cancel Event and the events the worker thread sends back to the event loop.

    Events: ("text", str), ("thinking", str), ("tool", a streamed tool-call delta), ("done", result),
    ("error", ApiError).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, kind: str):
        self.loop = loop
        self.kind = kind
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.cancel = threading.Event()
        self.deadline: float | None = None
        """time.monotonic() past which the generation stops (set when it starts)."""
        self.timed_out = False
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def put(self, kind: str, value: Any) -> None:
        """Called from the worker thread."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


@dataclass
class EngineStats:
    served: int = 0
    cancelled: int = 0
    errors: int = 0
    rejected: int = 0


class _CancellablePrefill:
    """The session's runtime, its prefill run PREFILL_CHUNK tokens at a time with a look at `stopped()` between
    chunks: a request cancelled (its client gone) or past its deadline frees the model within one chunk, not after
    the whole prompt. It stops the way Ctrl-C does (KeyboardInterrupt), which `generate` turns into a "cancelled"
    result with the KV cache rewound to what it held before."""

    def __init__(self, runtime: Any):
        self._runtime = runtime
        self.stopped: Callable[[], bool] = lambda: False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runtime, name)

    def prefill(self, ids: Sequence[int]) -> None:
        ids = list(ids)
        for at in range(0, len(ids), PREFILL_CHUNK):
            if self.stopped():
                raise KeyboardInterrupt
            self._runtime.prefill(ids[at: at + PREFILL_CHUNK])


class Engine:
    """One loaded model behind a single worker thread: `queue` requests may wait while one generates."""

    def __init__(self, session: ChatSession, model_id: str, *, queue: int = 8,
                 generation_config: Mapping[str, Any] | None = None, limits: Limits = DEFAULT_LIMITS):
        if queue < 0:
            raise QwenEdgeError(f"--queue must be >= 0, not {queue}")
        self.limits = limits
        self.prefill = _CancellablePrefill(session.runtime)
        session.runtime = cast("Any", self.prefill)
        self.session = session
        self.model_id = model_id
        self.queue = int(queue)
        self.generation_config = dict(generation_config or {})
        self.created = int(time.time())
        self.stats = EngineStats()
        self.active = 0
        """Admitted requests not finished yet (running + waiting); only touched on the event loop."""
        self.shutdown = threading.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qwen-edge-model")

    @property
    def busy(self) -> bool:
        return self.active > 0

    def submit(self, kind: str, work: Callable[[Job], Any]) -> Job:
        """Admit a request (503 when the queue is full) and run `work(job)` on the model thread in turn."""
        if self.active >= 1 + self.queue:
            self.stats.rejected += 1
            raise ApiError(503, f"the server is busy: one request generating and {self.queue} waiting (--queue "
                           f"{self.queue}); retry later", type="server_error", code="server_busy")
        loop = asyncio.get_running_loop()
        job = Job(loop, kind)
        self.active += 1

        def run() -> None:
            final = self._run(job, work)
            # the slot frees in the same event-loop step that hands the result over, so a client that sends its
            # next request as soon as it has this answer is never refused for a slot not yet freed
            loop.call_soon_threadsafe(self._deliver, job, final)

        loop.run_in_executor(self._executor, run)
        return job

    def _deliver(self, job: Job, final: tuple[str, Any]) -> None:
        self.active -= 1
        job.events.put_nowait(final)

    def _run(self, job: Job, work: Callable[[Job], Any]) -> tuple[str, Any]:
        """On the model thread: the job's final event, ("done", result) or ("error", ApiError)."""
        if job.cancel.is_set() or self.shutdown.is_set():
            self.stats.cancelled += 1
            logger.info(f"{job.id}: cancelled before it started")
            return "error", ApiError(499, "cancelled before it started", type="cancelled")
        job.deadline = time.monotonic() + self.limits.deadline_s
        self.prefill.stopped = self.cancelled_now(job)
        try:
            result = work(job)
        except ApiError as e:
            self.stats.errors += 1
            return "error", e
        except QwenEdgeError as e:
            self.stats.errors += 1
            return "error", ApiError(400, first_line(e))
        except Exception as e:  # a bug: the request fails, the server goes on
            self.stats.errors += 1
            logger.exception(f"{job.id}: internal error")
            return "error", ApiError(500, f"internal error: {type(e).__name__}: {first_line(e)}", type="server_error")
        finally:
            self.prefill.stopped = lambda: False
        if job.timed_out and not job.cancel.is_set():
            logger.warning(f"{job.id}: stopped at its deadline ({self.limits.deadline_s:g} s, --timeout) after "
                           f"{len(result.output_ids)} generated tokens")
            result.finish_reason = "length"  # cut short, as by max_tokens: the reply is what was generated
            self.stats.served += 1
        elif result.finish_reason == "cancelled" or job.cancel.is_set():
            self.stats.cancelled += 1
            logger.info(f"{job.id}: cancelled after {len(result.output_ids)} generated tokens")
        else:
            self.stats.served += 1
            logger.debug(f"{job.id}: {result.finish_reason}, {len(result.prompt_ids)} prompt tokens "
                         f"({result.stats.reused_tokens} cached), {len(result.output_ids)} generated")
        return "done", result

    def cancelled_now(self, job: Job) -> Callable[[], bool]:
        """The job's stop signal: its client left, the server is stopping, or its deadline passed."""
        def stop() -> bool:
            if job.cancel.is_set() or self.shutdown.is_set():
                return True
            if job.deadline is not None and time.monotonic() > job.deadline:
                job.timed_out = True
            return job.timed_out
        return stop

    def close(self) -> None:
        self.shutdown.set()
        self._executor.shutdown(wait=True)
        self.session.close()

    # --- the work, on the model thread ---------------------------------------------------------------------------
    def chat_work(self, req: ChatRequest) -> Callable[[Job], Any]:
        def work(job: Job) -> Any:
            on_text = (lambda s: job.put("text", s)) if req.stream else None
            on_thinking = (lambda s: job.put("thinking", s)) if req.stream else None
            on_tool_call = (lambda d: job.put("tool", d)) if req.stream else None
            max_tokens = self.limits.max_tokens if req.max_tokens is None else req.max_tokens
            return self.session.complete(req.messages, tools=req.tools, tool_choice=req.tool_choice,
                                         response_format=req.response_format, thinking=req.thinking,
                                         thinking_budget=req.thinking_budget, sampling=req.sampling,
                                         max_new_tokens=max_tokens, stop=req.stop, on_text=on_text,
                                         on_thinking=on_thinking, on_tool_call=on_tool_call,
                                         cancel=self.cancelled_now(job))
        return work

    def completion_work(self, req: CompletionRequest) -> Callable[[Job], Any]:
        def work(job: Job) -> Any:
            from .runtime.generate import generate

            s = self.session
            ids = list(req.prompt) if isinstance(req.prompt, list) else s.tokenizer.encode(req.prompt)
            if max(ids, default=0) >= s.tokenizer.vocab_size:
                raise _bad("prompt", f"'prompt' token ids must be below {s.tokenizer.vocab_size}")
            try:
                return generate(s.runtime, ids, sampling=req.sampling, max_new_tokens=req.max_tokens,
                                stop_ids=s.stop_ids, stop_strings=req.stop, tokenizer=s.tokenizer,
                                on_text=(lambda t: job.put("text", t)) if req.stream else None,
                                cancel=self.cancelled_now(job))
            finally:
                s.runtime.reset()  # the chat session's cached prefix is gone: it sees an empty cache next time
        return work


# --- responses ----------------------------------------------------------------------------------------------------
def _usage(result: Any) -> dict[str, Any]:
    p, c = len(result.prompt_ids), len(result.output_ids)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": int(result.stats.reused_tokens)}}


def _tool_calls(result: Any) -> list[dict[str, Any]]:
    return [c.to_openai() for c in result.tool_calls]


def _finish(result: Any) -> str:
    return FINISH_TO_OPENAI.get(result.finish_reason, "stop")


def chat_response(job: Job, model: str, result: Any) -> dict[str, Any]:
    calls = _tool_calls(result)
    msg: dict[str, Any] = {"role": "assistant", "content": result.text if (result.text or not calls) else None}
    if result.thinking is not None:
        msg["reasoning_content"] = result.thinking
    if calls:
        msg["tool_calls"] = calls
    return {"id": job.id, "object": "chat.completion", "created": job.created, "model": model,
            "choices": [{"index": 0, "message": msg, "logprobs": None, "finish_reason": _finish(result)}],
            "usage": _usage(result)}


def completion_response(job: Job, model: str, result: Any) -> dict[str, Any]:
    return {"id": job.id, "object": "text_completion", "created": job.created, "model": model,
            "choices": [{"index": 0, "text": result.text, "logprobs": None,
                         "finish_reason": FINISH_TO_OPENAI.get(result.finish_reason, "stop")}],
            "usage": _usage(result)}


def _sse(doc: Any) -> str:
    return f"data: {json.dumps(doc, ensure_ascii=False)}\n\n"


class _Chunks:
    """The SSE chunks of one streamed response (chat.completion.chunk or text_completion)."""

    def __init__(self, job: Job, model: str, include_usage: bool):
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
        return _sse(doc)

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
            out.append(_sse({"id": self.job.id, "object": "chat.completion.chunk" if self.chat else
                             "text_completion", "created": self.job.created, "model": self.model, "choices": [],
                             "usage": _usage(result)}))
        return out


# --- the app ------------------------------------------------------------------------------------------------------
DISCONNECT_POLL_S = 0.1
MAX_BODY_BYTES = 16 << 20
"""The largest request body read (16 MiB: far above any conversation a small model's context holds); more is 413."""
API_KEY_ENV = "QWEN_EDGE_API_KEY"
"""Where `serve` takes its API key when --api-key is not given (a key on the command line shows in `ps`)."""
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
"""The Host names a loopback-bound server answers (plus --allow-host): a DNS-rebinding page sends its own name."""
MAX_INT_DIGITS = 100
"""Longer JSON integers are read as infinity, so the field they are in is refused by name (Python refuses to read
integers over 4,300 digits at all)."""


def is_loopback(host: str) -> bool:
    """Whether binding `host` listens on this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_name(header: str) -> str:
    """The name of a Host header, without its port: "[::1]:8080" -> "::1", "LocalHost:80" -> "localhost"."""
    h = header.strip().lower()
    if h.startswith("["):
        return h[1: h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


_ORIGIN = re.compile(r"(https?)://(\[[0-9a-f:.]+\]|[a-z0-9.\-]+)(?::(\d{1,5}))?/?")


def is_loopback_origin(origin: str) -> bool:
    """Whether a browser `Origin` is a page served from this machine: http(s) on localhost, 127.0.0.0/8 or [::1],
    any port ("null", file pages, userinfo and other names are not)."""
    m = _ORIGIN.fullmatch(origin.strip().lower())
    return m is not None and is_loopback(m.group(2))


def _parse_int(digits: str) -> int | float:
    return int(digits) if len(digits.lstrip("-")) <= MAX_INT_DIGITS else math.inf


class _Guard:
    """ASGI middleware in front of every route: on a loopback bind, only loopback Host names (and `allowed_hosts`)
    are answered (403 otherwise: DNS rebinding); a request that carries an `Origin` (a browser's) is answered only
    from a loopback origin or one of `origins` ("*": any; 403 otherwise: a page elsewhere cannot even start a
    generation); a POST must send `Content-Type: application/json` (415 otherwise: a web page can POST text/plain
    cross-origin with no CORS preflight)."""

    def __init__(self, app: Any, hosts: Sequence[str] | None, origins: Sequence[str] = ()):
        self.app = app
        self.hosts = None if hosts is None else {h.lower().strip("[]") for h in hosts}
        self.origins = {o.strip().lower().rstrip("/") for o in origins}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        err = None
        if self.hosts is not None and _host_name(headers.get("host", "")) not in self.hosts:
            err = ApiError(403, f"Host {headers.get('host', '')!r} is not served: this server answers "
                           f"{', '.join(sorted(self.hosts))} (--allow-host NAME adds one)", code="host_not_allowed")
        elif "origin" in headers and not self._origin_ok(headers["origin"]):
            err = ApiError(403, f"Origin {headers['origin'][:100]!r} is not allowed: this server answers pages from "
                           "localhost, 127.0.0.1 and [::1] (--allow-origin ORIGIN adds one)", code="origin_not_allowed")
        elif scope["method"] == "POST":
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                err = ApiError(415, f"Content-Type must be application/json, not {kind or 'none'!r}",
                               code="unsupported_media_type")
        if err is None:
            return await self.app(scope, receive, send)
        from starlette.responses import JSONResponse

        await JSONResponse(err.body(), status_code=err.status)(scope, receive, send)

    def _origin_ok(self, origin: str) -> bool:
        return "*" in self.origins or origin.strip().lower().rstrip("/") in self.origins or is_loopback_origin(origin)


def create_app(engine: Engine, *, api_key: str | None = None, allow_origins: Sequence[str] = (),
               max_body_bytes: int = MAX_BODY_BYTES, allowed_hosts: Sequence[str] | None = None) -> Starlette:
    """The Starlette app: /v1/chat/completions, /v1/completions, /v1/models, /health.

    `allow_origins`: browser origins allowed to call it besides this machine's own (CORS headers are sent to these
    only; "*" for any); none by default, so a web page on another origin gets 403 and cannot drive a local model
    unless the user says so. `allowed_hosts`: the Host names answered (None: any; `serve` gives LOOPBACK_HOSTS and
    --allow-host on a loopback bind).
    """
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    def error(e: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")

    async def read_body(request: Request) -> bytes:
        too_big = ApiError(413, f"the request body is over {max_body_bytes} bytes", code="request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body_bytes:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    def parse_body(raw: bytes, parse: Callable[..., Any]) -> Any:
        """JSON and the request's checks (a response_format or tool schema compiles here), on a parser thread."""
        try:
            body = json.loads(raw, parse_int=_parse_int)
        except (ValueError, RecursionError) as e:
            raise _bad(None, f"the request body is not valid JSON ({first_line(e)})") from None
        return parse(body, engine.generation_config, engine.limits)

    parser = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qwen-edge-parse")
    parsing = [0]

    async def parsed(request: Request, parse: Callable[..., Any]) -> Any:
        """The request, parsed off the event loop (a heavy schema stalls no stream nor /health); as many may wait
        as the model's queue holds (503 beyond), each at most Limits.parse_timeout_s (400 beyond)."""
        raw = await read_body(request)
        if parsing[0] >= 1 + engine.queue:
            raise ApiError(503, "the server is busy checking other requests; retry later", type="server_error",
                           code="server_busy")
        parsing[0] += 1
        try:
            fut = asyncio.get_running_loop().run_in_executor(parser, parse_body, raw, parse)
            return await asyncio.wait_for(fut, engine.limits.parse_timeout_s)
        except asyncio.TimeoutError:
            raise _bad("response_format", f"the request's schemas did not compile within "
                       f"{engine.limits.parse_timeout_s:g} s") from None
        finally:
            parsing[0] -= 1

    async def next_event(job: Job, request: Request) -> tuple[str, Any] | None:
        """The job's next event, or None when the client went away (the job is then cancelled)."""
        while True:
            try:
                return await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    cancel(job, "client disconnected")
                    return None

    def cancel(job: Job, why: str) -> None:
        if not job.cancel.is_set():
            logger.info(f"{job.id}: {why}: cancelling")
            job.cancel.set()

    async def run(request: Request, kind: str, parse: Callable[[Any, Mapping[str, Any]], Any],
                  work: Callable[[Any], Callable[[Job], Any]], respond: Callable[[Job, str, Any], dict[str, Any]]
                  ) -> Response:
        try:
            check_key(request)
            req = await parsed(request, parse)
            job = engine.submit(kind, work(req))
        except ApiError as e:
            return error(e)
        first = await next_event(job, request)
        if first is None:
            return JSONResponse({}, status_code=499)
        if first[0] == "error":
            return error(first[1])
        if not req.stream:  # only "done" or "error" come to a request that does not stream
            return JSONResponse(respond(job, engine.model_id, first[1]))
        return StreamingResponse(stream(job, req, first), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def stream(job: Job, req: Any, first: tuple[str, Any]) -> AsyncIterator[str]:
        chunks = _Chunks(job, engine.model_id, req.include_usage)
        kind, value = first
        finished = False
        try:
            if job.kind == "chat":
                yield chunks.chunk({"role": "assistant", "content": ""})
            while True:
                if kind in ("text", "thinking", "tool"):
                    if value:
                        yield chunks.event(kind, value)
                elif kind == "done":
                    finished = True
                    for c in chunks.end(value):
                        yield c
                    break
                else:
                    finished = True
                    yield _sse(value.body())
                    break
                kind, value = await job.events.get()
            yield "data: [DONE]\n\n"
        finally:
            if not finished:  # the client went away mid-stream (Starlette cancels this generator)
                cancel(job, "client disconnected")

    async def chat_completions(request: Request) -> Response:
        return await run(request, "chat", parse_chat_request, engine.chat_work, chat_response)

    async def completions(request: Request) -> Response:
        return await run(request, "completion", parse_completion_request, engine.completion_work,
                         completion_response)

    async def models(request: Request) -> Response:
        try:
            check_key(request)
        except ApiError as e:
            return error(e)
        return JSONResponse({"object": "list", "data": [
            {"id": engine.model_id, "object": "model", "created": engine.created, "owned_by": "qwen-edge"}]})

    async def health(request: Request) -> Response:
        s = engine.stats
        return JSONResponse({"status": "ok", "model": engine.model_id, "busy": engine.busy,
                             "waiting": max(0, engine.active - 1), "queue": engine.queue, "served": s.served,
                             "cancelled": s.cancelled, "errors": s.errors, "rejected": s.rejected})

    async def http_error(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 500)
        detail = getattr(exc, "detail", None) or "error"
        return error(ApiError(status, f"{request.method} {request.url.path}: {detail}",
                              code="not_found" if status == 404 else None))

    middleware = [Middleware(_Guard, hosts=allowed_hosts, origins=allow_origins)]
    if allow_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(allow_origins), allow_methods=["GET", "POST"],
                                     allow_headers=["Authorization", "Content-Type"]))
    return Starlette(routes=[
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ], exception_handlers={HTTPException: http_error}, middleware=middleware)


# --- the server ---------------------------------------------------------------------------------------------------
def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise QwenEdgeError(f"--host {host}: cannot resolve ({e.strerror})") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise QwenEdgeError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    sock.set_inheritable(True)
    return sock


def serve(artifact: str | os.PathLike[str], *, host: str = "127.0.0.1", port: int = 8080,
          api_key: str | None = None, max_context: int | None = None, threads: int | None = None,
          queue: int = 8, target: str | None = None, device: str = "cpu", verbose: bool = False,
          allow_origins: Sequence[str] = (), allow_hosts: Sequence[str] = (), limits: Limits = DEFAULT_LIMITS,
          announce: Callable[[str], None] | None = None) -> int:
    """Load `artifact`, bind host:port (port 0: any free one) and serve until SIGINT/SIGTERM; returns 0.

    A bad artifact or a port that cannot be bound is a QwenEdgeError before anything listens. `announce` gets the
    one startup line (the URL); the CLI prints it on stderr. `api_key` None takes $QWEN_EDGE_API_KEY if set. On a
    loopback `host` only loopback Host names and `allow_hosts` are answered; beyond loopback without a key, a
    warning says that anyone who reaches the port can use the model.
    """
    require_extra()
    import uvicorn

    from .runtime.chat import ChatSession
    from .runtime.meta import model_meta

    if queue < 0:
        raise QwenEdgeError(f"--queue must be >= 0, not {queue}")
    if api_key is None:
        api_key = os.environ.get(API_KEY_ENV) or None
    if api_key is not None and (not api_key.strip() or any(c.isspace() for c in api_key)):
        raise QwenEdgeError("the API key must be a non-empty string without spaces")
    meta = model_meta(os.fspath(artifact))
    session = ChatSession.load(artifact, device=device, target=target, max_context=max_context, threads=threads)
    session.max_new_tokens = session.context_length  # no max_tokens: until a stop or the context is full
    model_id = os.path.basename(os.path.normpath(str(artifact)))
    engine = Engine(session, model_id, queue=queue, generation_config=meta.generation_config, limits=limits)
    try:
        sock = _bind(host, port)
    except BaseException:
        engine.close()
        raise
    loopback = is_loopback(host)
    if not loopback and api_key is None:
        logger.warning(f"warning: serving on {host} without an API key: anyone who can reach this port can use the "
                       f"model (--api-key or ${API_KEY_ENV} to require one)")
    app = create_app(engine, api_key=api_key, allow_origins=allow_origins,
                     allowed_hosts=[*LOOPBACK_HOSTS, *allow_hosts] if loopback else None)
    config = uvicorn.Config(app, log_level="info" if verbose else "warning", access_log=verbose,
                            timeout_graceful_shutdown=5, lifespan="off")
    server = _server(config, engine)
    bound = sock.getsockname()
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    info = session.runtime.info
    line = (f"serving {model_id} ({info.backend} {info.format}/{info.quant}, context {info.context_length}) on "
            f"http://{shown}:{bound[1]}/v1")
    (announce or (lambda s: None))(line)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        engine.close()
    return 0


def _server(config: uvicorn.Config, engine: Engine) -> uvicorn.Server:
    """A uvicorn.Server that cancels running generations on SIGINT/SIGTERM and exits 0 instead of re-raising them."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            engine.shutdown.set()
            super().handle_exit(sig, frame)
            self._captured_signals.clear()  # a clean stop: exit 0, not the signal again

    return Server(config)
