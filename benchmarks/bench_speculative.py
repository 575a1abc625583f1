"""Fast-forward and speculative decoding (issue 30): what one pass that verifies k tokens costs, and what it buys.

    python benchmarks/bench_speculative.py [--workdir DIR] [--sizes 0.5b[,1.5b,3b]] [--quick] [--fidelity CKPT]

Per size (synthesized random Qwen2.5 weights, exported GGUF q4_0 and ONNX int4 into --workdir when absent):
- verification cost: one `prefill_all_logits` of k = 1, 2, 4, 8 tokens (logits at every position) after a 64-token
  prompt, then the rollback (`rewind`), relative to one decode step (`decode` + `logits`); medians, steps
  interleaved so load drifts hit every k alike;
- fast-forward: greedy decode tokens/s of a schema-constrained reply (fixed keys, enums) with and without it (the
  forced tokens do not depend on the weights, so random weights give the honest figure), the ids checked identical;
- a draft model's speedup as a function of the acceptance rate a, computed from the measured verification costs:
  tokens per step (1 - a^(k+1)) / (1 - a) over cost per step c_k + k * r (c_k the k-token verification over a
  decode step, r a draft decode step over a target decode step, measured when the draft's size is among --sizes,
  else the ratio of the artifacts' weight bytes).
On the trained fidelity checkpoint (tests/fidelity.py; tiny-qwen3-256 trained on qwen_edge/data/eval_text.json) it
measures prompt lookup's acceptance with copy-heavy prompts (a document, then its first half again to continue):
a model that has seen these texts, so a copy-friendly case, stated as such.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import write_record  # noqa: E402

import numpy as np  # noqa: E402

KS = (1, 2, 4, 8)
PARAMS = {"0.5b": 0.49e9, "1.5b": 1.54e9, "3b": 3.09e9}
"""Qwen2.5 parameter counts (the draft-cost model when the 0.5B is not among --sizes)."""
SCHEMA = {"type": "object", "properties": {
    "species": {"enum": ["cat", "dog", "parrot", "rabbit"]}, "size": {"enum": ["small", "medium", "large"]},
    "indoor": {"type": "boolean"}, "diet": {"enum": ["meat", "seeds", "hay", "mixed"]},
    "temperament": {"enum": ["calm", "playful", "shy"]}, "vaccinated": {"type": "boolean"},
    "coat": {"enum": ["short", "long", "none"]}, "color": {"enum": ["black", "white", "brown", "grey"]},
    "age_group": {"enum": ["young", "adult", "senior"]}, "neutered": {"type": "boolean"}},
    "required": ["species", "size", "indoor", "diet", "temperament", "vaccinated", "coat", "color", "age_group",
                 "neutered"], "additionalProperties": False}
ACCEPT = (0.5, 0.6, 0.7, 0.8, 0.9)


def ensure(workdir: Path, size: str) -> dict[str, Path]:
    cli = [sys.executable, "-m", "qwen_edge.cli"]
    ckpt = workdir / f"qwen2.5-{size}"
    if not (ckpt / "config.json").is_file():
        subprocess.run([*cli, "synth", f"qwen2.5-{size}", "-o", str(ckpt)], check=True)
    arts = {}
    for fmt, quant in (("gguf", "q4_0"), ("onnx", "int4")):
        art = workdir / "art" / f"qwen2.5-{size}-{fmt}-{quant}"
        if not (art / "manifest.json").is_file():
            subprocess.run([*cli, "export", str(ckpt), "--format", fmt, "--quant", quant, "-o", str(workdir / "art"),
                            "--no-verify"], check=True)
        arts[fmt] = art
    return arts


def weight_bytes(art: Path) -> int:
    return sum(p.stat().st_size for p in art.iterdir() if p.suffix in (".gguf", ".onnx_data", ".onnx"))


def verify_cost(rt: Any, repeats: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    rt.reset()
    rt.prefill(rng.integers(100, 5000, 64).tolist())
    base = rt.n_cached
    times: dict[str, list[float]] = {"decode": [], **{f"verify{k}": [] for k in KS}}
    for r in range(repeats + 1):  # the first round warms up
        order = ["decode", *[f"verify{k}" for k in KS]]
        for name in order[r % len(order):] + order[: r % len(order)]:
            ids = rng.integers(100, 5000, 8).tolist()
            t0 = time.perf_counter()
            if name == "decode":
                rt.decode(ids[0])
                rt.logits()
            else:
                rt.prefill_all_logits(ids[: int(name[6:])])
            dt = time.perf_counter() - t0
            rt.rewind(base)
            if r:
                times[name].append(dt)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {"decode_ms": med["decode"], "verify_ms": {k: med[f"verify{k}"] for k in KS},
            "ratio": {k: med[f"verify{k}"] / med["decode"] for k in KS}}


def fast_forward(session: Any, repeats: int) -> dict[str, Any]:
    from qwen_edge.runtime import constrain
    from qwen_edge.runtime.generate import generate
    from qwen_edge.runtime.speculative import Speculative

    tok, rt = session.tokenizer, session.runtime
    ids = tok.encode_chat([{"role": "user", "content": "Describe a pet as JSON."}], enable_thinking=False)
    c = constrain.json_schema(SCHEMA)
    rates: dict[bool, list[float]] = {False: [], True: []}
    outs: dict[bool, list[int]] = {}
    passes: dict[bool, int] = {}
    for r in range(repeats + 1):
        for ff in ((False, True) if r % 2 else (True, False)):
            n = {"n": 0}
            real = rt.prefill

            def counting(x, _real=real):
                n["n"] += 1
                return _real(x)
            rt.prefill = counting
            try:
                res = generate(rt, ids, tokenizer=tok, stop_ids=session.stop_ids, max_new_tokens=200, constraint=c,
                               speculative=Speculative(fast_forward=ff))
            finally:
                del rt.prefill
            if r:
                rates[ff].append(len(res.output_ids) / (res.stats.total_s - res.stats.prefill_s))
            outs[ff], passes[ff] = res.output_ids, n["n"] - 1  # passes after the prompt's
    if outs[True] != outs[False]:
        raise SystemExit("fast-forward changed the output: a bug")
    off, on = statistics.median(rates[False]), statistics.median(rates[True])
    return {"tokens": len(outs[True]), "passes_off": passes[False], "passes_on": passes[True],
            "tok_s_off": off, "tok_s_on": on, "speedup": on / off, "identical": True}


def draft_table(ratio: dict[int, float], r: float) -> list[dict[str, Any]]:
    rows = []
    for k in (2, 4, 8):
        for a in ACCEPT:
            tokens = (1 - a ** (k + 1)) / (1 - a)
            rows.append({"k": k, "accept": a, "tokens_per_step": tokens,
                         "speedup": tokens / (ratio[k] + k * r)})
    return rows


def lookup_fidelity(ckpt: Path, workdir: Path, quick: bool) -> dict[str, Any]:
    from qwen_edge.backends import load
    from qwen_edge.export import export
    from qwen_edge.runtime.generate import generate
    from qwen_edge.runtime.meta import model_meta
    from qwen_edge.runtime.speculative import Speculative
    from qwen_edge.text.evaltext import eval_text
    from qwen_edge.text.tokenizer import Tokenizer

    art = workdir / "art" / f"{ckpt.name}-gguf-f16"
    if not (art / "manifest.json").is_file():
        art = export(ckpt, "gguf", "f16", workdir / "art", name=art.name)
    tok = Tokenizer.from_dir(model_meta(art).tokenizer_dir)
    rt = load(art, max_context=2048)
    docs = [d for d in eval_text()["documents"] if d.get("lang") == "en"][: 3 if quick else 8]
    out: dict[str, Any] = {"artifact": art.name, "prompts": len(docs), "new_tokens": 96, "per_lookup": {}}
    for n in (2, 4, 8):
        proposed = accepted = emitted = 0
        t_plain = t_spec = 0.0
        for d in docs:
            text = d["text"]
            ids = tok.encode(text + "\n\n" + text[: len(text) // 2])
            plain = generate(rt, ids, max_new_tokens=96)
            spec = generate(rt, ids, max_new_tokens=96, speculative=Speculative(lookup=n))
            assert spec.output_ids == plain.output_ids, "lookup changed the greedy output"
            proposed += spec.stats.speculative["proposed"]
            accepted += spec.stats.speculative["accepted"]
            emitted += len(spec.output_ids)
            t_plain += plain.stats.total_s - plain.stats.prefill_s
            t_spec += spec.stats.total_s - spec.stats.prefill_s
        out["per_lookup"][n] = {"proposed": proposed, "accepted": accepted,
                                "acceptance": accepted / proposed if proposed else None,
                                "tokens": emitted, "speedup": t_plain / t_spec}
    rt.close()
    return out


def newest_fidelity() -> Path | None:
    root = Path(os.environ.get("QWEN_EDGE_CACHE", Path.home() / ".cache" / "qwen_edge")) / "test" / "fidelity"
    found = sorted(root.glob("tiny-qwen3-256-s0-*/config.json"), key=lambda p: p.stat().st_mtime)
    return found[-1].parent if found else None


def main() -> None:
    from qwen_edge.runtime.chat import ChatSession

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qwen_edge_bench_speculative"))
    ap.add_argument("--sizes", default="0.5b", help="comma-separated Qwen2.5 sizes: 0.5b,1.5b,3b")
    ap.add_argument("--quick", action="store_true", help="fewer repeats and prompts (a shared machine)")
    ap.add_argument("--repeats", type=int, help="timed rounds (default 20, --quick 7)")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--fidelity", type=Path, help="the trained checkpoint for lookup (default: the test cache's)")
    ap.add_argument("--label", default="")
    a = ap.parse_args()
    repeats = a.repeats or (7 if a.quick else 20)
    sizes = [s.strip() for s in a.sizes.split(",") if s.strip()]
    rows: list[dict[str, Any]] = []
    for size in sizes:
        for fmt, art in ensure(a.workdir, size).items():
            s = ChatSession.load(art, max_context=1024, threads=a.threads)
            try:
                row = {"size": size, "format": fmt, "artifact": art.name, "weight_bytes": weight_bytes(art),
                       "threads": s.runtime.info.threads, **verify_cost(s.runtime, repeats),
                       "fast_forward": fast_forward(s, max(2, repeats // 3))}
            finally:
                s.close()
            rows.append(row)
            print(f"{size} {fmt}: decode {row['decode_ms']:.1f} ms, verify/decode "
                  + " ".join(f"k={k} {row['ratio'][k]:.2f}" for k in KS)
                  + f"; fast-forward {row['fast_forward']['speedup']:.2f}x", flush=True)
    drafts = []
    for target in (t for t in rows if t["size"] != "0.5b"):
        d = next((x for x in rows if x["size"] == "0.5b" and x["format"] == target["format"]), None)
        # without a measured 0.5B: a draft step costs what its weights weigh against the target's (decode reads
        # each weight once: 0.49B / 1.54B or 3.09B parameters)
        r = d["decode_ms"] / target["decode_ms"] if d else PARAMS["0.5b"] / PARAMS[target["size"]]
        drafts.append({"target": target["size"] + ("" if d else " (r modelled from parameter counts)"), "format": target["format"],
                       "draft_cost_ratio": r, "table": draft_table(target["ratio"], r)})
    if not drafts:  # only the 0.5B measured: its own verification costs, r from the q4 weight bytes (0.5B / 1.5B)
        for t in rows:
            drafts.append({"target": f"{t['size']} costs, r=1/3.1 (modelled)", "format": t["format"],
                           "draft_cost_ratio": 1 / 3.1, "table": draft_table(t["ratio"], 1 / 3.1)})
    ckpt = a.fidelity or newest_fidelity()
    lookup = lookup_fidelity(ckpt, a.workdir, a.quick) if ckpt else None
    if lookup:
        print("lookup on the fidelity checkpoint: " + ", ".join(
            f"N={n}: acceptance {v['acceptance']:.2f}, {v['speedup']:.2f}x" for n, v in lookup["per_lookup"].items()))
    path = write_record("speculative", {"rows": rows, "draft": drafts, "lookup": lookup},
                        settings={"sizes": sizes, "repeats": repeats, "quick": a.quick, "ks": list(KS)},
                        label=a.label, rendered_in="benchmarks/RESULTS.md",
                        notes=["random weights: verification cost and fast-forward do not depend on them; no "
                               "acceptance rate is measured on them",
                               "published acceptance rates of Qwen2.5-0.5B drafting larger Qwen2.5: none found "
                               "offline; none quoted"])
    print(path)


if __name__ == "__main__":
    main()
