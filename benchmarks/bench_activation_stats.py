"""Why calibration gains little on the trained fidelity checkpoints: their block linears' input statistics, and what
activation-aware scaling can win on each layer under the real quantizer (issue 31b).

    python benchmarks/bench_activation_stats.py --checkpoint DIR [--outliers 4,30] [--quant q4_k_m]

Per layer and linear input (q/k/v, o, gate/up, down), over the shipped calibration text (imatrix.py's float32
forward): the largest channel's mean |x| over the median channel's (channel outliers: what an importance matrix
and awq act on), the largest |x| of any token over the median |x| (peak), and awq's search on that layer: the alpha
it picks and the layer-output error reduction against alpha 0 (the unscaled weights) with ggml's quantizer of the
GGUF type's base type. With --outliers, the same for bench_imatrix.py's function-preserving copy with outlier
channels, measured in the same run. Writes a record (benchmarks/results/activation_stats-*.json), rendered in
RESULTS.md by report.py.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _record import write_record  # noqa: E402


def stats(path: Path, quant: str) -> list[dict]:
    from qwen_edge.export import awq
    from qwen_edge.export.imatrix import calibration_text, calibration_windows, collect
    from qwen_edge.formats.quants import QUANTS
    from qwen_edge.model.checkpoint import Checkpoint
    from qwen_edge.text.tokenizer import Tokenizer

    ck = Checkpoint(path)
    try:
        text, _ = calibration_text()
        windows = calibration_windows(Tokenizer.from_dir(path), text)
        acc: dict[tuple[int, str], dict] = {}

        def tap(role: str, layer: int, x: np.ndarray) -> None:
            a = acc.setdefault((layer, role), {"abs": 0.0, "n": 0, "peak": 0.0, "med": []})
            ax = np.abs(x)
            a["abs"] = a["abs"] + ax.sum(axis=0, dtype=np.float64)
            a["n"] += x.shape[0]
            a["peak"] = max(a["peak"], float(ax.max()))
            a["med"].append(float(np.median(ax)))

        collect(ck, windows, tap=tap)
        _, _, rec = awq.awq_scales(ck, awq.ggml_quantizer(QUANTS[quant].gguf_type))
    finally:
        ck.close()
    rows = []
    for (layer, role), a in sorted(acc.items()):
        m = a["abs"] / a["n"]
        key = f"{layer}.{role}"
        rows.append({"layer": layer, "role": role, "channel_ratio": round(float(m.max() / np.median(m)), 2),
                     "peak_ratio": round(a["peak"] / float(np.median(a["med"])), 1),
                     "awq_alpha": rec["alphas"].get(key), "awq_error_reduction": rec["calibration_error_reduction"]
                     .get(key)})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="a trained checkpoint (e.g. the tiny-qwen3-512 fidelity one)")
    ap.add_argument("--outliers", metavar="N,ALPHA", help="also its copy with N outlier channels x ALPHA per layer")
    ap.add_argument("--quant", default="q4_k_m", help="GGUF type whose base type awq's search quantizes with")
    ap.add_argument("--label", default="")
    ap.add_argument("--note", action="append", default=[])
    args = ap.parse_args(argv)
    from bench_imatrix import with_outliers

    ckpt = Path(args.checkpoint)
    runs = [{"checkpoint": ckpt.name, "outliers": None, "rows": stats(ckpt, args.quant)}]
    if args.outliers:
        n, alpha = args.outliers.split(",")
        with tempfile.TemporaryDirectory(prefix="qwen-edge-actstats-") as tmp:
            copy = with_outliers(ckpt, Path(tmp) / "outliers", int(n), float(alpha))
            runs.append({"checkpoint": ckpt.name, "outliers": args.outliers, "rows": stats(copy, args.quant)})
    for r in runs:
        for x in r["rows"]:
            print(r["outliers"], x, file=sys.stderr)
    write_record("activation_stats", {"runs": runs}, settings={"checkpoint": str(ckpt), "quant": args.quant,
                                                               "calibration_text": "qwen_edge/data/calib_text.json"},
                 label=args.label, rendered_in="benchmarks/RESULTS.md", notes=args.note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
