"""The standard suite: synthesize Qwen2.5-0.5B and Qwen3-0.6B, export six artifacts each, bench them with torch."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

MODELS = ("qwen2.5-0.5b", "qwen3-0.6b")
EXPORTS = (("gguf", "q4_0"), ("gguf", "q4_k_m"), ("gguf", "q8_0"), ("onnx", "int4"), ("onnx", "int8"),
           ("onnx", "fp32"))


SEPARATOR = "\n---\n"
"""Between the suite's section of RESULTS.md (rewritten by each run) and the component benchmarks (kept)."""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", default="/tmp/qwen-edge-suite", help="checkpoints and artifacts go here")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-torch", action="store_true", help="leave the torch reference out of the bench")
    ap.add_argument("--out", default=str(HERE), help="where RESULTS.md, results.json and results.png go")
    a = ap.parse_args(argv)

    from qwen_edge.bench import bench, markdown_table, plot
    from qwen_edge.export import export
    from qwen_edge.synth import synth

    t0 = time.perf_counter()
    work, out = Path(a.workdir), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    sections, reports = [], []
    for model in a.models.split(","):
        ckpt = work / "ckpt" / model
        if not (ckpt / "model.safetensors").is_file():
            print(f"synth {model}", file=sys.stderr)
            synth(model, ckpt, seed=0)
        arts: list[Path] = []
        for fmt, quant in EXPORTS:
            art = work / "artifacts" / f"{model}-{fmt}-{quant}"
            if not (art / "manifest.json").is_file():
                t = time.perf_counter()
                export(ckpt, fmt, quant, art.parent, name=art.name)
                print(f"export {art.name}: {time.perf_counter() - t:.0f}s", file=sys.stderr)
            arts.append(art)
        if not a.no_torch:
            arts.append(ckpt)
        report = bench(arts, prompt_tokens=a.prompt_tokens, gen_tokens=a.gen_tokens, threads=a.threads,
                       repeat=a.repeat, warmup=1, log=lambda s: print(s, file=sys.stderr))
        reports.append(report)
        png = out / f"results-{model}.png"
        plot(report, png)
        sections.append((model, report, png))
    elapsed = time.perf_counter() - t0
    combined = {"machine": reports[0]["machine"], "results": [r for rep in reports for r in rep["results"]],
                "config": {**reports[0]["config"], "models": a.models.split(","), "suite_seconds": round(elapsed)}}
    plot(combined, out / "results.png")
    (out / "results.json").write_text(json.dumps(combined, indent=2) + "\n", encoding="utf-8")
    m = combined["machine"]
    cmd = "python benchmarks/run_suite.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    lines = [
        "# qwen-edge standard benchmark suite", "",
        f"- date: {combined['config']['date']}",
        f"- command: `{cmd.strip()}` (suite run time {elapsed / 60:.1f} min: synth, export, bench)",
        f"- machine: {m['cpu']}, {m['physical_cores']} physical / {m['logical_cores']} logical cores, "
        f"{m['memory_bytes'] / 2**30:.0f} GiB, {m['os']}, Python {m['python']}",
        f"- libraries: {', '.join(f'{k} {v}' for k, v in m['libraries'].items())}",
        f"- measured read bandwidth: {m['read_bandwidth_gbps']} GB/s (numpy sum over 256 MiB, best of 5)",
        f"- {a.prompt_tokens} prompt tokens, {a.gen_tokens} generated (greedy), {a.threads} threads, "
        f"{a.repeat} repeats after 1 warm-up, each run in a fresh process, artifacts interleaved; medians with min-max",
        "- weights are synthesized (random, architecture-exact): latency and size are what the real models cost; "
        "the text they generate is meaningless.", "",
    ]
    for model, report, png in sections:
        lines += [f"## {model}", "", markdown_table(report), f"![{model}]({png.name})", ""]
    lines += ["## All", "", "![all](results.png)", "",
              "Roofline: bytes per decode token = weights read per token (the file's tensors, minus an embedding "
              "table that is only gathered when the head is separate) + the KV cache at the mean context; "
              "bound = bandwidth / bytes. See docs/verify.md (bench section).", ""]
    path = out / "RESULTS.md"
    # The suite owns the part above the first separator line; the component benchmarks below it are kept.
    rest = ""
    if path.is_file():
        old = path.read_text(encoding="utf-8")
        cut = old.find(SEPARATOR)
        rest = old[cut:] if cut >= 0 else ""
    path.write_text("\n".join(lines) + ("\n" + rest if rest else ""), encoding="utf-8")
    print(f"wrote {out / 'RESULTS.md'} in {elapsed / 60:.1f} min", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
