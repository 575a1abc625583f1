"""Two ONNX artifacts of one checkpoint, A/B in one process: decode and prefill tokens/s, paired per block (issue 28).

Usage: python benchmarks/bench_graph_ab.py BEFORE_ARTIFACT AFTER_ARTIFACT [--threads 1,2] [--decode-blocks 16]
                                           [--prefill-blocks 8] [--label L] [--note TEXT]

Made for graph changes that must not cost speed (issue 28's position_ids / RotaryEmbedding / attention-bias graph
against the graph before it): a `qwen-edge bench` of two artifacts spawns a process per run, and on a shared machine
its runs swing more than the change being measured. Here both artifacts are loaded in one process with qwen-edge's
onnxruntime backend and run alternately (A B, then B A), so the machine's drift hits both; the ratio is taken per
block. Decode: prefill 128 ids, then per block rewind to 128 and time 32 `decode` calls. Prefill: per block `reset()`
and time one 512-token `prefill`. Build the "before" artifact with the older tree, e.g.
`git archive COMMIT qwen_edge runtimes | tar -x -C /tmp/before` and `PYTHONPATH=/tmp/before qwen-edge export ...`.
"""

from __future__ import annotations

import argparse
import statistics as st
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import write_record  # noqa: E402

PREFIX, DECODE_TOKENS, PREFILL_TOKENS = 128, 32, 512


def _stats(xs: list[float]) -> dict[str, float]:
    return {"median": st.median(xs), "min": min(xs), "max": max(xs)}


def measure(paths: list[str], threads: int, decode_blocks: int, prefill_blocks: int) -> dict:
    sys.path.insert(0, str(ROOT))
    from qwen_edge.backends import load

    rts = [load(p, threads=threads) for p in paths]
    out = {}
    try:
        for rt in rts:
            rt.prefill(list(range(1000, 1000 + PREFIX)))
        speeds: list[list[float]] = [[], []]
        ratio = []
        for rep in range(decode_blocks):
            t = {}
            for i in ((0, 1) if rep % 2 == 0 else (1, 0)):
                rts[i].rewind(PREFIX)
                t0 = time.perf_counter()
                for k in range(DECODE_TOKENS):
                    rts[i].decode(1000 + k)
                t[i] = time.perf_counter() - t0
            speeds[0].append(DECODE_TOKENS / t[0])
            speeds[1].append(DECODE_TOKENS / t[1])
            ratio.append(t[0] / t[1])
        out["decode"] = {"before": _stats(speeds[0]), "after": _stats(speeds[1]), "paired": _stats(ratio)}
        speeds, ratio = [[], []], []
        ids = list(range(2000, 2000 + PREFILL_TOKENS))
        for rep in range(prefill_blocks):
            t = {}
            for i in ((0, 1) if rep % 2 == 0 else (1, 0)):
                rts[i].reset()
                t0 = time.perf_counter()
                rts[i].prefill(ids)
                t[i] = time.perf_counter() - t0
            speeds[0].append(PREFILL_TOKENS / t[0])
            speeds[1].append(PREFILL_TOKENS / t[1])
            ratio.append(t[0] / t[1])
        out["prefill"] = {"before": _stats(speeds[0]), "after": _stats(speeds[1]), "paired": _stats(ratio)}
    finally:
        for rt in rts:
            rt.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--decode-blocks", type=int, default=16)
    ap.add_argument("--prefill-blocks", type=int, default=8)
    ap.add_argument("--label", default="")
    ap.add_argument("--note", action="append", default=[])
    a = ap.parse_args()
    runs = {}
    for th in [int(x) for x in a.threads.split(",")]:
        runs[str(th)] = measure([a.before, a.after], th, a.decode_blocks, a.prefill_blocks)
        for kind, r in runs[str(th)].items():
            print(f"{th} threads {kind}: before {r['before']['median']:.2f} after {r['after']['median']:.2f} tok/s, "
                  f"paired after/before {r['paired']['median']:.3f}", file=sys.stderr)
    write_record("graph_ab", {"threads": runs},
                 settings={"before": a.before, "after": a.after, "prefix": PREFIX, "decode_tokens": DECODE_TOKENS,
                           "decode_blocks": a.decode_blocks, "prefill_tokens": PREFILL_TOKENS,
                           "prefill_blocks": a.prefill_blocks},
                 label=a.label, notes=a.note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
