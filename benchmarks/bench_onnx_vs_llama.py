"""ONNX int4 (onnxruntime) vs llama.cpp q4_0 on one checkpoint: decode/prefill tokens/s, export cost, peak RSS."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import write_record  # noqa: E402


def child(code: str, *args: str) -> dict[str, Any]:
    """Run `code` in a fresh interpreter (so peak RSS is its own); it prints one JSON line last."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"child failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def source_checkpoint(source: str | None, work: Path) -> Path:
    """`source`, or (none given) a synthesized Qwen2.5-0.5B under `work`, made on first use."""
    work.mkdir(parents=True, exist_ok=True)
    src = Path(source) if source else work / "qwen2.5-0.5b"
    if not (src / "config.json").is_file():
        sys.path.insert(0, str(ROOT))
        from qwen_edge.model.synth import synth

        synth("qwen2.5-0.5b", src, seed=0)
    return src


EXPORT = """
import json, resource, sys, time
from qwen_edge.export import export
src, fmt, quant, out, name, opts = sys.argv[1:7]
target = sys.argv[7] if len(sys.argv) > 7 else None  # a target profile's export defaults (block size, LM head)
t = time.perf_counter()
path = export(src, fmt, quant, out, name=name, options=json.loads(opts), target=target, force=True)  # never reuse
dt = time.perf_counter() - t
print(json.dumps({"path": str(path), "seconds": dt, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--source", help="checkpoint directory (default: synthesize qwen2.5-0.5b into --workdir)")
    ap.add_argument("--workdir", default="/tmp/qwen-edge-bench")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--onnx-options", default="{}", help="JSON exporter options for the int4 artifact")
    ap.add_argument("--json", help="also write the JSON document to this file")
    ap.add_argument("--label", default="", help="suffix of the record's file name under benchmarks/results/")
    ap.add_argument("--note", action="append", default=[], help="a sentence stored in the record (repeatable)")
    a = ap.parse_args()
    work = Path(a.workdir)
    src = source_checkpoint(a.source, work)

    onnx_exp = child(EXPORT, str(src), "onnx", "int4", str(work), "onnx-int4", a.onnx_options)
    gguf_exp = child(EXPORT, str(src), "gguf", "q4_0", str(work), "gguf-q4_0", "{}")

    sys.path.insert(0, str(ROOT))
    from qwen_edge.bench.run import bench

    # llama.cpp first, so "x first" is onnx / llama.cpp; each run is a fresh process, the order alternates per repeat
    load_before = os.getloadavg()
    report = bench([gguf_exp["path"], onnx_exp["path"]], prompt_tokens=a.prompt_tokens, gen_tokens=a.gen_tokens,
                   threads=a.threads, repeat=a.repeats, warmup=1, log=lambda m: print(m, file=sys.stderr))
    load_after = os.getloadavg()
    llama, onnx = report["results"]
    ratio = {k: onnx["ratio_to_first"][f"{k}_tokens_per_s"] for k in ("decode", "prefill")}
    paired = {k: onnx["paired_ratio_to_first"][f"{k}_tokens_per_s"] for k in ("decode", "prefill")}
    doc = {
        "machine": {**report["machine"], "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in load_after]},
        "settings": {"threads": a.threads, "prompt_tokens": a.prompt_tokens, "gen_tokens": a.gen_tokens,
                     "repeats": a.repeats, "source": str(src), "onnx_options": json.loads(a.onnx_options),
                     **report["config"]},
        "results": {"onnx int4": onnx, "llama.cpp q4_0": llama},
        "ratio_onnx_over_llama": ratio,
        "paired_ratio_onnx_over_llama": paired,
        "export": {"onnx int4": onnx_exp, "llama.cpp q4_0": gguf_exp},
    }
    mb = 1 << 20
    print("| backend | decode tok/s (median, min-max) | prefill tok/s (median, min-max) | size MB | peak RSS MB "
          "| RSS budget MB (1.5 x size + KV) |")
    print("|---|---|---|---|---|---|")
    for name, r in (("onnx int4", onnx), ("llama.cpp q4_0", llama)):
        d, p = r["decode_tokens_per_s"], r["prefill_tokens_per_s"]
        print(f"| {name} | {d['median']:.1f} ({d['min']:.1f}-{d['max']:.1f}) | "
              f"{p['median']:.1f} ({p['min']:.1f}-{p['max']:.1f}) | {r['size_bytes'] / mb:.0f} | "
              f"{r['peak_rss_bytes'] / mb:.0f} | {r['rss_budget_bytes'] / mb:.0f} |")
    pd, pp = paired["decode"], paired["prefill"]
    print(f"\nonnx/llama.cpp: decode {ratio['decode']:.2f}x, prefill {ratio['prefill']:.2f}x (ratio of medians); "
          f"paired per repeat: decode {pd['median']:.2f}x ({pd['min']:.2f}-{pd['max']:.2f}), "
          f"prefill {pp['median']:.2f}x ({pp['min']:.2f}-{pp['max']:.2f}) "
          f"(1-min load average {load_before[0]:.2f} before, {load_after[0]:.2f} after)")
    print(f"export onnx int4: {onnx_exp['seconds']:.1f} s, peak RSS {onnx_exp['peak_rss_bytes'] / mb:.0f} MB; "
          f"gguf q4_0: {gguf_exp['seconds']:.1f} s, peak RSS {gguf_exp['peak_rss_bytes'] / mb:.0f} MB\n")
    print(json.dumps(doc, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(doc, indent=2) + "\n")
    write_record("onnx_vs_llama", {k: v for k, v in doc.items() if k not in ("machine", "settings")},
                 settings=doc["settings"], notes=a.note, label=a.label,
                 extra_machine={"read_bandwidth_gbps": report["machine"].get("read_bandwidth_gbps")})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
