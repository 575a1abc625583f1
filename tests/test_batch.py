"""Batched generation on real backends (runtime/batch.py over a BatchRuntime): greedy streams of different prompt
lengths, joining at different times, give the tokens each gives alone; a seeded sampled stream is reproducible on its
own; a cancelled stream leaves the steps within one step while the others go on."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from qwen_edge.backends import load
from qwen_edge.runtime.batch import Scheduler, generate_batch
from qwen_edge.runtime.generate import generate
from qwen_edge.runtime.sampling import Sampling

CTX = 256
N_NEW = 12


def _prompts() -> list[list[int]]:
    rng = np.random.default_rng(3)
    return [[int(t) for t in rng.integers(5, 250, size=n)] for n in (7, 40, 3, 150, 22)]


SAMPLINGS = [Sampling(temperature=0), Sampling(temperature=0), Sampling(temperature=0.9, seed=11),
             Sampling(temperature=0), Sampling(temperature=0)]


@pytest.fixture(scope="module", params=["gguf", "onnx"])
def art(request, tmp_path_factory):
    """The trained fidelity checkpoint (its greedy tokens follow the context; the synthesized tiny models repeat one
    token whatever came before, so they would not tell a wrong cache from a right one), GGUF q8_0 or ONNX int4."""
    from fidelity import fidelity_checkpoint

    from qwen_edge.export import export

    quant = {"gguf": "q8_0", "onnx": "int4"}[request.param]
    return export(fidelity_checkpoint(), request.param, quant, tmp_path_factory.mktemp("batch"), name=request.param)


@pytest.fixture(scope="module")
def solo(art):
    """Each prompt generated alone, on a single-sequence runtime."""
    with load(art, max_context=CTX, threads=2) as rt:
        return [generate(rt, p, sampling=s, max_new_tokens=N_NEW).output_ids for p, s in zip(_prompts(), SAMPLINGS)]


class Recording:
    """A BatchRuntime that records the slots of every step."""

    def __init__(self, batch):
        self.batch, self.steps, self.threads = batch, [], set()

    def __getattr__(self, name):
        return getattr(self.batch, name)

    def step(self, feeds):
        self.steps.append({s: len(ids) for s, ids in feeds.items()})
        self.threads.add(threading.current_thread().name)
        self.batch.step(feeds)


def test_batched_streams_equal_solo(art, solo):
    # 5 prompts on 3 slots: the last two join when the first streams end; 150 ids prefill over two 128-id steps.
    # ONNX: a small context and step margin, so its shared cache columns run out and the rows are compacted midway
    compactions = []
    with pytest.MonkeyPatch.context() as mp:
        ctx = CTX
        if art.name == "onnx":
            from qwen_edge.backends import onnxruntime as ortb

            mp.setattr(ortb, "SLOT_STEP_MAX", 64)
            real = ortb.OrtSlots._compact
            mp.setattr(ortb.OrtSlots, "_compact", lambda self, need: (compactions.append(need), real(self, need)))
            ctx = 170
        with load(art, max_context=ctx, threads=2, parallel=3) as rt:
            rec = Recording(rt)
            out = generate_batch(rec, _prompts(), sampling=SAMPLINGS, max_new_tokens=N_NEW)
    assert [r.output_ids for r in out] == solo
    assert compactions or art.name != "onnx"
    assert max(len(s) for s in rec.steps) == 3  # the steps really were batched
    # every step on the scheduler's one thread, never on a slot's: ggml's OpenMP keeps a thread team per calling
    # thread, and a team per slot oversubscribed the cores (the 4-slot GGUF step took ~2x as long in serve)
    assert rec.threads == {"qwen-edge-step"}, rec.threads
    assert any(len(s) > 1 and any(n > 1 for n in s.values()) for s in rec.steps)  # a prompt joined running streams


def test_cancelled_stream_leaves_within_one_step(art, solo):
    prompts = _prompts()[:2]
    with load(art, max_context=CTX, threads=2, parallel=2) as rt:
        rec = Recording(rt)
        sched = Scheduler(rec)
        flag = threading.Event()
        at: list[int] = []

        def cancel() -> bool:
            if len(rec.steps) >= 6 and not flag.is_set():
                flag.set()
                at.append(len(rec.steps))
            return flag.is_set()

        results = [None, None]

        def run(slot: int) -> None:
            view = sched.view(slot)
            try:
                results[slot] = generate(view, prompts[slot], max_new_tokens=N_NEW,
                                         cancel=cancel if slot == 1 else None)
            finally:
                view.release()

        threads = [threading.Thread(target=run, args=(s,), daemon=True) for s in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)  # a slot that stays busy after its stream ended would stall the other for ever
        assert not any(t.is_alive() for t in threads), rec.steps
        assert results[1].finish_reason == "cancelled"
        assert 0 < len(results[1].output_ids) < N_NEW
        assert results[1].output_ids == solo[1][:len(results[1].output_ids)]
        assert all(1 not in s for s in rec.steps[at[0]:]), (at, rec.steps)  # gone from the very next step
        assert results[0].output_ids == solo[0] and results[0].finish_reason == "length"
        # the cancelled slot's cache holds its prompt and the tokens it got: a returning conversation reuses them
        assert rt.slot_cached(1) == len(prompts[1]) + len(results[1].output_ids) - 1


def test_gguf_step_hands_the_slots_to_llama_cpp_in_order(art):
    """With one KV stream per slot, llama.cpp cuts a batch into ubatches of consecutive ascending sequence ids
    (llama_batch_allocr::split_equal with sequential ids): rows in the slots' submission order (2, 0, 3, 1) ran as
    several forward passes, each reading all the weights (a 4-slot decode step of the 0.5B q4_0 took 77 ms instead
    of 51-55 ms). So a step hands them over sorted by slot, whatever order the feeds came in."""
    if art.name != "gguf":
        pytest.skip("llama.cpp's batch layout")
    with load(art, max_context=CTX, threads=2, parallel=4) as rt:
        real, seen = rt._L, []

        class Spy:
            def __getattr__(self, name):
                return getattr(real, name)

            def llama_decode(self, ctx, b):
                seen.append([int(b.seq_id[i][0]) for i in range(b.n_tokens)])
                return real.llama_decode(ctx, b)

        rt._L = Spy()
        try:
            rt.step({2: [5, 6], 0: [7], 3: [8, 9, 10], 1: [11]})
        finally:
            rt._L = real
        assert seen == [[0, 1, 2, 2, 3, 3, 3]]
        assert [rt.slot_cached(s) for s in range(4)] == [1, 1, 2, 3]
