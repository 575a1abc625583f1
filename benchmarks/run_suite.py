"""The standard suite: synthesize Qwen2.5-0.5B and Qwen3-0.6B, export six artifacts each, bench them with torch.

Writes one record under benchmarks/results/ and renders benchmarks/RESULTS.md from all records (benchmarks/report.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from _record import write_record  # noqa: E402

MODELS = ("qwen2.5-0.5b", "qwen3-0.6b")
EXPORTS = (("gguf", "q4_0"), ("gguf", "q4_k_m"), ("gguf", "q8_0"), ("onnx", "int4"), ("onnx", "int8"),
           ("onnx", "fp32"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", default="/tmp/qwen-edge-suite", help="checkpoints and artifacts go here")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-torch", action="store_true", help="leave the torch reference out of the bench")
    ap.add_argument("--out", default=str(HERE), help="where the plots go (the record: OUT/results unless OUT is "
                                                  "benchmarks/, where RESULTS.md is then rendered from the records)")
    ap.add_argument("--label", default="", help="suffix of the record's file name under benchmarks/results/")
    ap.add_argument("--note", action="append", default=[], help="a sentence stored in the record (repeatable)")
    a = ap.parse_args(argv)

    from qwen_edge.bench.report import plot
    from qwen_edge.bench.run import bench
    from qwen_edge.export import export
    from qwen_edge.model.synth import synth

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
    settings = {**{k: v for k, v in reports[0]["config"].items() if k not in ("date", "seconds")},
                "models": a.models.split(","), "exports": [f"{f}:{q}" for f, q in EXPORTS], "torch": not a.no_torch,
                "workdir": str(work)}
    figures: dict = {"suite_seconds": round(elapsed), "reports": [], "plots": {}}
    for model, report, png in sections:
        figures["reports"].append({"model": model, "read_bandwidth_gbps": report["machine"]["read_bandwidth_gbps"],
                                   "bench_seconds": report["config"].get("seconds"), "results": report["results"]})
    rec = write_record("suite", figures, settings=settings, notes=a.note, label=a.label,
                       out_dir=None if out.resolve() == HERE else out / "results",
                       extra_machine={"read_bandwidth_gbps": reports[0]["machine"]["read_bandwidth_gbps"]})
    # plots named after the record, next to RESULTS.md; the record names them
    for model, report, png in sections:
        dest = png.with_name(f"{rec.stem}-{model}.png")
        png.replace(dest)
        figures["plots"][model] = dest.name
    combined = {"machine": reports[0]["machine"], "results": [r for rep in reports for r in rep["results"]],
                "config": reports[0]["config"]}
    all_png = out / f"{rec.stem}-all.png"
    plot(combined, all_png)
    figures["plots"]["all"] = all_png.name
    doc = json.loads(rec.read_text(encoding="utf-8"))
    doc["figures"]["plots"] = figures["plots"]
    rec.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    if out.resolve() == HERE:
        from report import main as render

        render([])
    print(f"suite done in {elapsed / 60:.1f} min: {rec}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
