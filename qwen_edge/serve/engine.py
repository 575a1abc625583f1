"""The engine of `qwen-edge serve`: one model, N slots (one worker thread each), a bounded queue. The model never runs
on the event loop: up to N generations at a time (`--parallel N`; their decode steps batched by
runtime.batch.Scheduler), a bounded queue of waiting requests (503 when full), a cancel Event per request (set when
its client disconnects or the server shuts down). Each slot has its own ChatSession (its own KV cache): a request
goes to the free slot whose cache shares the longest prefix with its prompt, so a conversation extended request
after request reuses its prefix; `/v1/completions` runs `generate` on the slot's runtime, from the prefix it shares
with the slot's cache too."""

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
from .metrics import Metrics
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
    """One loaded model behind one worker thread per slot: `queue` requests may wait while the slots generate.

    `session`: one ChatSession (one slot), or one per slot, each on a SlotRuntime of one Scheduler (`scheduler`,
    whose batch runtime `close()` frees)."""

    def __init__(self, session: ChatSession | Sequence[ChatSession], model_id: str, *, queue: int = 8,
                 generation_config: Mapping[str, Any] | None = None, limits: Limits = DEFAULT_LIMITS,
                 scheduler: Any = None):
        if queue < 0:
            raise QwenEdgeError(f"--queue must be >= 0, not {queue}")
        self.limits = limits
        self.sessions = [session] if not isinstance(session, Sequence) else list(session)
        self.prefills = [_CancellablePrefill(s.runtime) for s in self.sessions]
        for s, p in zip(self.sessions, self.prefills):
            s.runtime = cast("Any", p)
        self.session, self.prefill = self.sessions[0], self.prefills[0]
        self.parallel = len(self.sessions)
        self.scheduler = scheduler
        self._free = list(range(self.parallel))
        self._last_used = [0] * self.parallel
        self._uses = 0
        self.metrics = Metrics()
        if scheduler is not None:
            scheduler.on_step = self.metrics.step
        self._lock = threading.Lock()
        self.model_id = model_id
        self.queue = int(queue)
        self.generation_config = dict(generation_config or {})
        self.created = int(time.time())
        self.stats = EngineStats()
        self.active = 0
        """Admitted requests not finished yet (running + waiting); only touched on the event loop."""
        self.shutdown = threading.Event()
        self._executor = ThreadPoolExecutor(max_workers=self.parallel, thread_name_prefix="qwen-edge-model")

    @property
    def busy(self) -> bool:
        return self.active > 0

    @property
    def waiting(self) -> int:
        return max(0, self.active - self.parallel)

    def submit(self, kind: str, work: Callable[[Job, ChatSession], Any],
               prompt: Callable[[ChatSession], Sequence[int] | None] = lambda s: None) -> Job:
        """Admit a request (503 when the queue is full) and run `work(job, session)` on a free slot in turn; the
        slot is the free one whose cache shares most with `prompt(session)` (the request's prompt ids)."""
        if self.active >= self.parallel + self.queue:
            self.stats.rejected += 1
            running = "one request generating" if self.parallel == 1 else f"{self.parallel} requests generating"
            raise ApiError(503, f"the server is busy: {running} and {self.queue} waiting (--queue "
                           f"{self.queue}); retry later", type="server_error", code="server_busy")
        loop = asyncio.get_running_loop()
        job = Job(loop, kind)
        self.active += 1

        def run() -> None:
            final = self._run(job, work, prompt)
            # the slot frees in the same event-loop step that hands the result over, so a client that sends its
            # next request as soon as it has this answer is never refused for a slot not yet freed
            loop.call_soon_threadsafe(self._deliver, job, final)

        loop.run_in_executor(self._executor, run)
        return job

    def _deliver(self, job: Job, final: tuple[str, Any]) -> None:
        self.active -= 1
        job.events.put_nowait(final)

    def _take_slot(self, prompt: Callable[[ChatSession], Sequence[int] | None]) -> int:
        """A free slot: the one whose cache this prompt continues (their common prefix is at least half of the
        prompt the slot last answered; the longest such), else the one used least recently, so a new conversation
        does not evict a cache another one may return to."""
        from ..runtime.chat import _common_prefix

        with self._lock:
            free = list(self._free)
        ids = None
        if len(free) > 1:
            try:
                ids = prompt(self.sessions[free[0]])
            except Exception:  # the work reports a bad request itself
                ids = None
        best = None
        if ids:
            held = {i: self.sessions[i]._cached[: self.sessions[i].runtime.n_cached] for i in free}
            common = {i: _common_prefix(held[i], ids) for i in free}

            def asked(i: int) -> int:  # the prompt part of what the slot holds (its reply may be re-rendered)
                last = self.sessions[i].last
                return min(len(held[i]), len(last.prompt_ids)) if last is not None else len(held[i])

            going_on = [i for i in free if common[i] and 2 * common[i] >= asked(i)]
            best = max(going_on, key=lambda i: common[i], default=None)
        if best is None:
            best = min(free, key=lambda i: self._last_used[i])
        with self._lock:
            self._free.remove(best)
            self._uses += 1
            self._last_used[best] = self._uses
        return best

    def _run(self, job: Job, work: Callable[[Job, ChatSession], Any],
             prompt: Callable[[ChatSession], Sequence[int] | None] = lambda s: None) -> tuple[str, Any]:
        """On a model thread: the job's final event, ("done", result) or ("error", ApiError)."""
        if job.cancel.is_set() or self.shutdown.is_set():
            self._count("cancelled")
            logger.info(f"{job.id}: cancelled before it started")
            return "error", ApiError(499, "cancelled before it started", type="cancelled")
        slot = self._take_slot(prompt)
        try:
            return self._run_on(job, work, slot)
        finally:
            release = getattr(self.prefills[slot], "release", None)
            if release is not None:  # a SlotRuntime: the batched steps go on without this slot
                release()
            with self._lock:
                self._free.append(slot)

    def _run_on(self, job: Job, work: Callable[[Job, ChatSession], Any], slot: int) -> tuple[str, Any]:
        job.deadline = time.monotonic() + self.limits.deadline_s
        prefill = self.prefills[slot]
        prefill.stopped = self.cancelled_now(job)
        try:
            result = work(job, self.sessions[slot])
        except ApiError as e:
            self._count("errors")
            return "error", e
        except QwenEdgeError as e:
            self._count("errors")
            return "error", ApiError(400, first_line(e))
        except Exception as e:  # a bug: the request fails, the server goes on
            self._count("errors")
            logger.exception(f"{job.id}: internal error")
            return "error", ApiError(500, f"internal error: {type(e).__name__}: {first_line(e)}", type="server_error")
        finally:
            prefill.stopped = lambda: False
        self.metrics.finished(result)
        if job.timed_out and not job.cancel.is_set():
            logger.warning(f"{job.id}: stopped at its deadline ({self.limits.deadline_s:g} s, --timeout) after "
                           f"{len(result.output_ids)} generated tokens")
            result.finish_reason = "length"  # cut short, as by max_tokens: the reply is what was generated
            self._count("served")
        elif result.finish_reason == "cancelled" or job.cancel.is_set():
            self._count("cancelled")
            logger.info(f"{job.id}: cancelled after {len(result.output_ids)} generated tokens")
        else:
            self._count("served")
            logger.debug(f"{job.id}: {result.finish_reason}, {len(result.prompt_ids)} prompt tokens "
                         f"({result.stats.reused_tokens} cached), {len(result.output_ids)} generated")
        return "done", result

    def render_metrics(self) -> str:
        s = self.stats
        return self.metrics.render(
            {"slots": ("Slots (--parallel).", self.parallel),
             "slots_active": ("Slots generating now.", min(self.active, self.parallel)),
             "queue_depth": ("Admitted requests waiting for a slot.", self.waiting),
             "queue_capacity": ("Requests that may wait (--queue).", self.queue)},
            {"served": s.served, "cancelled": s.cancelled, "errors": s.errors, "rejected": s.rejected})

    def _count(self, what: str) -> None:
        with self._lock:  # every slot's thread counts
            setattr(self.stats, what, getattr(self.stats, what) + 1)

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
        for s in self.sessions:
            s.close()
        if self.scheduler is not None:
            self.scheduler.batch.close()

    # --- the work, on the model thread ---------------------------------------------------------------------------
    def chat_work(self, req: ChatRequest) -> Callable[[Job, ChatSession], Any]:
        def work(job: Job, session: ChatSession) -> Any:
            on_text = (lambda s: job.put("text", s)) if req.stream else None
            on_thinking = (lambda s: job.put("thinking", s)) if req.stream else None
            on_tool_call = (lambda d: job.put("tool", d)) if req.stream else None
            max_tokens = self.limits.max_tokens if req.max_tokens is None else req.max_tokens
            return session.complete(req.messages, tools=req.tools, tool_choice=req.tool_choice,
                                    response_format=req.response_format, thinking=req.thinking,
                                    thinking_budget=req.thinking_budget, sampling=req.sampling,
                                    max_new_tokens=max_tokens, stop=req.stop, on_text=on_text,
                                    on_thinking=on_thinking, on_tool_call=on_tool_call,
                                    cancel=self.cancelled_now(job))
        return work

    @staticmethod
    def chat_prompt(req: ChatRequest) -> Callable[[ChatSession], Sequence[int] | None]:
        """The request's prompt ids as `ChatSession.complete` renders them (to pick the slot that caches most)."""
        def prompt(session: ChatSession) -> Sequence[int] | None:
            from ..runtime.tools import check_messages, check_tools

            think = session.thinking if req.thinking is None else req.thinking
            tools = check_tools(req.tools) if req.tools and req.tool_choice != "none" else None
            return session.render(check_messages(req.messages), think, tools)
        return prompt

    @staticmethod
    def completion_ids(req: CompletionRequest, s: ChatSession) -> list[int]:
        ids = list(req.prompt) if isinstance(req.prompt, list) else s.tokenizer.encode(req.prompt)
        if max(ids, default=0) >= s.tokenizer.vocab_size:
            raise bad_request("prompt", f"'prompt' token ids must be below {s.tokenizer.vocab_size}")
        return ids

    def completion_prompt(self, req: CompletionRequest) -> Callable[[ChatSession], Sequence[int] | None]:
        """The request's prompt ids (to pick the slot whose cache holds most of them)."""
        return lambda s: self.completion_ids(req, s)

    def completion_work(self, req: CompletionRequest) -> Callable[[Job, ChatSession], Any]:
        """`ChatSession.complete_raw` on the slot: from the prefix its cache shares with the prompt."""
        def work(job: Job, s: ChatSession) -> Any:
            return s.complete_raw(self.completion_ids(req, s), sampling=req.sampling, max_new_tokens=req.max_tokens,
                                  stop=req.stop, on_text=(lambda t: job.put("text", t)) if req.stream else None,
                                  cancel=self.cancelled_now(job))
        return work
