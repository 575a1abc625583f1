"""GGUF export of the synthesized Qwen2.5-0.5B: wall time, peak RSS, size and bits per weight per quantization.

Usage: python benchmarks/bench_gguf_export.py [--ckpt DIR] [--out DIR] [--quants q4_k_m,f16,...] [--threads N]
Prints a markdown table and writes a record under benchmarks/results/ (RESULTS.md: python benchmarks/report.py). Each export runs in its own process so its
peak RSS is its own (os.wait4 rusage).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import write_record  # noqa: E402

# llama.cpp's published figures (tools/quantize/quantize.cpp QUANT_OPTIONS): file size of Llama-3-8B
# (8.03 B parameters, sizes in GiB) or the nominal bits per weight for the IQ types.
LLAMA3_8B_PARAMS = 8_030_261_248
PUBLISHED = {
    "q2_k": ("2.96G @ Llama-3-8B", 2.96), "q3_k_m": ("3.74G @ Llama-3-8B", 3.74),
    "q4_0": ("4.34G @ Llama-3-8B", 4.34), "q4_k_s": ("4.37G @ Llama-3-8B", 4.37),
    "q4_k_m": ("4.58G @ Llama-3-8B", 4.58), "q5_k_s": ("5.21G @ Llama-3-8B", 5.21),
    "q5_k_m": ("5.33G @ Llama-3-8B", 5.33), "q6_k": ("6.14G @ Llama-3-8B", 6.14),
    "q8_0": ("7.96G @ Llama-3-8B", 7.96), "iq4_nl": ("4.50 bpw", None), "iq4_xs": ("4.25 bpw", None),
    "f16": ("16 bpw", None), "bf16": ("16 bpw", None), "f32": ("32 bpw", None),
}

_CHILD = """
import json, sys, time
from qwen_edge.export import export
t = time.perf_counter()
p = export(sys.argv[1], "gguf", sys.argv[2], sys.argv[3], name=sys.argv[2], options={"threads": int(sys.argv[4])})
print(json.dumps({"wall_s": time.perf_counter() - t, "path": str(p)}))
"""


def published_bpw(quant: str) -> str:
    desc, gib = PUBLISHED.get(quant, ("", None))
    if gib is None:
        return desc
    return f"{desc} = {gib * 2**30 * 8 / LLAMA3_8B_PARAMS:.2f} bpw"


def run_one(ckpt: Path, quant: str, out: Path, threads: int) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent) + os.pathsep + env.get("PYTHONPATH", "")
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(ckpt), quant, str(out), str(threads)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    stdout, stderr = proc.stdout.read().decode(), proc.stderr.read().decode()  # type: ignore[union-attr]
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"export {quant} failed:\n{stderr[-2000:]}")
    res = json.loads(stdout.strip().splitlines()[-1])
    art = Path(res["path"])
    q = json.loads((art / "manifest.json").read_text())["quantization"]
    size = (art / "model.gguf").stat().st_size
    shutil.rmtree(art)
    return {"quant": quant, "export_s": res["wall_s"], "process_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_mb": usage.ru_maxrss / 1024,
            "size_mb": size / 1e6, "bpw": q["bits_per_weight"], "types": q["type_counts"],
            "fallbacks": len(q["fallbacks"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", type=Path, default=Path("/tmp/qwen-edge-bench/qwen2.5-0.5b"))
    ap.add_argument("--out", type=Path, default=Path("/tmp/qwen-edge-bench/gguf"))
    ap.add_argument("--quants", default="q4_k_m,f32,f16,bf16,q8_0,q4_0,q4_k_s,q5_k_m,q5_k_s,q6_k,q3_k_m,q2_k,iq4_nl,"
                                          "iq4_xs")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--label", default="", help="suffix of the record's file name under benchmarks/results/")
    ap.add_argument("--note", action="append", default=[], help="a sentence stored in the record (repeatable)")
    a = ap.parse_args()
    if not (a.ckpt / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "qwen_edge.cli", "synth", "qwen2.5-0.5b", "-o", str(a.ckpt)], check=True,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    ckpt_mb = sum(p.stat().st_size for p in a.ckpt.glob("*.safetensors")) / 1e6
    rows = [run_one(a.ckpt, q, a.out, a.threads) for q in a.quants.split(",")]
    print(f"GGUF export of synthesized Qwen2.5-0.5B ({ckpt_mb:.0f} MB bf16 safetensors), {platform.machine()}, "
          f"{os.cpu_count()} CPUs, {a.threads} quantizer threads, {time.strftime('%Y-%m-%d')}\n")
    print("| quant | export s | peak RSS MB | model.gguf MB | bpw | llama.cpp published | tensor types | fallbacks |")
    print("|---|---:|---:|---:|---:|---|---|---:|")
    for r in rows:
        types = ", ".join(f"{k}×{v}" for k, v in r["types"].items())
        print(f"| {r['quant']} | {r['export_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['size_mb']:.1f} | {r['bpw']:.2f} | "
              f"{published_bpw(r['quant'])} | {types} | {r['fallbacks']} |")
    cfg = json.loads((a.ckpt / "config.json").read_text())
    write_record("gguf_export", {"rows": rows, "published_bpw": {r["quant"]: published_bpw(r["quant"]) for r in rows}},
                 settings={"checkpoint": str(a.ckpt), "checkpoint_mb": round(ckpt_mb, 1),
                           "checkpoint_model": cfg.get("_name_or_path") or cfg.get("model_type"),
                           "hidden_size": cfg.get("hidden_size"), "num_hidden_layers": cfg.get("num_hidden_layers"),
                           "quants": a.quants.split(","), "threads": a.threads},
                 notes=a.note, label=a.label)


if __name__ == "__main__":
    main()
