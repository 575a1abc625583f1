"""The app path's thread count (issue 24): onnxruntime-genai on our int4 artifact with genai_config.json as an app
gets it, before (no `intra_op_num_threads`: genai's default) and after (the profile's count; cpu-x86_64 writes 0,
onnxruntime's own default), beside qwen-edge's backend on the same graph and llama.cpp q4_0, in one interleaved run.

Usage: python benchmarks/bench_genai_threads.py --onnx ART --gguf ART [--threads 2] [--repeats 5]
                                                [--prompt-tokens 128] [--gen-tokens 64] [--label L] [--note TEXT]
                                                [--variant NAME=JSON ...] [--core-rows] [--busy]

`qwen-edge bench --engine onnxruntime-genai` overlays its own thread count on genai_config.json (so the two
engines compare at equal threads); this script does not for the genai rows: each loads the folder as it is, as an
app embedding the artifact does. Rows (every run a fresh process, order alternating per repeat, medians):

  genai/ours, no thread key   our artifact with `intra_op_num_threads` removed from genai_config.json (as exported
                              before issue 24)
  genai/ours, as exported     our artifact as exported now
  ours/onnx                   qwen-edge's onnxruntime backend, --threads
  ours/llama.cpp              qwen-edge's llama.cpp backend on the GGUF q4_0, --threads
  genai/ours, NAME            (each --variant NAME=JSON) our artifact with genai_config.json's decoder session
                              options updated by the JSON object (a null value removes the key), e.g.
                              --variant 'ort default spin={"session.intra_op.allow_spinning": null}'

--core-rows leaves out the no-thread-key and llama.cpp rows (as exported, ours/onnx and the variants only);
--busy keeps another process busy on the last CPU for the whole run (`python -c "while True: pass"`, as
bench_busy.py): the case in which qwen-edge's backend (spin: auto) stops spinning.

The qwen-edge rows and the genai timing use `qwen_edge.bench.run`'s own measurement (`_measure`, `_genai_once`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import start, write_record  # noqa: E402

CHILD = r"""
import json, os, sys
spec = json.loads(sys.argv[1])
import importlib
b = importlib.import_module("qwen_edge.bench.run")
if spec["engine"] == "genai":
    import onnxruntime_genai as og
    before = len(os.listdir("/proc/self/task"))
    model = og.Model(og.Config(spec["path"]))  # as it is: no overlay
    threads_started = len(os.listdir("/proc/self/task")) - before
    for _ in range(spec["warmup"]):
        b._genai_once(og, model, spec["prompt"], min(spec["gen_tokens"], 8), spec["max_context"])
    run = b._genai_once(og, model, spec["prompt"], spec["gen_tokens"], spec["max_context"])
    run["os_threads_started"] = threads_started
else:
    run = b._measure(spec)
print(json.dumps({k: run[k] for k in ("decode_tokens_per_s", "prefill_tokens_per_s", "os_threads_started")
                  if k in run}))
"""

ROWS = ("genai/ours, no thread key", "genai/ours, as exported", "ours/onnx", "ours/llama.cpp")
RATIOS = {"genai no thread key / ours onnx": ("genai/ours, no thread key", "ours/onnx"),
          "genai as exported / ours onnx": ("genai/ours, as exported", "ours/onnx"),
          "ours onnx / ours llama.cpp": ("ours/onnx", "ours/llama.cpp")}


def edited_copy(art: Path, out: Path, edits: dict) -> Path:
    """A genai folder of the same files (symlinks) whose genai_config.json's decoder session options are updated by
    `edits` (a None value removes the key)."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for f in art.iterdir():
        if f.name not in ("manifest.json", "genai_config.json"):
            (out / f.name).symlink_to(f.resolve())
    cfg = json.loads((art / "genai_config.json").read_text())
    so = cfg["model"]["decoder"]["session_options"]
    for k, v in edits.items():
        if v is None:
            so.pop(k, None)
        else:
            so[k] = v
    (out / "genai_config.json").write_text(json.dumps(cfg, indent=2))
    return out


def measure(rows: tuple[str, ...], specs: dict[str, dict], env: dict[str, str], repeats: int) -> dict[str, list]:
    """Every row once per repeat, each in a fresh process, order alternating per repeat."""
    runs: dict[str, list[dict]] = {r: [] for r in rows}
    for i in range(repeats):
        for row in (rows if i % 2 == 0 else rows[::-1]):
            p = subprocess.run([sys.executable, "-c", CHILD, json.dumps(specs[row])], capture_output=True, text=True,
                               env=env, timeout=900)
            if p.returncode != 0:
                raise SystemExit(f"{row} failed:\n{p.stderr[-3000:]}")
            r = json.loads(p.stdout.strip().splitlines()[-1])
            runs[row].append(r)
            print(f"repeat {i + 1}/{repeats} {row}: decode {r['decode_tokens_per_s']:.1f} prefill "
                  f"{r['prefill_tokens_per_s']:.1f} tok/s", file=sys.stderr)
    return runs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnx", type=Path, required=True, help="our ONNX int4 artifact (exported by this tree)")
    ap.add_argument("--gguf", type=Path, required=True, help="our GGUF q4_0 artifact of the same checkpoint")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--label", default="")
    ap.add_argument("--note", action="append", default=[])
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                    help="another genai row: the artifact with these session option edits (null removes a key)")
    ap.add_argument("--core-rows", action="store_true", help="leave out the no-thread-key and llama.cpp rows")
    ap.add_argument("--busy", action="store_true", help="keep one CPU busy with another process during the run")
    a = ap.parse_args()
    variants = {}
    for v in a.variant:
        name, _, edits = v.partition("=")
        try:
            variants[f"genai/ours, {name}"] = json.loads(edits)
        except json.JSONDecodeError as e:
            raise SystemExit(f"--variant {v!r}: not NAME=JSON ({e})") from None
        if not name or not isinstance(variants[f"genai/ours, {name}"], dict):
            raise SystemExit(f"--variant {v!r}: not NAME=JSON object")
    rows = (ROWS[1:3] if a.core_rows else ROWS) + tuple(variants)
    copies = {**({} if a.core_rows else {ROWS[0]: {"intra_op_num_threads": None}}), **variants}
    sys.path.insert(0, str(ROOT))
    from qwen_edge.bench.run import bench_prompt, model_files

    written = json.loads((a.onnx / "genai_config.json").read_text())["model"]["decoder"]["session_options"]
    if "intra_op_num_threads" not in written:
        raise SystemExit(f"{a.onnx}: genai_config.json has no intra_op_num_threads: export it with this tree")
    folders = {row: edited_copy(a.onnx, a.onnx.parent / f"{a.onnx.name}-variant{i}", edits)
               for i, (row, edits) in enumerate(copies.items())}
    paths = {ROWS[1]: a.onnx, ROWS[2]: a.onnx, ROWS[3]: a.gguf, **folders}
    ctx = a.prompt_tokens + a.gen_tokens + 64
    specs = {}
    for row in rows:
        path, engine = paths[row], "genai" if row.startswith("genai/") else "ours"
        _, fmt, _, _, meta = model_files(a.gguf if path == a.gguf else a.onnx)
        specs[row] = {"engine": engine, "path": str(path), "target": None, "threads": a.threads, "max_context": ctx,
                      "prompt": bench_prompt(a.onnx, a.prompt_tokens), "gen_tokens": a.gen_tokens,
                      "warmup": a.warmup, "arch": meta["architecture"], "kv_itemsize": 4}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start()
    hog = None
    if a.busy:
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        os.sched_setaffinity(hog.pid, {max(os.sched_getaffinity(0))})
    try:
        runs = measure(rows, specs, env, a.repeats)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    res = {}
    for row, rs in runs.items():
        res[row] = {k: {"median": statistics.median(x[k] for x in rs), "min": min(x[k] for x in rs),
                        "max": max(x[k] for x in rs), "per_repeat": [x[k] for x in rs]}
                    for k in ("decode_tokens_per_s", "prefill_tokens_per_s")}
        if "os_threads_started" in rs[0]:
            res[row]["os_threads_started"] = rs[0]["os_threads_started"]
    ratios = {}
    pairs = {**RATIOS, **{f"genai {r.split(', ', 1)[1]} / ours onnx": (r, "ours/onnx") for r in variants}}
    for name, (x, y) in pairs.items():
        if x not in res or y not in res:
            continue
        ratios[name] = {}
        for k in ("decode_tokens_per_s", "prefill_tokens_per_s"):
            xs, ys = res[x][k]["per_repeat"], res[y][k]["per_repeat"]
            ratios[name][k] = {"medians": res[x][k]["median"] / res[y][k]["median"],
                               "paired_median": statistics.median(p / q for p, q in zip(xs, ys))}
    for row, r in res.items():
        print(f"{row:28s} decode {r['decode_tokens_per_s']['median']:6.1f}  prefill "
              f"{r['prefill_tokens_per_s']['median']:6.1f} tok/s  threads started {r.get('os_threads_started', '-')}")
    for name, v in ratios.items():
        print(f"{name}: decode {v['decode_tokens_per_s']['medians']:.2f}x (paired "
              f"{v['decode_tokens_per_s']['paired_median']:.2f}x), prefill {v['prefill_tokens_per_s']['medians']:.2f}x "
              f"(paired {v['prefill_tokens_per_s']['paired_median']:.2f}x)")
    write_record("genai_threads", {"results": res, "ratios": ratios,
                                   "session_options_as_exported": written},
                 settings={"threads": a.threads, "repeats": a.repeats, "warmup": a.warmup,
                           "prompt_tokens": a.prompt_tokens, "gen_tokens": a.gen_tokens, "max_context": ctx,
                           "onnx": a.onnx.name, "gguf": a.gguf.name, "variants": variants,
                           "busy_core": a.busy},
                 notes=a.note, label=a.label)
    for folder in folders.values():
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
