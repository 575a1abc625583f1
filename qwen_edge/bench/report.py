"""Bench reports: the markdown table and the matplotlib plot of a bench report (the measuring is bench.py's)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import QwenEdgeError


def _mb(x: float) -> str:
    return f"{x / 1e6:.1f}"


def markdown_table(report: dict[str, Any]) -> str:
    head = ("| artifact | format | quant | threads | size MB | bits/w | load s | TTFT ms | prefill tok/s "
            "| decode tok/s (min-max) | ITL p50/p95 ms | peak RSS MB | decode x first | roofline tok/s | % roofline |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for r in report["results"]:
        d, p, tt = r["decode_tokens_per_s"], r["prefill_tokens_per_s"], r["time_to_first_token_s"]
        itl, roof = r["inter_token_latency_s"], r["roofline"]
        bpw = f"{r['bits_per_weight']:.2f}" if r["bits_per_weight"] else "-"
        bound = f"{roof['bound_tokens_per_s']:.0f}" if roof.get("bound_tokens_per_s") else "-"
        frac = f"{100 * roof['fraction']:.0f}%" if roof.get("fraction") else "-"
        lines.append(
            f"| {r['name']} | {r['format']} | {r['quant']} | {r['threads']} | {_mb(r['size_bytes'])} | {bpw} "
            f"| {r['load_s']['median']:.2f} | {1000 * tt['median']:.1f} | {p['median']:.1f} "
            f"| {d['median']:.1f} ({d['min']:.1f}-{d['max']:.1f}) | {1000 * itl['p50']:.2f}/{1000 * itl['p95']:.2f} "
            f"| {_mb(r['peak_rss_bytes'])} | {r['ratio_to_first']['decode_tokens_per_s']:.2f} | {bound} | {frac} |")
    c, m = report["config"], report["machine"]
    lines.append("")
    lines.append(f"{c['prompt_tokens']} prompt tokens, {c['gen_tokens']} generated (greedy), {c['repeat']} repeats "
                 f"after {c['warmup']} warm-up, medians; {m['cpu']}, {m['physical_cores']} cores, "
                 f"measured read bandwidth {m['read_bandwidth_gbps']} GB/s.")
    if m.get("emulated"):
        lines.append(f"\n**EMULATED** ({m['emulated']}): these figures time the emulator, not the CPU; never compare "
                     "them with native ones.")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], out: str | os.PathLike) -> Path:
    """Bar charts of decode and prefill tokens/s per artifact (grouped by thread count for a sweep)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise QwenEdgeError("--plot needs matplotlib: pip install 'qwen-edge[plot]'") from None
    results = report["results"]
    names = list(dict.fromkeys(r["name"] for r in results))
    threads = list(dict.fromkeys(r["threads"] for r in results))
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.5 * len(names) * len(threads) + 2))
    height = 0.8 / len(threads)
    for ax, key, title in ((axes[0], "decode_tokens_per_s", "decode tokens/s"),
                           (axes[1], "prefill_tokens_per_s", "prefill tokens/s")):
        for j, th in enumerate(threads):
            ys, vals, lo, hi = [], [], [], []
            for i, n in enumerate(names):
                r = next((x for x in results if x["name"] == n and x["threads"] == th), None)
                if r is None:
                    continue
                ys.append(i + j * height)
                vals.append(r[key]["median"])
                lo.append(r[key]["median"] - r[key]["min"])
                hi.append(r[key]["max"] - r[key]["median"])
            ax.barh(ys, vals, height=height, xerr=[lo, hi], label=f"{th} threads", capsize=3)
        ax.set_yticks([i + height * (len(threads) - 1) / 2 for i in range(len(names))])
        ax.set_yticklabels(names, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
    if len(threads) > 1:
        axes[0].legend()
    m = report["machine"]
    fig.suptitle(f"qwen-edge bench: {m['cpu']} ({report['config']['prompt_tokens']} prompt / "
                 f"{report['config']['gen_tokens']} generated tokens, median of {report['config']['repeat']})",
                 fontsize=9)
    fig.tight_layout()
    path = Path(out)
    try:
        fig.savefig(path, dpi=110)
    except OSError as e:
        raise QwenEdgeError(f"{path}: cannot write the plot ({e.strerror or e})") from None
    finally:
        plt.close(fig)
    return path
