"""Load time of `qwen_edge.load()` against the bare engine on the same file (issue 12): GGUF f16 and ONNX int4.

Usage: python benchmarks/bench_load.py [--ckpt /tmp/ck/q05] [--out /tmp/art] [--repeats 7] [--threads N]
                                       [--n-ctx 4096] [--before DIR] [--variants bare,load,load+hash] [--json FILE]
                                       [--imports]

The artifacts are made once if missing (`qwen-edge synth qwen2.5-0.5b -o CKPT`, then `qwen-edge export CKPT
--format gguf --quant f16 -o OUT --no-verify` and `--format onnx --quant int4`). Every load runs in a fresh process
whose clock covers only the load call, with the engine module (llama_cpp / onnxruntime) and the `qwen_edge` package
already imported on both sides (qwen-edge's lazy imports of its own backend modules are counted):
- bare: `llama_cpp.Llama(model_path=..., n_ctx=N, n_threads=T, n_threads_batch=T, verbose=False)` /
  `onnxruntime.InferenceSession(model.onnx, SessionOptions(intra_op_num_threads=T), CPU provider)`;
- load: `qwen_edge.load(artifact, max_context=N, threads=T)`;
- load+hash: the same with `check_hashes=True` (sha256 of every file, the opt-in).
`--imports`: the clock starts before the imports instead (bare: `import llama_cpp` / `import onnxruntime`; load:
`import qwen_edge`, which imports its engine when it loads), what an app pays from a fresh interpreter.
Variants alternate order per repeat (forward, then reversed), after one untimed warm-up of each; before every load
the parent reads the artifact's files, so each starts with them in the page cache.
Reported: the median (min-max) wall seconds of each and median(load) / median(bare) (target <= 1.3x); also the
process CPU seconds (all threads) over the same call, steadier than wall time on a machine shared with other jobs.
`--before DIR` adds a variant `load@before`: `qwen_edge.load()` imported from another source tree (e.g. an older
commit: `git archive COMMIT qwen_edge runtimes | tar -x -C DIR`), run alternated with the others in the same repeats.
"""

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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import write_record  # noqa: E402

CHILD = r"""
import json, sys, time
spec = json.loads(sys.argv[1])
if spec["code"]:
    sys.path.insert(0, spec["code"])
fmt, variant, n_ctx, threads = spec["format"], spec["variant"], spec["n_ctx"], spec["threads"]
t, c = time.perf_counter(), time.process_time()
# --imports: the clock covers the imports too: the engine module for bare, the qwen_edge package for load (which
# imports its engine itself); otherwise both are imported before the clock starts
if variant == "bare" or not spec["imports"]:
    engine = __import__("llama_cpp" if fmt == "gguf" else "onnxruntime")
if variant != "bare" or not spec["imports"]:
    import qwen_edge
if not spec["imports"]:
    t, c = time.perf_counter(), time.process_time()
if variant == "bare" and fmt == "gguf":
    model = engine.Llama(model_path=spec["model"], n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                         verbose=False)
elif variant == "bare":
    so = engine.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    model = engine.InferenceSession(spec["model"], so, providers=["CPUExecutionProvider"])
else:
    opts = {"check_hashes": True} if variant == "load+hash" else {}
    model = qwen_edge.load(spec["artifact"], max_context=n_ctx, threads=threads, **opts)
    assert model.info.context_length == n_ctx, model.info
dt, cpu = time.perf_counter() - t, time.process_time() - c
import qwen_edge
print(json.dumps({"load_s": dt, "cpu_s": cpu, "qwen_edge": qwen_edge.__file__,
                  "onnx_imported": "onnx" in sys.modules}))
"""


def machine() -> dict[str, str]:
    model, flags = platform.processor() or "", set()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                model = value.strip()
            elif key.strip() == "Flags":
                flags = set(value.split())
    except (OSError, subprocess.CalledProcessError):
        pass
    isa = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ("avx2", "avx512f", "avx512_vnni"))
    return {"cpu": model, "isa": isa, "cores": str(os.cpu_count()), "python": platform.python_version(),
            "system": platform.platform()}


def ensure_artifacts(ckpt: Path, out: Path, env: dict[str, str]) -> dict[str, Path]:
    cli = [sys.executable, "-m", "qwen_edge.cli"]
    if not (ckpt / "config.json").is_file():
        subprocess.run([*cli, "synth", "qwen2.5-0.5b", "-o", str(ckpt)], check=True, env=env)
    arts = {}
    for fmt, quant in (("gguf", "f16"), ("onnx", "int4")):
        found = [p.parent for p in out.glob(f"*{fmt}-{quant}*/manifest.json")]
        if not found:
            subprocess.run([*cli, "export", str(ckpt), "--format", fmt, "--quant", quant, "-o", str(out),
                            "--no-verify"], check=True, env=env)
            found = [p.parent for p in out.glob(f"*{fmt}-{quant}*/manifest.json")]
        arts[fmt] = sorted(found)[0]
    return arts


def warm_page_cache(folder: Path) -> None:
    """Read every file of the artifact so each timed load starts with it in the page cache: the onnxruntime backend
    drops the tied embedding's pages after loading (see _trim_mapped_weights), which would otherwise make whichever
    load comes next, bare or not, read them from disk."""
    for p in folder.iterdir():
        if p.is_file():
            with open(p, "rb", buffering=0) as f:
                while f.read(16 << 20):
                    pass


ONNX_IMPORTED: dict[str, dict[str, bool]] = {}
"""Per format and variant: whether the `onnx` package was in sys.modules after the load (issue 24: load should not
import it)."""


def run_one(spec: dict, env: dict[str, str]) -> tuple[float, float]:
    warm_page_cache(Path(spec["artifact"]))
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True, env=env,
                       timeout=600)
    if r.returncode != 0:
        raise SystemExit(f"{spec['format']} {spec['variant']} failed:\n{r.stderr[-3000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    want = Path(spec["code"] or ROOT) / "qwen_edge"
    if Path(out["qwen_edge"]).resolve().parent != want.resolve():
        raise SystemExit(f"the child imported qwen_edge from {out['qwen_edge']}, not {want}")
    ONNX_IMPORTED.setdefault(spec["format"], {})[spec["variant"] + ("@before" if spec["code"] else "")] = \
        bool(out["onnx_imported"])
    return float(out["load_s"]), float(out["cpu_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", type=Path, default=Path("/tmp/ck/q05"))
    ap.add_argument("--out", type=Path, default=Path("/tmp/art"))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--n-ctx", type=int, default=4096)
    ap.add_argument("--before", type=Path, default=None, help="also time load() from this source tree")
    ap.add_argument("--variants", default="bare,load,load+hash")
    ap.add_argument("--imports", action="store_true", help="the clock covers the imports too (see above)")
    ap.add_argument("--formats", default="gguf,onnx")
    ap.add_argument("--json", type=Path, help="also write the raw figures here")
    ap.add_argument("--label", default="", help="suffix of the record's file name under benchmarks/results/")
    ap.add_argument("--note", action="append", default=[], help="a sentence stored in the record (repeatable)")
    a = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    arts = ensure_artifacts(a.ckpt, a.out, env)
    from qwen_edge.device.targets import physical_cores

    threads = a.threads or physical_cores()
    variants = a.variants.split(",") + (["load@before"] if a.before else [])
    before = str(a.before.resolve()) if a.before else ""
    results: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for fmt in a.formats.split(","):
        art = arts[fmt]
        model = art / ("model.gguf" if fmt == "gguf" else "model.onnx")
        specs = {v: {"format": fmt, "variant": v.split("@")[0], "artifact": str(art), "model": str(model),
                     "n_ctx": a.n_ctx, "threads": threads, "code": before if v.endswith("@before") else "",
                     "imports": a.imports}
                 for v in variants}
        for v in variants:  # warm-up: page cache, pyc files
            run_one(specs[v], env)
        times: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
        for i in range(a.repeats):
            for v in (variants if i % 2 == 0 else variants[::-1]):
                times[v].append(run_one(specs[v], env))
        results[fmt] = times
    m = machine()
    print(f"load time, synthesized Qwen2.5-0.5B, {a.repeats} repeats per variant, alternating order, fresh process "
          f"each; n_ctx {a.n_ctx}, {threads} threads; clock {'from before the imports' if a.imports else 'after the imports'}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"machine: {m['cpu']}, {m['cores']} logical cores, {m['isa']}; Python {m['python']}")
    print(f"qwen_edge from: {ROOT}" + (f"; load@before from {before}" if before else "") + "\n")
    print("| file | variant | load s median (min-max) | x bare | CPU s median (min-max) | CPU x bare |")
    print("|---|---|---:|---:|---:|---:|")
    for fmt, times in results.items():
        walls = {v: [w for w, _ in xs] for v, xs in times.items()}
        cpus = {v: [c for _, c in xs] for v, xs in times.items()}
        base = {k: statistics.median(d["bare"]) if "bare" in d else None for k, d in (("wall", walls), ("cpu", cpus))}
        name = arts[fmt].name
        size = sum(p.stat().st_size for p in arts[fmt].iterdir() if p.is_file()) / 1e6
        for v in times:
            w, c = statistics.median(walls[v]), statistics.median(cpus[v])
            wr = f"{w / base['wall']:.2f}" if base["wall"] else "-"
            cr = f"{c / base['cpu']:.2f}" if base["cpu"] else "-"
            print(f"| {name} ({size:.0f} MB) | {v} | {w:.3f} ({min(walls[v]):.3f}-{max(walls[v]):.3f}) | {wr} "
                  f"| {c:.3f} ({min(cpus[v]):.3f}-{max(cpus[v]):.3f}) | {cr} |")
    if a.json:
        a.json.write_text(json.dumps({"machine": m, "n_ctx": a.n_ctx, "threads": threads, "code": str(ROOT),
                                      "before": before, "results": results}, indent=2))
    files = {fmt: {"name": arts[fmt].name, "bytes": sum(p.stat().st_size for p in arts[fmt].iterdir() if p.is_file())}
             for fmt in results}
    write_record("load", {"load_and_cpu_s": results, "artifacts": files, "onnx_imported": ONNX_IMPORTED},
                 settings={"n_ctx": a.n_ctx, "threads": threads, "repeats": a.repeats, "variants": variants,
                           "imports_timed": a.imports,
                           "checkpoint": str(a.ckpt), "before": before},
                 notes=a.note, label=a.label)


if __name__ == "__main__":
    main()
