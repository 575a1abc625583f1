"""Several generations on one model at once: a step scheduler over a BatchRuntime, a single-sequence view per slot,
and `generate_batch` for library users.

Each stream runs the one decode loop (`generate`, or a `ChatSession` on top of it) in its own thread, on a
`SlotRuntime`: a plain `Runtime` for one slot of the shared `BatchRuntime`. A slot's `prefill`/`decode` do not run
the model themselves: they hand their ids to the `Scheduler` and wait. The scheduler's step thread runs one backend
`step` for every slot that has work as soon as no active slot is still choosing its next token (sampling,
constraints, tools and thinking are per-thread Python, as with one stream), so one forward pass reads the weights
once for all streams. Every step runs on that one thread, as llama.cpp's server runs its loop: ggml's OpenMP build
keeps a thread team per calling thread, and steps handed from slot thread to slot thread left one team per slot
(11 threads instead of 7 in `serve --parallel 4` at 2 threads, ~1100 voluntary context switches per step instead
of ~40: the OpenMP threads slept and woke inside every step). In a loop, one extra team beside the stepping one made
the 4-slot step 1.6-2.3x slower (72-102 ms against 45 ms, ~500 context switches per step against 0). With one team
ggml's threads spin as llama-server's do, which is fastest on free cores but loses badly while other processes hold
the cores (as llama-server does there too); OMP_WAIT_POLICY=PASSIVE is the setting for such a machine. The thread ends when no slot is active
and starts again with the next stream.
A prompt joins in chunks (`chunk` ids per step, shared with the decode tokens of that step), so running streams keep
getting a token every step while it prefills. A slot whose stream ended is `release`d and the next step goes on
without it: a cancelled stream (generate checks its signal before each decode) frees its slot within one step.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from ..backends.base import BatchRuntime, Runtime
from ..errors import QwenEdgeError
from .generate import GenerationResult, generate
from .sampling import Sampling

if TYPE_CHECKING:
    from ..text.tokenizer import Tokenizer

DEFAULT_CHUNK = 128
"""Ids per step: the decode tokens of the running slots plus at most this many prompt ids of joining ones."""

_IDLE, _BUSY, _WAITING = "idle", "busy", "waiting"


class Scheduler:
    """Batches the slots' `prefill`/`decode` calls into backend steps (thread-safe; see the module docstring).

    A slot is idle (no stream), waiting (its ids handed over) or busy (its last ids ran; it is choosing the next
    token). A step runs when at least one slot waits and none is busy, always on the scheduler's step thread.
    `on_step(n_decode, n_prefill, seconds)` is called after each step (metrics)."""

    def __init__(self, batch: BatchRuntime, *, chunk: int = DEFAULT_CHUNK,
                 on_step: Callable[[int, int, float], None] | None = None):
        if chunk < 1:
            raise QwenEdgeError(f"chunk must be >= 1, not {chunk}")
        self.batch = batch
        self.chunk = int(chunk)
        self.on_step = on_step
        self.steps = 0
        # one lock, one condition per waiter: a step's end wakes only the slots whose ids ran, a slot's submit only
        # the step thread (with one shared condition every submit woke every waiting slot thread, to find its ids
        # still pending and sleep again, the last of them as the next step began)
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        """The step thread's condition: ids handed over, a slot busy no more, or released."""
        self._slot_cv = [threading.Condition(self._lock) for _ in range(batch.n_slots)]
        self._idle = threading.Condition(self._lock)
        """Notified when a step ends (for `exclusive`)."""
        self._state = [_IDLE] * batch.n_slots
        self._pending: dict[int, list[int]] = {}
        self._errors: dict[int, BaseException] = {}
        self._running = False
        self._thread: threading.Thread | None = None

    @property
    def n_slots(self) -> int:
        return self.batch.n_slots

    def active(self) -> int:
        """Slots with a stream (waiting or busy)."""
        return sum(s != _IDLE for s in self._state)

    def view(self, slot: int) -> "SlotRuntime":
        return SlotRuntime(self, self.batch.check_slot(slot))

    def submit(self, slot: int, ids: Sequence[int]) -> None:
        """Append `ids` to `slot` in the coming steps; returns once all of them ran (the slot's logits are then
        those of its last id). Raises what the backend raised for a step this slot was in."""
        ids = [int(t) for t in ids]
        if not ids:
            return
        with self._cv:
            if slot in self._pending:
                raise QwenEdgeError(f"slot {slot} already has ids waiting (one thread per slot)")
            self._pending[slot] = ids
            self._state[slot] = _WAITING
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="qwen-edge-step", daemon=True)
                self._thread.start()
            self._wake_stepper()
            while slot in self._pending:
                self._slot_cv[slot].wait()
            err = self._errors.pop(slot, None)
        if err is not None:
            raise err

    def _loop(self) -> None:
        """The step thread: a step whenever one can run; it ends when no slot is active."""
        with self._cv:
            while True:
                if self._pending and _BUSY not in self._state:
                    self._run_step()
                elif _WAITING not in self._state and _BUSY not in self._state:
                    self._thread = None
                    return
                else:
                    self._cv.wait()

    def _run_step(self) -> None:
        """With the lock held: one backend step over the waiting slots (the lock is let go while it runs). A slot
        whose ids all ran is busy from then on, until it submits again or is released."""
        feeds: dict[int, list[int]] = {}
        decoding = [s for s, ids in self._pending.items() if len(ids) == 1]
        for s in decoding:
            feeds[s] = self._pending[s]
        room = max(1, self.chunk - len(feeds))
        for s in sorted(self._pending):
            if s in feeds or room <= 0:
                continue
            feeds[s] = self._pending[s][:room]
            room -= len(feeds[s])
        self._running = True
        t0 = time.perf_counter()
        self._lock.release()
        err: BaseException | None = None
        try:
            self.batch.step(feeds)
        except BaseException as e:  # noqa: BLE001: handed to the slots whose ids were in the step
            err = e
        finally:
            self._lock.acquire()
            self._running = False
            self._idle.notify_all()
        self.steps += 1
        for s, ids in feeds.items():
            if err is not None:
                self._errors[s] = err
                del self._pending[s]
            elif len(ids) == len(self._pending[s]):
                del self._pending[s]
            else:
                self._pending[s] = self._pending[s][len(ids):]
                continue
            if self._state[s] == _WAITING:
                self._state[s] = _BUSY
            self._slot_cv[s].notify()
        if self.on_step is not None and err is None:
            n_dec = sum(len(v) == 1 for v in feeds.values())
            self.on_step(n_dec, sum(len(v) for v in feeds.values()) - n_dec, time.perf_counter() - t0)

    def exclusive(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` (a cache edit on the backend) between steps, never during one."""
        with self._cv:
            while self._running:
                self._idle.wait()
            return fn()

    def release(self, slot: int) -> None:
        """The slot's stream is over (finished, failed or cancelled): the steps go on without waiting for it."""
        with self._cv:
            self._pending.pop(slot, None)
            self._errors.pop(slot, None)
            self._state[slot] = _IDLE
            self._wake_stepper()

    def _wake_stepper(self) -> None:
        """With the lock held: wake the step thread, only once it can act (no slot is still choosing a token): woken
        by every submit it would take the lock and the GIL from the slots still choosing, then sleep again, 3 times
        in each 4-slot step, on the path between two steps."""
        if _BUSY not in self._state:
            self._cv.notify()


class SlotRuntime(Runtime):
    """One slot of a BatchRuntime as a plain single-sequence Runtime (for `generate` and `ChatSession`): its
    prefill/decode run in the scheduler's batched steps, its cache edits between them. `close()` frees nothing:
    the batch runtime owns the model."""

    def __init__(self, scheduler: Scheduler, slot: int):
        self.scheduler = scheduler
        self.slot = slot
        self.info = scheduler.batch.info

    @property
    def n_cached(self) -> int:  # type: ignore[override]
        return self.scheduler.batch.slot_cached(self.slot)

    def prefill(self, ids: Sequence[int]) -> None:
        ids = list(ids)
        self.check_room(len(ids))
        self.scheduler.submit(self.slot, ids)

    def decode(self, token_id: int) -> None:
        self.prefill([token_id])

    def logits(self) -> np.ndarray:
        return self.scheduler.batch.slot_logits(self.slot)

    def rewind(self, n_tokens: int) -> None:
        self.scheduler.exclusive(lambda: self.scheduler.batch.slot_rewind(self.slot, n_tokens))

    def release(self) -> None:
        self.scheduler.release(self.slot)


def generate_batch(batch: BatchRuntime, prompts: Sequence[Sequence[int]], *,
                   sampling: Sampling | Sequence[Sampling] | None = None, max_new_tokens: int = 256,
                   stop_ids: Sequence[int] = (), stop_strings: Sequence[str] = (),
                   tokenizer: Tokenizer | None = None, chunk: int = DEFAULT_CHUNK,
                   **kwargs: Any) -> list[GenerationResult]:
    """`generate` for each prompt, up to `batch.n_slots` of them at once in batched steps; results in prompt order.

    `sampling`: one for all prompts or one per prompt (each stream has its own seeded sampler, so a seeded stream
    gives the same tokens as alone). Other keywords go to each `generate` (constraint, thinking_budget, cancel...).
    With greedy decoding each result's tokens are those `generate` gives alone on the same backend. Each prompt
    starts on an empty slot cache."""
    prompts = [list(p) for p in prompts]
    per = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling] * len(prompts)
    if len(per) != len(prompts):
        raise QwenEdgeError(f"{len(per)} samplings for {len(prompts)} prompts")
    sched = Scheduler(batch, chunk=chunk)
    results: list[GenerationResult | None] = [None] * len(prompts)
    errors: list[BaseException] = []
    todo = iter(range(len(prompts)))
    lock = threading.Lock()

    def worker(slot: int) -> None:
        view = sched.view(slot)
        while not errors:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            try:
                view.reset()
                results[i] = generate(view, prompts[i], sampling=per[i], max_new_tokens=max_new_tokens,
                                      stop_ids=stop_ids, stop_strings=stop_strings, tokenizer=tokenizer, **kwargs)
            except BaseException as e:  # noqa: BLE001: re-raised in the caller's thread
                errors.append(e)
            finally:
                view.release()

    threads = [threading.Thread(target=worker, args=(s,), name=f"qwen-edge-slot-{s}", daemon=True)
               for s in range(min(batch.n_slots, len(prompts)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return [r for r in results if r is not None]
