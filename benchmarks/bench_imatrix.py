"""Calibrated (importance-matrix) quantization against round-to-nearest, measured by the verify gate (issue 31).

    python benchmarks/bench_imatrix.py                       # the 512-wide fidelity checkpoint, every quant below
    python benchmarks/bench_imatrix.py --checkpoint DIR --quants gguf:q4_k_m,onnx:int4 [--quick]

For each quantization (GGUF, and ONNX int4): an export without and one with `--imatrix auto` (the matrix computed over the shipped
calibration text, qwen_edge/data/calib_text.json), each verified against the PyTorch reference on the evaluation
text (qwen_edge/data/eval_text.json), which the calibration never saw: KL mean, KL p99, top-1 agreement,
perplexity change, and whether the default gate passes. iq3_xxs and iq2_xs exist only calibrated (llama.cpp
refuses them without a matrix). The checkpoint is tests/fidelity.py's `tiny-qwen3-512`: 512 wide, 4 layers,
trained deterministically on the evaluation text (so its distributions are peaked and quantization error shows).
Needs the verify extra (torch, transformers). Writes a record (benchmarks/results/imatrix-*.json), rendered in
RESULTS.md by report.py.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _record import write_record  # noqa: E402

QUANTS = ("gguf:q4_0", "gguf:q4_k_m", "gguf:q3_k_m", "gguf:iq4_xs", "gguf:iq3_xxs", "gguf:iq2_xs", "onnx:int4")
ARCH = "tiny-qwen3-512"
KEEP = ("kl_mean", "kl_p99", "top1_agreement", "ppl_rel_change", "max_abs_logit_error")


def measure(ckpt: Path, fmt: str, quant: str, imatrix: bool, work: Path, quick: bool, awq: bool = False,
            gptq: bool = False) -> dict:
    from qwen_edge.export import export
    from qwen_edge.quality.verify import verify

    t0 = time.perf_counter()
    options = {**({"imatrix": "auto"} if imatrix else {}), **({"awq": True} if awq else {}),
               **({"gptq": True} if gptq else {})}
    art = export(ckpt, fmt, quant, work, name=f"{fmt}-{quant}-{'-'.join(options) or 'plain'}",
                 options=options, force=True)
    export_s = time.perf_counter() - t0
    rep = verify(art, quick=quick, store=False)
    return {"export_s": round(export_s, 1), "passed": rep["passed"], "failed": rep["failed"],
            "tokens": rep["tokens_evaluated"], **{k: rep["metrics"][k] for k in KEEP},
            "ppl_reference": rep["metrics"]["ppl_reference"]}


def with_outliers(src: Path, out: Path, n: int, alpha: float) -> Path:
    """A function-preserving copy of `src` with activation outliers, as real models have: in every layer, `n` hidden
    channels of both RMS norms' weights times `alpha`, the matching input columns of q/k/v and gate/up divided by it.
    The float model computes the same function (the norm's weight multiplies after normalization), but the inputs
    of those linears carry `alpha`-times channels, whose tiny weight columns round-to-nearest quantizes badly."""
    import shutil

    import numpy as np

    from qwen_edge.model.safetensors_io import SafetensorsFile, bf16_to_f32, f32_to_bf16, write_safetensors

    if (out / "model.safetensors").is_file():
        return out
    shutil.copytree(src, out)
    st = SafetensorsFile(src / "model.safetensors")
    try:
        tensors = {name: (i.dtype, i.shape, np.array(st.raw(name))) for name, i in sorted(st.tensors.items())}
        meta = dict(st.metadata)
    finally:
        st.close()
    layers = sorted({int(k.split(".")[2]) for k in tensors if k.startswith("model.layers.")})
    rng = np.random.default_rng(0)
    for i in layers:
        pre = f"model.layers.{i}."
        hidden = tensors[pre + "input_layernorm.weight"][1][0]
        ch = rng.permutation(hidden)[:n]
        for norm, linears in (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                              ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))):
            for name, fn in [(pre + norm + ".weight", lambda w: _scale(w, ch, alpha, axis=0))] + \
                    [(pre + lin + ".weight", lambda w: _scale(w, ch, 1.0 / alpha, axis=1)) for lin in linears]:
                dtype, shape, raw = tensors[name]
                assert dtype == "BF16", name
                tensors[name] = (dtype, shape, f32_to_bf16(fn(bf16_to_f32(raw))))
    meta["qwen_edge_outliers"] = f"{n} channels x {alpha} per layer"
    write_safetensors(out / "model.safetensors", [(k, d, s, x) for k, (d, s, x) in tensors.items()], metadata=meta)
    return out


def _scale(w, ch, factor: float, axis: int):
    w = w.copy()
    if axis == 0:
        w[ch] *= factor
    else:
        w[:, ch] *= factor
    return w


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help=f"reference checkpoint (default: tests/fidelity.py's {ARCH})")
    ap.add_argument("--quants", default=",".join(QUANTS), help="comma-separated FORMAT:QUANT")
    ap.add_argument("--quick", action="store_true", help="verify on the short evaluation text")
    ap.add_argument("--workdir", help="where the artifacts go (default: a temporary directory)")
    ap.add_argument("--outliers", metavar="N,ALPHA", help="measure a function-preserving copy with activation "
                    "outliers: N channels per layer scaled by ALPHA (see with_outliers)")
    ap.add_argument("--awq", action="store_true", help="also export each with --imatrix auto --awq (activation-aware "
                    "scales folded into the preceding ops, export/awq.py)")
    ap.add_argument("--gptq", action="store_true", help="also export each with --gptq alone and with --imatrix auto "
                    "--gptq (error compensation over the calibration Hessian, export/gptq.py)")
    ap.add_argument("--label", default="", help="suffix of the record's file name")
    ap.add_argument("--note", action="append", default=[], help="a sentence stored in the record (repeatable)")
    args = ap.parse_args(argv)
    from qwen_edge.formats.quants import QUANTS as TABLE

    pairs = [tuple(q.strip().split(":", 1)) for q in args.quants.split(",") if q.strip()]
    bad = [":".join(p) for p in pairs if len(p) != 2 or p[1] not in TABLE or TABLE[p[1]].format != p[0]
           or p[1] in ("f32", "f16", "bf16", "q8_0", "fp32", "fp16")]
    if bad:
        print(f"error: not a quantization an importance matrix applies to: {bad[0]}", file=sys.stderr)
        return 2
    if args.checkpoint:
        ckpt = Path(args.checkpoint)
        desc = f"checkpoint `{ckpt.name}`"
    else:
        sys.path.insert(0, str(ROOT / "tests"))
        from fidelity import fidelity_checkpoint

        from qwen_edge.model.train import DEFAULT_STEPS

        t0 = time.perf_counter()
        ckpt = fidelity_checkpoint(ARCH)
        print(f"checkpoint {ckpt} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        desc = (f"tests/fidelity.py's {ARCH} (hidden 512, 4 layers, 8 heads x 64, 2 KV heads, intermediate 1536, "
                f"tied, real 151,936 vocabulary), trained deterministically for {DEFAULT_STEPS} steps on the "
                "evaluation text")
    rows = []
    with tempfile.TemporaryDirectory(prefix="qwen-edge-imatrix-") as tmp:
        work = Path(args.workdir or tmp)
        if args.outliers:
            n, alpha = args.outliers.split(",")
            ckpt = with_outliers(ckpt, work / "outliers-ckpt", int(n), float(alpha))
            desc += (f"; made function-preserving with activation outliers: {n} channels per layer x {alpha} in both "
                     "norms' weights, the matching q/k/v and gate/up input columns divided by it (with_outliers)")
        for fmt, q in pairs:
            row = {"format": fmt, "quant": q,
                   "plain": None if TABLE[q].needs_imatrix else measure(ckpt, fmt, q, False, work, args.quick),
                   "imatrix": measure(ckpt, fmt, q, True, work, args.quick)}
            if args.awq:
                row["awq"] = measure(ckpt, fmt, q, True, work, args.quick, awq=True)
            if args.gptq:
                row["gptq"] = measure(ckpt, fmt, q, False, work, args.quick, gptq=True)
                row["imatrix_gptq"] = measure(ckpt, fmt, q, True, work, args.quick, gptq=True)
            if row["plain"]:
                for key, field in (("imatrix", "kl_reduction"), ("awq", "awq_kl_reduction"),
                                   ("gptq", "gptq_kl_reduction"), ("imatrix_gptq", "imatrix_gptq_kl_reduction")):
                    if key in row:
                        row[field] = round(1 - row[key]["kl_mean"] / row["plain"]["kl_mean"], 4)
            print(f"{fmt} {q}: KL plain {row['plain'] and row['plain']['kl_mean']}; "
                  + "; ".join(f"{k} {row[k]['kl_mean']:.3g}" for k in ("imatrix", "awq", "gptq", "imatrix_gptq")
                              if k in row), file=sys.stderr, flush=True)
            rows.append(row)
    write_record("imatrix", {"rows": rows}, settings={"checkpoint": str(ckpt), "checkpoint_desc": desc,
                                                      "quick": args.quick, "outliers": args.outliers,
                                                      "awq": args.awq, "gptq": args.gptq,
                                                      "quants": [":".join(p) for p in pairs],
                                                      "calibration_text": "qwen_edge/data/calib_text.json",
                                                      "evaluation_text": "qwen_edge/data/eval_text.json"},
                 label=args.label, rendered_in="benchmarks/RESULTS.md", notes=args.note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
