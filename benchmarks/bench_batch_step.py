"""What one batched llama.cpp decode step costs against a single sequence's (issue 29): the bound on what parallel
slots can gain on this CPU, whatever the server around them does.

    python benchmarks/bench_batch_step.py --artifact GGUF_ARTIFACT [--threads 2] [--steps 40] [--repeats 4]

One `LlamaCppRuntime` with 4 slots (one KV stream per slot, as `serve --parallel 4` loads it). Each active-slot set
gets a 128-id prompt per slot, then --steps decode steps of one token per active slot through `step` (the batched
call serve's scheduler makes), from this process's main thread; the median step time is taken. The sets take turns,
round after round (--repeats), so a drift in the machine's speed falls on all of them. Sets: one slot, two, four,
and two with a gap (slots 0 and 2: llama.cpp splits a sequence set that is not consecutive into separate passes).
x one = a set's median step / the one-slot set's in the same round; aggregate gain = active slots / x one (what N
streams can gain over one at best, the server's own overhead aside).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import write_record  # noqa: E402

SETS = ([0], [0, 1], [0, 1, 2, 3], [0, 2])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", required=True, help="a GGUF artifact (e.g. q4_0 of a synthesized Qwen2.5-0.5B)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--note", action="append", default=[])
    a = ap.parse_args()
    import numpy as np

    from qwen_edge.backends.llama_cpp import LlamaCppRuntime

    rng = random.Random(0)
    prompts = [[rng.randrange(1000, 30000) for _ in range(128)] for _ in range(4)]
    rt = LlamaCppRuntime(a.artifact, threads=a.threads, max_context=1024, parallel=4)
    rounds: list[dict[str, float]] = []
    try:
        for _ in range(a.repeats):
            got: dict[str, float] = {}
            for active in SETS:
                for s in range(4):
                    rt.slot_rewind(s, 0)
                for s in active:
                    rt.step({s: prompts[s]})
                toks = {s: int(np.argmax(rt.slot_logits(s))) for s in active}
                times = []
                for _ in range(a.steps):
                    t0 = time.perf_counter()
                    rt.step({s: [toks[s]] for s in active})
                    times.append(time.perf_counter() - t0)
                    toks = {s: int(np.argmax(rt.slot_logits(s))) for s in active}
                got[",".join(map(str, active))] = 1000 * statistics.median(times)
            rounds.append(got)
            print({k: round(v, 1) for k, v in got.items()}, flush=True)
    finally:
        rt.close()
    write_record("batch_step", {"rounds": rounds}, settings={"artifact": Path(a.artifact).name, "threads": a.threads,
                                                             "steps": a.steps, "repeats": a.repeats, "slots": 4},
                 notes=a.note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
