"""Decode tokens/s of qwen-edge's llama_cpp Runtime vs a bare llama-cpp-python low-level loop on the same GGUF.

Usage: python benchmarks/bench_llama_overhead.py [--artifact DIR] [--gen 64] [--repeats 5] [--threads N]
Both run greedy decoding from the same prompt, interleaved (alternating order per repeat), same threads and
context; the report is median decode tokens/s of each and the runtime's overhead in percent (target < 5%).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import write_record  # noqa: E402

PROMPT = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198, 7985, 264, 2805,
          32794, 911, 279, 9396, 13, 151645, 198, 151644, 77091, 198]


class Bare:
    """The least a llama-cpp-python program can do per token: one llama_decode, one logits read, argmax."""

    def __init__(self, path: Path, n_ctx: int, threads: int):
        import llama_cpp as L

        from qwen_edge.device.llama_lib import silence_llama_log

        self.L = L
        silence_llama_log(L)
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0
        self.model = L.llama_model_load_from_file(str(path).encode(), mp)
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, 512, 512
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, cp)
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.mem = L.llama_get_memory(self.ctx)

    def run(self, prompt: list[int], n: int) -> float:
        L = self.L
        L.llama_memory_clear(self.mem, True)
        arr = (L.llama_token * len(prompt))(*prompt)
        L.llama_decode(self.ctx, L.llama_batch_get_one(arr, len(prompt)))
        tok = (L.llama_token * 1)()
        t = time.perf_counter()
        for _ in range(n):
            logits = np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,))
            tok[0] = int(logits.argmax())
            L.llama_decode(self.ctx, L.llama_batch_get_one(tok, 1))
        return n / (time.perf_counter() - t)


class Ours:
    def __init__(self, art: Path, n_ctx: int, threads: int):
        from qwen_edge.backends import load

        self.rt = load(art, max_context=n_ctx, threads=threads)

    def run(self, prompt: list[int], n: int) -> float:
        rt = self.rt
        rt.reset()
        rt.prefill(prompt)
        t = time.perf_counter()
        for _ in range(n):
            rt.decode(int(np.argmax(rt.logits())))
        return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", type=Path, default=Path("/tmp/qwen-edge-bench/overhead/qwen2.5-0.5b-q4_k_m"))
    ap.add_argument("--ckpt", type=Path, default=Path("/tmp/qwen-edge-bench/qwen2.5-0.5b"))
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--label", default="", help="suffix of the record's file name under benchmarks/results/")
    ap.add_argument("--note", action="append", default=[], help="a sentence stored in the record (repeatable)")
    a = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if not (a.artifact / "manifest.json").is_file():
        if not (a.ckpt / "config.json").is_file():
            subprocess.run([sys.executable, "-m", "qwen_edge.cli", "synth", "qwen2.5-0.5b", "-o", str(a.ckpt)],
                           check=True, env=env)
        from qwen_edge.export import export

        export(a.ckpt, "gguf", "q4_k_m", a.artifact.parent, name=a.artifact.name)
    from qwen_edge.device.targets import physical_cores

    threads = a.threads or physical_cores()
    n_ctx = 512
    ours, bare = Ours(a.artifact, n_ctx, threads), Bare(a.artifact / "model.gguf", n_ctx, threads)
    ours.run(PROMPT, 8)  # warm-up both
    bare.run(PROMPT, 8)
    res: dict[str, list[float]] = {"qwen-edge Runtime": [], "bare llama-cpp-python": []}
    for i in range(a.repeats):
        order = [("qwen-edge Runtime", ours), ("bare llama-cpp-python", bare)]
        for name, r in (order if i % 2 == 0 else order[::-1]):
            res[name].append(r.run(PROMPT, a.gen))
    med = {k: statistics.median(v) for k, v in res.items()}
    overhead = 100.0 * (med["bare llama-cpp-python"] - med["qwen-edge Runtime"]) / med["bare llama-cpp-python"]
    print(f"llama.cpp decode overhead: {a.artifact.name}, {threads} threads, {len(PROMPT)}-token prompt, "
          f"{a.gen} greedy tokens x {a.repeats} interleaved repeats, {time.strftime('%Y-%m-%d')}\n")
    print("| loop | decode tok/s median | min | max |")
    print("|---|---:|---:|---:|")
    for k, v in res.items():
        print(f"| {k} | {med[k]:.2f} | {min(v):.2f} | {max(v):.2f} |")
    print(f"\noverhead of the Runtime: {overhead:+.2f}% of decode tokens/s (target < 5%)")
    ours.rt.close()
    write_record("llama_overhead", {"decode_tokens_per_s": res, "median": med, "overhead_percent": overhead},
                 settings={"artifact": str(a.artifact), "artifact_name": a.artifact.name, "threads": threads,
                           "prompt_tokens": len(PROMPT), "gen_tokens": a.gen, "repeats": a.repeats, "n_ctx": n_ctx},
                 notes=a.note, label=a.label)


if __name__ == "__main__":
    main()
