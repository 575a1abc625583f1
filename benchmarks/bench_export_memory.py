"""Export time and peak RSS per checkpoint size and format/quantization, each export in a fresh process.

Usage:
  python benchmarks/bench_export_memory.py --ckpt 0.5B=/tmp/ck/q05 --ckpt 3B=/tmp/ck/q3 \\
      --exports gguf:q4_0,gguf:q4_k_m,onnx:int4,onnx:fp16 [--out DIR] [--threads N] [--repo DIR] [--json FILE]

`--repo` imports qwen_edge from another tree (a `git archive` of an older commit) to measure a before/after.
Peak RSS is the child's own VmHWM (read in the child just after the export; it counts resident memory-mapped
checkpoint pages too); CPU s is the child's user + system time (wall time drifts with the machine's load). Prints a markdown table; artifacts are removed after each
export, so the out directory needs room for one artifact at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import write_record  # noqa: E402

_CHILD = """
import json, sys, time
t0 = time.perf_counter()
import qwen_edge
from qwen_edge.export import export
ckpt, fmt, quant, out, threads = sys.argv[1:6]
options = {"threads": int(threads)} if fmt == "gguf" else {}
quant, *extras = quant.split("+")
if "imatrix" in extras:  # calibrated: the importance matrix computed in this process (the child's cache dir is empty)
    options["imatrix"] = "auto"
if "gptq" in extras:  # GPTQ: its calibration Hessians computed in this process
    options["gptq"] = True
t = time.perf_counter()
p = export(ckpt, fmt, quant, out, name=f"{fmt}-{quant}", options=options)
wall = time.perf_counter() - t
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"export_s": wall, "path": str(p), "vmhwm": hwm, "module": qwen_edge.__file__}))
"""


def machine() -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "flags": [], "cores": os.cpu_count()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            key, _, val = line.partition(":")
            if key.strip() == "Model name":
                info["cpu"] = val.strip()
            elif key.strip() == "Flags":
                have = set(val.split())
                info["flags"] = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni") if f in have]
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def run_one(ckpt: Path, fmt: str, quant: str, out: Path, threads: int, repo: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(repo) + os.pathsep + env.get("PYTHONPATH", "")
    cache = tempfile.TemporaryDirectory(prefix="qwen-edge-bench-cache-")
    env["QWEN_EDGE_CACHE_DIR"] = cache.name  # nothing computed before (an imatrix) is reused
    t = time.perf_counter()
    with tempfile.TemporaryFile() as so, tempfile.TemporaryFile() as se:
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(ckpt), fmt, quant, str(out), str(threads)],
                                stdout=so, stderr=se, env=env, cwd=repo)
        _, status, usage = os.wait4(proc.pid, 0)
        process_s = time.perf_counter() - t
        so.seek(0)
        se.seek(0)
        stdout, stderr = so.read().decode(), se.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"export {fmt} {quant} of {ckpt} failed:\n{stderr[-2000:]}")
    res = json.loads(stdout.strip().splitlines()[-1])
    art = Path(res["path"])
    size = sum(p.stat().st_size for p in art.iterdir() if p.name.startswith("model."))
    shutil.rmtree(art)
    cache.cleanup()
    if not res["module"].startswith(str(repo)):
        raise SystemExit(f"the child imported {res['module']}, not qwen_edge from {repo}")
    return {"export_s": round(res["export_s"], 1), "process_s": round(process_s, 1),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "maxrss_mb": round(usage.ru_maxrss / 1024),
            "peak_rss_mb": round(res["vmhwm"] / 2**20), "model_mb": round(size / 2**20)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", action="append", required=True, help="LABEL=DIR of a checkpoint (repeatable)")
    ap.add_argument("--exports", default="gguf:q4_0,gguf:q4_k_m,onnx:int4,onnx:fp16",
                    help="comma-separated FORMAT:QUANT list; QUANT+imatrix exports with --imatrix auto (computed), "
                    "QUANT+gptq with --gptq (both: QUANT+imatrix+gptq)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/qwen-edge-bench/export-memory"))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--repo", type=Path, default=ROOT, help="tree to import qwen_edge from (default: this one)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--label", default="", help="suffix of the record's file name under benchmarks/results/")
    ap.add_argument("--note", action="append", default=[], help="a sentence stored in the record (repeatable)")
    a = ap.parse_args()
    ckpts = []
    for spec in a.ckpt:
        label, sep, path = spec.partition("=")
        if not sep or not (Path(path) / "config.json").is_file():
            raise SystemExit(f"--ckpt {spec!r}: expected LABEL=DIR of a checkpoint")
        ckpts.append((label, Path(path)))
    exports = [tuple(e.split(":", 1)) for e in a.exports.split(",") if e]
    a.out.mkdir(parents=True, exist_ok=True)
    m = machine()
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {m['cpu']} ({m['cores']} cores; "
          f"{', '.join(m['flags']) or 'no avx2'}), python {platform.python_version()}, qwen_edge from {a.repo}")
    print(f"`{' '.join([Path(sys.argv[0]).name] + sys.argv[1:])}`\n")
    print("| checkpoint | ckpt MiB | format | quant | export s | CPU s | peak RSS MiB | model MiB |")
    print("|---|---:|---|---|---:|---:|---:|---:|")
    rows = []
    for label, ckpt in ckpts:
        ckpt_mb = round(sum(p.stat().st_size for p in ckpt.glob("*.safetensors")) / 2**20)
        for fmt, quant in exports:
            r = {"checkpoint": label, "ckpt_mb": ckpt_mb, "format": fmt, "quant": quant,
                 **run_one(ckpt, fmt, quant, a.out, a.threads, a.repo.resolve())}
            rows.append(r)
            print(f"| {label} | {ckpt_mb} | {fmt} | {quant} | {r['export_s']} | {r['cpu_s']} | "
                  f"{r['peak_rss_mb']} | {r['model_mb']} |", flush=True)
    if a.json:
        a.json.write_text(json.dumps({"machine": m, "rows": rows}, indent=1))
    write_record("export_memory", {"rows": rows},
                 settings={"checkpoints": {lb: str(p) for lb, p in ckpts}, "exports": a.exports,
                           "threads": a.threads, "repo": str(a.repo.resolve()),
                           "measured_tree": "this tree" if a.repo.resolve() == ROOT else "other tree (--repo)"},
                 notes=a.note, label=a.label)


if __name__ == "__main__":
    main()
