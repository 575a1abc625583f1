"""ONNX int4 (onnxruntime) vs llama.cpp q4_0 on one checkpoint: decode/prefill tokens/s, export cost, peak RSS."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def child(code: str, *args: str) -> dict[str, Any]:
    """Run `code` in a fresh interpreter (so peak RSS is its own); it prints one JSON line last."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"child failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


EXPORT = """
import json, resource, sys, time
from qwen_edge.export import export
src, fmt, quant, out, name, opts = sys.argv[1:7]
t = time.perf_counter()
path = export(src, fmt, quant, out, name=name, options=json.loads(opts))
dt = time.perf_counter() - t
print(json.dumps({"path": str(path), "seconds": dt, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

RSS = """
import json, sys
import numpy as np
from qwen_edge.backends import load
from qwen_edge.artifact import Artifact
path, threads, n_prompt, n_gen = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rt = load(path, threads=threads)
ids = np.random.default_rng(0).integers(1000, 100000, n_prompt).tolist()
rt.prefill(ids)
for _ in range(n_gen):
    rt.decode(int(rt.logits().argmax()))
kv = rt.info.extra.get("kv_cache_bytes")
from qwen_edge.bench import peak_rss_bytes
print(json.dumps({"peak_rss_bytes": peak_rss_bytes(),
                  "size_bytes": Artifact.open(path, check_hashes=False).size_bytes, "kv_cache_bytes": kv,
                  "context_length": rt.info.context_length}))
"""


def timed_run(rt, prompt: list[int], n_gen: int) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) for one greedy generation of exactly n_gen tokens."""
    rt.reset()
    t0 = time.perf_counter()
    rt.prefill(prompt)
    tok = int(rt.logits().argmax())
    t1 = time.perf_counter()
    for _ in range(n_gen - 1):
        rt.decode(tok)
        tok = int(rt.logits().argmax())
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), (n_gen - 1) / (t2 - t1)


def stats(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


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
    a = ap.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    src = Path(a.source) if a.source else work / "qwen2.5-0.5b"
    if not (src / "config.json").is_file():
        sys.path.insert(0, str(ROOT))
        from qwen_edge.synth import synth

        synth("qwen2.5-0.5b", src, seed=0)

    onnx_exp = child(EXPORT, str(src), "onnx", "int4", str(work), "onnx-int4", a.onnx_options)
    gguf_exp = child(EXPORT, str(src), "gguf", "q4_0", str(work), "gguf-q4_0", "{}")
    arts = {"onnx int4": onnx_exp["path"], "llama.cpp q4_0": gguf_exp["path"]}
    rss = {k: child(RSS, p, str(a.threads), "16", "16") for k, p in arts.items()}

    sys.path.insert(0, str(ROOT))
    import numpy as np

    from qwen_edge.backends import load

    load_before = os.getloadavg()

    prompt = np.random.default_rng(0).integers(1000, 100000, a.prompt_tokens).tolist()
    rts = {k: load(p, threads=a.threads) for k, p in arts.items()}
    for rt in rts.values():  # warmup
        timed_run(rt, prompt[:32], 8)
        timed_run(rt, prompt, 16)
    runs: dict[str, dict[str, list[float]]] = {k: {"prefill": [], "decode": []} for k in rts}
    order = list(rts)
    for r in range(a.repeats):
        for k in (order if r % 2 == 0 else order[::-1]):  # interleaved, alternating order
            pf, dc = timed_run(rts[k], prompt, a.gen_tokens)
            runs[k]["prefill"].append(pf)
            runs[k]["decode"].append(dc)
    for rt in rts.values():
        rt.close()
    load_after = os.getloadavg()

    results = []
    for k in rts:
        results.append({"artifact": arts[k], "backend": k, "decode_tokens_per_s": stats(runs[k]["decode"]),
                        "prefill_tokens_per_s": stats(runs[k]["prefill"]), **rss[k]})
    o, l = results
    ratio = {"decode": o["decode_tokens_per_s"]["median"] / l["decode_tokens_per_s"]["median"],
             "prefill": o["prefill_tokens_per_s"]["median"] / l["prefill_tokens_per_s"]["median"]}
    doc = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M"),
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in load_after]},
        "settings": {"threads": a.threads, "prompt_tokens": a.prompt_tokens, "gen_tokens": a.gen_tokens,
                     "repeats": a.repeats, "source": str(src), "onnx_options": json.loads(a.onnx_options)},
        "results": results,
        "ratio_onnx_over_llama": ratio,
        "export": {"onnx int4": onnx_exp, "llama.cpp q4_0": gguf_exp},
    }
    mb = 1 << 20
    print("| backend | decode tok/s (median, min-max) | prefill tok/s (median, min-max) | size MB | peak RSS MB "
          "| RSS budget MB (1.5 x size + KV) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        d, p = r["decode_tokens_per_s"], r["prefill_tokens_per_s"]
        r["rss_budget_bytes"] = int(1.5 * r["size_bytes"] + (r["kv_cache_bytes"] or 0))
        print(f"| {r['backend']} | {d['median']:.1f} ({d['min']:.1f}-{d['max']:.1f}) | "
              f"{p['median']:.1f} ({p['min']:.1f}-{p['max']:.1f}) | {r['size_bytes'] / mb:.0f} | "
              f"{r['peak_rss_bytes'] / mb:.0f} | {r['rss_budget_bytes'] / mb:.0f} |")
    print(f"\nonnx/llama.cpp: decode {ratio['decode']:.2f}x, prefill {ratio['prefill']:.2f}x "
          f"(1-min load average {load_before[0]:.2f} before, {load_after[0]:.2f} after)")
    print(f"export onnx int4: {onnx_exp['seconds']:.1f} s, peak RSS {onnx_exp['peak_rss_bytes'] / mb:.0f} MB; "
          f"gguf q4_0: {gguf_exp['seconds']:.1f} s, peak RSS {gguf_exp['peak_rss_bytes'] / mb:.0f} MB\n")
    print(json.dumps(doc, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
