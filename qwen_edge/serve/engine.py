"""The engine of `qwen-edge serve`: one model, one worker thread, a bounded queue. The model never runs on the event
loop: one generation at a time, a bounded queue of waiting requests (503 when full), a cancel Event per request
(set when its client disconnects or the server shuts down). Chat requests go through `ChatSession.complete` on one
session, so a conversation extended request after request reuses its KV-cache prefix; `/v1/completions` runs
`generate` on the same runtime."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence, cast

from ..errors import QwenEdgeError, first_line
from ..log import logger
from .protocol import DEFAULT_LIMITS, PREFILL_CHUNK, ApiError, ChatRequest, CompletionRequest, Limits, bad_request

if TYPE_CHECKING:
    from ..runtime.chat import ChatSession


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
            from ..runtime.generate import generate

            s = self.session
            ids = list(req.prompt) if isinstance(req.prompt, list) else s.tokenizer.encode(req.prompt)
            if max(ids, default=0) >= s.tokenizer.vocab_size:
                raise bad_request("prompt", f"'prompt' token ids must be below {s.tokenizer.vocab_size}")
            try:
                return generate(s.runtime, ids, sampling=req.sampling, max_new_tokens=req.max_tokens,
                                stop_ids=s.stop_ids, stop_strings=req.stop, tokenizer=s.tokenizer,
                                on_text=(lambda t: job.put("text", t)) if req.stream else None,
                                cancel=self.cancelled_now(job), speculative=s.speculative)
            finally:
                s.runtime.reset()  # the chat session's cached prefix is gone: it sees an empty cache next time
        return work
