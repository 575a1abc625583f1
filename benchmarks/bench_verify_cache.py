"""verify at CI scale (issue 32): one verify cold and warm, and a six-quantization matrix, before and after.

    python benchmarks/bench_verify_cache.py --ckpt DIR [--work DIR] [--before-src DIR] [--quants gguf:q8_0,...]

The checkpoint is the synthesized Qwen2.5-0.5B (`qwen-edge synth qwen2.5-0.5b -o DIR`, made when DIR lacks it).
The artifacts are exported first (`--no-verify`, not timed). Each timing is the wall time of one `qwen-edge`
process (imports included), full evaluation text:

- before: `verify ART` with the code of --before-src (a copy of the qwen_edge package before this change, e.g.
  `git archive <base> qwen_edge | tar -x -C DIR`), and, with --before-matrix, the six verifies run one by one;
- after: `verify ART` with a fresh reference cache (cold: computes and stores the reference), again (warm: reads
  it), and with --no-reference-cache; then `export CKPT --format ... --quant ...` over the six exported (up to
  date) artifacts with a fresh cache: the matrix, which verifies each against one reference computed once.
With --floor, also the artifact side alone, in this process: each artifact's all-position forwards over the
evaluation windows and its teacher-forced greedy prompts (what every verify runs on the artifact, cache or not), so
the matrix's lower bound on this machine is the reference once plus these six.
Writes a record (benchmarks/results/verify_cache-*.json), rendered in RESULTS.md by report.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _record import write_record  # noqa: E402

QUANTS = "gguf:q8_0,gguf:q6_k,gguf:q5_k_m,gguf:q4_k_m,gguf:q4_0,onnx:int4"


def timed(args: list[str], env: dict[str, str], pythonpath: str, cwd: Path) -> tuple[float, int, str]:
    """One `qwen-edge` process with `pythonpath`'s package, run from `cwd` (`python -m` puts the working directory
    first on sys.path: run from a checkout, it would import that checkout's package whatever PYTHONPATH says)."""
    e = {**os.environ, **env, "PYTHONPATH": pythonpath}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "qwen_edge.cli", *args], capture_output=True, text=True, env=e,
                       cwd=cwd)
    return time.perf_counter() - t0, r.returncode, r.stdout


def artifact_forwards(art: Path, quick: bool) -> float:
    """Seconds of the forwards a verify runs on `art` (loaded first, not timed): every evaluation window with all
    positions' logits, then each greedy prompt with GREEDY_TOKENS - 1 more ids in one all-logits prefill."""
    from qwen_edge.backends import load
    from qwen_edge.quality.verify import GREEDY_TOKENS, load_eval_set
    from qwen_edge.text.tokenizer import Tokenizer

    ev = load_eval_set(Tokenizer.from_dir(art), quick=quick)
    longest = max([len(w) for w in ev.windows] + [len(p) + GREEDY_TOKENS for p in ev.prompts])
    with load(art, max_context=longest + 8) as rt:
        t0 = time.perf_counter()
        for w in ev.windows:
            rt.reset()
            rt.prefill_all_logits(w)
        for p in ev.prompts:
            rt.reset()
            rt.prefill_all_logits(list(p) + [int(p[i % len(p)]) for i in range(GREEDY_TOKENS - 1)])
        return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--work", default=None)
    ap.add_argument("--before-src", help="directory holding the qwen_edge package before this change")
    ap.add_argument("--before-matrix", action="store_true", help="also time the six verifies with the old code")
    ap.add_argument("--quants", default=QUANTS)
    ap.add_argument("--skip-uncached", action="store_true", help="leave out the --no-reference-cache run")
    ap.add_argument("--single", default="onnx:int4", help="the artifact of the single-verify timings")
    ap.add_argument("--floor", action="store_true", help="time each artifact's own forwards (the matrix's floor)")
    ap.add_argument("--quick", action="store_true", help="the quick evaluation text (verify --quick, the matrix with "
                    "verify.quick=true): a quarter of the positions, for a busy machine")
    a = ap.parse_args()
    from qwen_edge.model.synth import synth

    ckpt = Path(a.ckpt)
    if not (ckpt / "config.json").is_file():
        synth("qwen2.5-0.5b", ckpt)
    work = Path(a.work or tempfile.mkdtemp(prefix="bench_verify_cache_"))
    work.mkdir(parents=True, exist_ok=True)
    pairs = [tuple(q.split(":")) for q in a.quants.split(",")]
    now = str(ROOT)
    fmts = ",".join(dict.fromkeys(f for f, _ in pairs))
    quants = ",".join(dict.fromkeys(q for _, q in pairs))
    matrix = ["export", str(ckpt), "--format", fmts, "--quant", quants, "-o", str(work / "out")]
    quick = ["--quick"] if a.quick else []
    nocache = {"QWEN_EDGE_REFERENCE_CACHE": str(work / "refcache_unused")}  # never the user's cache
    s, rc, table = timed([*matrix, "--no-verify"], nocache, now, work)  # the artifacts, under the matrix's own names
    if rc:
        raise SystemExit(f"export failed ({rc})")
    arts = {f"{row[1]}:{row[2]}": work / "out" / row[0] for row in (line.split() for line in table.splitlines()[1:-1])}
    import shutil

    # the single verifies record their parity in a copy: in the matrix's artifact it would be reused, not re-verified
    single = str(shutil.copytree(arts[a.single], work / "single" / arts[a.single].name, dirs_exist_ok=True))
    fig: dict = {"exports_seconds": round(s, 1)}

    def run(label: str, args: list[str], env: dict[str, str], src: str) -> None:
        s, rc, out = timed(args, {**nocache, **env}, src, work)
        fig[label] = {"seconds": round(s, 1), "exit": rc}
        if args[0] == "verify" and out.strip().startswith("{"):
            rep = json.loads(out)
            fig[label].update(passed=rep["passed"], kl_mean=rep["metrics"]["kl_mean"],
                              top1=rep["metrics"]["top1_agreement"], tokens=rep["tokens_evaluated"],
                              cache=(rep.get("reference_cache") or {}).get("state"))
        print(label, fig[label], file=sys.stderr, flush=True)

    if a.before_src:
        run("before_verify", ["verify", single, "--json", *quick], {}, a.before_src)
    cache = tempfile.mkdtemp(prefix="refcache_", dir=work)
    run("after_verify_cold", ["verify", single, "--json", *quick], {"QWEN_EDGE_REFERENCE_CACHE": cache}, now)
    run("after_verify_warm", ["verify", single, "--json", *quick], {"QWEN_EDGE_REFERENCE_CACHE": cache}, now)
    if not a.skip_uncached:
        run("after_verify_uncached", ["verify", single, "--json", "--no-reference-cache", *quick], {}, now)
    cache2 = tempfile.mkdtemp(prefix="refcache_matrix_", dir=work)
    run("after_matrix", matrix + (["--set", "verify.quick=true"] if a.quick else []),
        {"QWEN_EDGE_REFERENCE_CACHE": cache2}, now)  # exports up to date: verifies only
    if a.before_matrix and a.before_src:
        total = 0.0
        for k, art in arts.items():
            run(f"before_matrix_{k}", ["verify", str(art), "--json", *quick], {}, a.before_src)
            total += fig[f"before_matrix_{k}"]["seconds"]
        fig["before_matrix_total"] = round(total, 1)
    if a.floor:
        fig["artifact_forwards_s"] = {k: round(artifact_forwards(art, a.quick), 1) for k, art in arts.items()}
        print("artifact_forwards_s", fig["artifact_forwards_s"], file=sys.stderr, flush=True)
    entry = sum(p.stat().st_size for p in Path(cache).glob("*.npy"))
    write_record("verify_cache", fig, settings={"checkpoint": "synthesized Qwen2.5-0.5B (qwen-edge synth)",
                                                "single": a.single, "quants": a.quants, "text": "quick" if a.quick else "full"},
                 notes=[f"reference cache entry: {entry} bytes"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
