"""The app path (issue 17): onnxruntime-genai's generator on our int4 artifact vs on its own builder's int4 graph of
the same checkpoint, beside our backend on the same artifact and llama.cpp q4_0, in one interleaved run.

Exports our ONNX int4 and GGUF q4_0, builds onnxruntime-genai's builder graph (`python -m
onnxruntime_genai.models.builder -p int4 -e cpu`, which needs onnx_ir: NEEDS below), then times four rows with
`qwen-edge bench`'s machinery (every run a fresh process, the order alternating per repeat, medians):

  genai/builder   onnxruntime-genai generator on the builder's graph (the anchor)
  genai/ours      onnxruntime-genai generator on our artifact, loaded as is
  genai/ours, onnxruntime session defaults   the same graph with the session options of genai_config.json as the
                  builder writes them (onnxruntime's default spinning): the graph's share of the difference
  ours/onnx       qwen-edge's backend on our artifact
  ours/llama.cpp  qwen-edge's backend (llama-cpp-python) on the GGUF q4_0

and records decode and prefill tokens/s, and the two ratios of the issue (genai/ours over genai/builder; ours/onnx
over ours/llama.cpp) as ratios of medians and paired per repeat. The builder's graph is built here, never committed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import write_record  # noqa: E402
from bench_onnx_vs_llama import EXPORT, child, source_checkpoint  # noqa: E402

NEEDS = ("onnxruntime-genai==0.18.0", "onnx_ir==1.1.0")
"""What this script needs beside qwen-edge[test]: the generator, and onnx_ir, which the 0.18 builder imports."""
CONTROL = "genai/ours, onnxruntime session defaults"
ROWS = ("genai/builder", "genai/ours", CONTROL, "ours/onnx", "ours/llama.cpp")
RATIOS = {"genai: ours / builder": ("genai/ours", "genai/builder"),
          "genai: ours with onnxruntime session defaults / builder": (CONTROL, "genai/builder"),
          "ours: onnx / llama.cpp": ("ours/onnx", "ours/llama.cpp")}


def check_needs() -> dict[str, str]:
    have = {}
    for need in NEEDS:
        name, want = need.split("==")
        try:
            have[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"needs {need}: pip install '{need}'") from None
        if have[name] != want:
            print(f"warning: {name} {have[name]} installed, this benchmark pins {want}", file=sys.stderr)
    return have


def build_anchor(src: Path, out: Path, cache: Path) -> dict[str, Any]:
    """onnxruntime-genai's own builder, int4 for CPU, with its defaults (no extra options)."""
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", src.name, "-i", str(src), "-o", str(out),
           "-p", "int4", "-e", "cpu", "-c", str(cache)]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0 or not (out / "genai_config.json").is_file():
        raise SystemExit(f"the builder failed ({p.returncode}):\n{p.stderr[-3000:]}")
    shown = ["python", "-m", "onnxruntime_genai.models.builder", "-m", src.name, "-i", "SOURCE", "-o", "OUT",
             "-p", "int4", "-e", "cpu"]
    return {"command": " ".join(shown), "seconds": round(time.perf_counter() - t, 1), "path": str(out)}


def default_session_copy(art: Path, out: Path) -> Path:
    """An onnxruntime-genai folder with our graph (hard links) whose genai_config.json keeps only the session options
    the builder writes (log_id, provider_options): no manifest.json, so bench runs it as a plain genai model."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for f in art.iterdir():
        if f.name not in ("manifest.json", "genai_config.json"):
            os.link(f, out / f.name)
    cfg = json.loads((art / "genai_config.json").read_text())
    so = cfg["model"]["decoder"]["session_options"]
    cfg["model"]["decoder"]["session_options"] = {k: so[k] for k in ("log_id", "provider_options") if k in so}
    (out / "genai_config.json").write_text(json.dumps(cfg, indent=2))
    return out


def graph_facts(model: Path) -> dict[str, Any]:
    """Op counts and the attributes that decide speed: MatMulNBits (bits, block, accuracy level) by N, LM head
    output shape, KV dtype."""
    import onnx

    g = onnx.load(str(model), load_external_data=False).graph
    mnb = Counter()
    for n in g.node:
        if n.op_type == "MatMulNBits":
            a = {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute}
            mnb[f"bits {a['bits']} block {a['block_size']} acc {a.get('accuracy_level', 0)}"
                + (" (LM head)" if a["N"] > 100_000 else "")] += 1
    logits = next(o for o in g.output if o.name == "logits")
    past = next(i for i in g.input if i.name.startswith("past_key_values"))
    return {"nodes": len(g.node), "ops": dict(Counter(n.op_type for n in g.node).most_common()),
            "matmulnbits": dict(mnb),
            "logits_shape": [d.dim_param or d.dim_value for d in logits.type.tensor_type.shape.dim],
            "kv_elem_type": onnx.TensorProto.DataType.Name(past.type.tensor_type.elem_type)}


def paired(a: dict[str, Any], b: dict[str, Any], key: str) -> dict[str, float]:
    import statistics

    xs = [x / y for x, y in zip(a["per_repeat"][key], b["per_repeat"][key])]
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", help="checkpoint directory (default: synthesize qwen2.5-0.5b into --workdir)")
    ap.add_argument("--workdir", default="/tmp/qwen-edge-genai")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--onnx-options", default="{}", help="JSON exporter options for our int4 artifact")
    ap.add_argument("--target", default="cpu-x86_64",
                    help="target profile of our ONNX exports (its block size and LM head bits are their defaults)")
    ap.add_argument("--variant-options", help="JSON exporter options of a second int4 export, timed under both engines "
                    "as two more rows (e.g. a block size or LM head a target profile might pick)")
    ap.add_argument("--keep", action="store_true", help="keep the exports and the builder's graph in --workdir")
    ap.add_argument("--label", default="", help="suffix of the record's file name under benchmarks/results/")
    ap.add_argument("--note", action="append", default=[], help="a sentence stored in the record (repeatable)")
    a = ap.parse_args()
    versions = check_needs()
    work = Path(a.workdir)
    src = source_checkpoint(a.source, work)

    onnx_exp = child(EXPORT, str(src), "onnx", "int4", str(work), "onnx-int4", a.onnx_options, a.target)
    gguf_exp = child(EXPORT, str(src), "gguf", "q4_0", str(work), "gguf-q4_0", "{}")
    anchor = build_anchor(src, work / "genai-builder-int4", work / "builder-cache")
    ours_art, gguf_art, builder_art = Path(onnx_exp["path"]), Path(gguf_exp["path"]), Path(anchor["path"])

    sys.path.insert(0, str(ROOT))
    from qwen_edge.bench.run import bench

    control_art = default_session_copy(ours_art, work / "onnx-int4-session-defaults")
    pairs = [(builder_art, "onnxruntime-genai"), (ours_art, "onnxruntime-genai"), (control_art, "onnxruntime-genai"),
             (ours_art, "qwen-edge"), (gguf_art, "qwen-edge")]
    rows, ratios_of, cleanup = list(ROWS), dict(RATIOS), [ours_art, gguf_art, builder_art, control_art]
    exports, graphs = {"onnx int4": onnx_exp, "gguf q4_0": gguf_exp}, {"genai/builder": builder_art, "ours": ours_art}
    if a.variant_options:
        var_exp = child(EXPORT, str(src), "onnx", "int4", str(work), "onnx-int4-variant", a.variant_options,
                        a.target)
        var_art = Path(var_exp["path"])
        pairs += [(var_art, "onnxruntime-genai"), (var_art, "qwen-edge")]
        rows += ["genai/ours variant", "ours/onnx variant"]
        ratios_of.update({"genai: ours variant / builder": ("genai/ours variant", "genai/builder"),
                          "ours: onnx variant / llama.cpp": ("ours/onnx variant", "ours/llama.cpp")})
        cleanup.append(var_art)
        exports["onnx int4 variant"], graphs["ours variant"] = var_exp, var_art
    load_before = os.getloadavg()
    report = bench(pairs, prompt_tokens=a.prompt_tokens, gen_tokens=a.gen_tokens, threads=a.threads,
                   repeat=a.repeats, warmup=1, log=lambda m: print(m, file=sys.stderr))
    load_after = os.getloadavg()
    res = dict(zip(rows, report["results"]))
    for r in res.values():
        r.pop("generated_ids", None)
    ratios = {}
    for name, (x, y) in ratios_of.items():
        ratios[name] = {k: {"medians": res[x][f"{k}_tokens_per_s"]["median"] / res[y][f"{k}_tokens_per_s"]["median"],
                            "paired": paired(res[x], res[y], f"{k}_tokens_per_s")} for k in ("decode", "prefill")}
    figures = {
        "results": res, "ratios": ratios,
        "anchor": {**anchor, "onnxruntime_genai": versions["onnxruntime-genai"], "onnx_ir": versions["onnx_ir"]},
        "graphs": {name: graph_facts(p / "model.onnx") for name, p in graphs.items()},
        "session_options": {name: json.loads((p / "genai_config.json").read_text())["model"]["decoder"][
            "session_options"] for name, p in (("genai/builder", builder_art), ("genai/ours", ours_art),
                                               (CONTROL, control_art))},
        "export": exports,
    }
    settings = {"threads": a.threads, "prompt_tokens": a.prompt_tokens, "gen_tokens": a.gen_tokens,
                "repeats": a.repeats, "source": str(src), "onnx_options": json.loads(a.onnx_options),
                "export_target": a.target,
                "variant_options": json.loads(a.variant_options) if a.variant_options else None,
                "load_average_before": [round(x, 2) for x in load_before],
                "load_average_after": [round(x, 2) for x in load_after], **report["config"]}
    for row, r in res.items():
        d, p = r["decode_tokens_per_s"], r["prefill_tokens_per_s"]
        print(f"{row:42s} decode {d['median']:6.1f} ({d['min']:.1f}-{d['max']:.1f})  "
              f"prefill {p['median']:6.1f} ({p['min']:.1f}-{p['max']:.1f}) tok/s")
    for name, v in ratios.items():
        print(f"{name}: decode {v['decode']['medians']:.2f}x (paired {v['decode']['paired']['median']:.2f}x), "
              f"prefill {v['prefill']['medians']:.2f}x (paired {v['prefill']['paired']['median']:.2f}x)")
    write_record("genai", figures, settings=settings, notes=a.note, label=a.label,
                 extra_machine={"read_bandwidth_gbps": report["machine"].get("read_bandwidth_gbps")})
    if not a.keep:
        for p in (*cleanup, work / "builder-cache"):
            shutil.rmtree(p, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
