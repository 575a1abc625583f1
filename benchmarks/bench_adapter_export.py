"""Export time and peak RSS with and without a LoRA adapter (merged, and separate), each in a fresh process.

Usage:
  python benchmarks/bench_adapter_export.py [--ckpt /tmp/shared/ck05] [--rank 16] \\
      [--exports gguf:q8_0,onnx:int4] [--repeat 2] [--threads N] [--out DIR] [--label L] [--note TEXT]

The adapter is made first with PEFT (in a child process: torch stays out of the measuring one): rank `--rank` on
every attention and MLP projection, non-zero B. Then, per repeat and in alternation (none, merge, separate),
each export runs in a fresh process; peak RSS is the child's VmHWM read just after the export (resident
memory-mapped checkpoint pages included), CPU s its user + system time. The record keeps every run; the report shows
medians. Artifacts are removed after each export.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import start, write_record  # noqa: E402

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

_MAKE = """
import sys, torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
ckpt, out, rank = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=sys.argv[4].split(","), init_lora_weights=False)
get_peft_model(model, cfg).save_pretrained(out)
"""

_CHILD = """
import json, sys, time
import qwen_edge
from qwen_edge.export import export
ckpt, fmt, quant, out, threads, mode, adapter = sys.argv[1:8]
options = {"threads": int(threads)} if fmt == "gguf" else {}
kw = {} if mode == "none" else {"adapters": [adapter], "adapter_mode": mode}
t = time.perf_counter()
p = export(ckpt, fmt, quant, out, name=f"{fmt}-{quant}-{mode}", options=options, **kw)
wall = time.perf_counter() - t
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"export_s": wall, "path": str(p), "vmhwm": hwm, "module": qwen_edge.__file__}))
"""


def make_adapter(ckpt: Path, out: Path, rank: int) -> None:
    if (out / "adapter_model.safetensors").is_file():
        return
    subprocess.run([sys.executable, "-c", _MAKE, str(ckpt), str(out), str(rank), ",".join(PROJECTIONS)], check=True)


def run_one(ckpt: Path, fmt: str, quant: str, out: Path, threads: int, mode: str, adapter: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryFile() as so, tempfile.TemporaryFile() as se:
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(ckpt), fmt, quant, str(out), str(threads), mode,
                                 str(adapter)], stdout=so, stderr=se, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        so.seek(0)
        se.seek(0)
        stdout, stderr = so.read().decode(), se.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"export {fmt} {quant} ({mode}) failed:\n{stderr[-2000:]}")
    res = json.loads(stdout.strip().splitlines()[-1])
    art = Path(res["path"])
    size = sum(p.stat().st_size for p in art.iterdir() if p.name.startswith(("model.", "adapter")))
    shutil.rmtree(art)
    if not res["module"].startswith(str(ROOT)):
        raise SystemExit(f"the child imported {res['module']}, not qwen_edge from {ROOT}")
    return {"export_s": round(res["export_s"], 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_mb": round(res["vmhwm"] / 2**20), "files_mb": round(size / 2**20)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", type=Path, default=Path("/tmp/shared/ck05"))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--exports", default="gguf:q8_0,onnx:int4", help="comma-separated FORMAT:QUANT list")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--out", type=Path, default=Path("/tmp/qwen-edge-bench/adapter-export"))
    ap.add_argument("--label", default="", help="suffix of the record's file name under benchmarks/results/")
    ap.add_argument("--note", action="append", default=[], help="a sentence stored in the record (repeatable)")
    a = ap.parse_args()
    if not (a.ckpt / "config.json").is_file():
        raise SystemExit(f"--ckpt {a.ckpt}: not a checkpoint directory")
    a.out.mkdir(parents=True, exist_ok=True)
    adapter = a.out / f"lora-r{a.rank}"
    t = time.perf_counter()
    make_adapter(a.ckpt, adapter, a.rank)
    print(f"adapter {adapter} ({(adapter / 'adapter_model.safetensors').stat().st_size / 2**20:.1f} MiB) "
          f"in {time.perf_counter() - t:.0f} s", flush=True)
    start()
    exports = [tuple(e.split(":", 1)) for e in a.exports.split(",") if e]
    runs: list[dict] = []
    for rep in range(a.repeat):
        for fmt, quant in exports:
            for mode in ("none", "merge", "separate"):
                r = {"format": fmt, "quant": quant, "mode": mode, "repeat": rep,
                     **run_one(a.ckpt, fmt, quant, a.out, a.threads, mode, adapter)}
                runs.append(r)
                print(json.dumps(r), flush=True)
    rows = []
    for fmt, quant in exports:
        for mode in ("none", "merge", "separate"):
            mine = [r for r in runs if (r["format"], r["quant"], r["mode"]) == (fmt, quant, mode)]
            if mine:
                rows.append({"format": fmt, "quant": quant, "mode": mode, "runs": len(mine),
                             **{k: round(statistics.median(r[k] for r in mine), 2)
                                for k in ("export_s", "cpu_s", "peak_rss_mb", "files_mb")}})
    for r in rows:
        print(r)
    shutil.rmtree(adapter, ignore_errors=True)
    write_record("adapter_export", {"rows": rows, "runs": runs},
                 settings={"checkpoint": str(a.ckpt), "rank": a.rank, "lora_alpha": 2 * a.rank,
                           "targets": PROJECTIONS, "exports": a.exports, "repeat": a.repeat, "threads": a.threads},
                 notes=a.note, label=a.label)


if __name__ == "__main__":
    main()
