"""llama.cpp's extra CPU buffer types (issue 24): GGUF decode and prefill under each `llama_extra_buffers` policy.

Usage: python benchmarks/bench_extra_buffers.py [--source CKPT] [--quants q4_0,q4_k_m] [--modes auto,all,none]
                                                [--repeats 3] [--threads 2] [--label L]

- auto: qwen-edge's guard (llama.cpp's own choice where no AMX buffer type exists; where AMX exists, the probe's);
- all: llama.cpp's default, every extra buffer type (what ran before the guard);
- repack: every extra type but AMX; none: `use_extra_bufts = false` (plain CPU buffers).
Each run is `qwen_edge.bench.run` of one artifact in a fresh process with $QWEN_EDGE_LLAMA_EXTRA_BUFFERS set to the
mode; modes alternate order per repeat (forward, then reversed), and ratios are taken per repeat against `all`
(paired, so the slow drift of a shared machine cancels). The record names where each mode put the weights
(buffer type: MiB, from llama.cpp's load log) and the machine's lscpu flags.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import write_record  # noqa: E402
from bench_onnx_vs_llama import EXPORT, child, source_checkpoint  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--source", help="checkpoint directory (default: synthesize qwen2.5-0.5b into --workdir)")
    ap.add_argument("--workdir", default="/tmp/qwen-edge-bench")
    ap.add_argument("--quants", default="q4_0,q4_k_m")
    ap.add_argument("--modes", default="auto,all,none")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--label", default="")
    ap.add_argument("--note", action="append", default=[])
    a = ap.parse_args()
    work = Path(a.workdir)
    src = source_checkpoint(a.source, work)
    quants, modes = a.quants.split(","), a.modes.split(",")
    arts = {}
    for q in quants:
        art = work / f"gguf-{q}"
        if not (art / "manifest.json").is_file():
            art = Path(child(EXPORT, str(src), "gguf", q, str(work), f"gguf-{q}", "{}")["path"])
        arts[q] = art

    sys.path.insert(0, str(ROOT))
    import llama_cpp

    from qwen_edge import load
    from qwen_edge.bench.run import bench
    from qwen_edge.device.llama_bufts import ENV, available_extra_buffers

    placement = {}
    for q, art in arts.items():
        for m in modes:
            rt = load(art, max_context=512, threads=a.threads, extra_buffers=m)
            placement[f"{q}/{m}"] = rt.info.extra["extra_buffers"]
            rt.close()
    runs: dict[tuple[str, str], list[dict]] = {}
    for r in range(a.repeats):
        order = modes if r % 2 == 0 else list(reversed(modes))
        for q, art in arts.items():
            for m in order:
                os.environ[ENV] = m  # the spawned bench worker loads under this mode
                res = bench([art], prompt_tokens=a.prompt_tokens, gen_tokens=a.gen_tokens, threads=a.threads,
                            repeat=1, warmup=1)["results"][0]
                row = {"decode": res["decode_tokens_per_s"]["median"], "prefill": res["prefill_tokens_per_s"]["median"]}
                runs.setdefault((q, m), []).append(row)
                print(f"repeat {r + 1} {q} {m}: decode {row['decode']:.1f} prefill {row['prefill']:.1f} tok/s",
                      file=sys.stderr)
    os.environ.pop(ENV, None)
    rows = []
    for q in quants:
        for m in modes:
            rs = runs[(q, m)]
            base = runs.get((q, "all"))
            row = {"quant": q, "mode": m, "weights": placement[f"{q}/{m}"]["weights"],
                   "decode_tokens_per_s": statistics.median(x["decode"] for x in rs),
                   "prefill_tokens_per_s": statistics.median(x["prefill"] for x in rs),
                   "per_repeat": rs}
            if base:
                for k in ("decode", "prefill"):
                    row[f"{k}_paired_ratio_to_all"] = statistics.median(x[k] / y[k] for x, y in zip(rs, base))
            rows.append(row)
            print(f"{q:7s} {m:6s} decode {row['decode_tokens_per_s']:6.1f} prefill {row['prefill_tokens_per_s']:7.1f}"
                  + (f"  x all: {row['decode_paired_ratio_to_all']:.3f} / {row['prefill_paired_ratio_to_all']:.3f}"
                     if base else "") + f"  weights {row['weights']}")
    write_record("extra_buffers", {"rows": rows, "available": available_extra_buffers(llama_cpp),
                                   "placement": placement},
                 settings={"quants": quants, "modes": modes, "threads": a.threads, "repeats": a.repeats,
                         "prompt_tokens": a.prompt_tokens, "gen_tokens": a.gen_tokens, "source": str(src)},
                 label=a.label, notes=a.note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
