"""Concurrent streams against `qwen-edge serve --parallel N` (GGUF q4_0 and ONNX int4 of a synthesized Qwen2.5-0.5B)
and, as the anchor, llama.cpp's own `llama-server --parallel N` built from the pinned llama-cpp-python's vendored
sources, side by side in one run: aggregate and per-stream decode tokens/s, time to first token, inter-token p50/p95.

Each stream is an openai-client streamed /v1/completions request with its own prompt of --prompt-tokens ids (no two
share a prefix) and max_tokens --max-tokens, greedy; all N start together; every server gets the same prompts. With --repeat R the
servers take turns, round after round. `--llama-server PATH` uses that binary;
otherwise it is built once (Release, server target only, no CURL) under ~/.cache/qwen_edge/llama-server/VERSION/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import start, write_record  # noqa: E402


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "qwen_edge" / "llama-server"


def build_llama_server(version: str | None = None, jobs: int = 2) -> Path:
    """llama-server built from llama-cpp-python==VERSION's sdist (the installed version by default), cached."""
    version = version or metadata.version("llama-cpp-python")
    out = cache_dir() / version / "llama-server"
    if out.is_file():
        return out
    work = cache_dir() / version / "build"
    work.mkdir(parents=True, exist_ok=True)
    sdist = work / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}", "--no-deps",
                        "--no-binary", ":all:", "--no-build-isolation", "-d", str(work)], check=True)
    src = work / f"llama_cpp_python-{version}"
    if not src.is_dir():
        with tarfile.open(sdist) as t:
            t.extractall(work, filter="data")
    llama = src / "vendor" / "llama.cpp"
    build = work / "cmake"
    subprocess.run(["cmake", "-S", str(llama), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON",
                    "-DBUILD_SHARED_LIBS=OFF"], check=True)
    subprocess.run(["cmake", "--build", str(build), "--config", "Release", "--target", "llama-server",
                    f"-j{jobs}"], check=True)
    shutil.copy2(build / "bin" / "llama-server", out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A server subprocess on a free port, ready once /health answers 200."""

    def __init__(self, argv: list[str], port: int, log: Path):
        self.port, self.log = port, log
        self._log = open(log, "w")
        self.p = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if self.p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.p.terminate()
        try:
            self.p.wait(30)
        except subprocess.TimeoutExpired:
            self.p.kill()
        self._log.close()


def one_stream(base: str, prompt: list[int], max_tokens: int, out: dict[str, Any], go: threading.Event) -> None:
    import openai

    client = openai.OpenAI(base_url=base, api_key="none", max_retries=0, timeout=600)
    go.wait()
    t0 = time.perf_counter()
    times: list[float] = []
    usage = None
    stream = client.completions.create(model="m", prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            times.append(time.perf_counter())
        if getattr(chunk, "usage", None) is not None:
            usage = chunk.usage
    t1 = time.perf_counter()
    n = usage.completion_tokens if usage is not None else len(times)
    out.update(start=t0, end=t1, first=times[0] if times else None, tokens=n, chunk_times=times)


def load_run(base: str, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
    results: list[dict[str, Any]] = [{} for _ in prompts]
    go = threading.Event()
    threads = [threading.Thread(target=one_stream, args=(base, p, max_tokens, r, go)) for p, r in zip(prompts, results)]
    for t in threads:
        t.start()
    go.set()
    for t in threads:
        t.join()
    t0 = min(r["start"] for r in results)
    t1 = max(r["end"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    gaps = sorted(b - a for r in results for a, b in zip(r["chunk_times"], r["chunk_times"][1:]))
    per = [(r["tokens"] - 1) / (r["end"] - r["first"]) for r in results if r["first"] and r["tokens"] > 1]

    def pct(xs: list[float], q: float) -> float | None:
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None

    return {"streams": len(prompts), "tokens": tokens, "wall_s": t1 - t0, "aggregate_tok_s": tokens / (t1 - t0),
            "per_stream_tok_s": sum(per) / len(per) if per else None,
            "ttft_s": sum(r["first"] - r["start"] for r in results if r["first"]) / len(results),
            "itl_p50_s": pct(gaps, 0.5), "itl_p95_s": pct(gaps, 0.95)}


def artifacts(work: Path, source: str | None) -> dict[str, Path]:
    from bench_onnx_vs_llama import source_checkpoint

    from qwen_edge.export import export

    src = source_checkpoint(source, work)
    out = {}
    for fmt, quant in (("gguf", "q4_0"), ("onnx", "int4")):
        path = work / f"{fmt}-{quant}"
        out[fmt] = path if (path / "manifest.json").is_file() else export(src, fmt, quant, work, name=path.name)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", help="checkpoint directory (default: synthesize qwen2.5-0.5b into --workdir)")
    ap.add_argument("--workdir", default=str(Path.home() / ".cache" / "qwen_edge" / "bench_serve"))
    ap.add_argument("--llama-server", help="llama-server binary (default: build it from the pinned sources, cached)")
    ap.add_argument("--build-only", action="store_true", help="build (or find) llama-server, print its path, exit")
    ap.add_argument("--streams", default="1,2,4,8")
    ap.add_argument("--servers", default="qwen-edge gguf,qwen-edge onnx,llama-server gguf")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=1024, help="context per slot")
    ap.add_argument("--quick", action="store_true", help="1 and 4 streams, 32-id prompts, 32 tokens each")
    ap.add_argument("--repeat", type=int, default=1, help="rounds over every server and stream count (medians "
                    "rendered, x anchor paired within a round)")
    ap.add_argument("--note", action="append", default=[], help="a note for the record (repeatable)")
    a = ap.parse_args()
    if a.build_only:
        print(build_llama_server())
        return 0
    if a.quick:
        a.streams, a.prompt_tokens, a.max_tokens = "1,4", 32, 32
    streams = [int(x) for x in a.streams.split(",")]
    servers = [s.strip() for s in a.servers.split(",") if s.strip()]
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    arts = artifacts(work, a.source)
    binary = Path(a.llama_server) if a.llama_server else (build_llama_server() if any(
        s.startswith("llama-server") for s in servers) else None)
    import random

    rng = random.Random(0)
    start()
    rows: list[dict[str, Any]] = []
    # rounds: every server runs each stream count once per round, on the same prompts, so a drift in the shared
    # machine's speed falls on all of them alike; x anchor is then paired within a round
    for rep in range(a.repeat):
        for n in streams:
            prompts = [[rng.randrange(1000, 30000) for _ in range(a.prompt_tokens)] for _ in range(n)]
            for name in servers:
                kind, fmt = name.split()
                port = free_port()
                if kind == "llama-server":
                    gguf = next((arts["gguf"]).glob("*.gguf"))
                    argv = [str(binary), "-m", str(gguf), "--port", str(port), "--parallel", str(n), "-c",
                            str(a.context * n), "-t", str(a.threads), "-tb", str(a.threads), "--no-webui"]
                else:
                    argv = [sys.executable, "-m", "qwen_edge.cli", "serve", str(arts[fmt]), "--port", str(port),
                            "--parallel", str(n), "--max-context", str(a.context), "--threads", str(a.threads),
                            "--max-tokens", str(a.max_tokens)]
                proc = Proc(argv, port, work / f"{kind}-{fmt}-{n}.log")
                try:
                    # warm up on a prompt of its own: one of the measured prompts would be cached by the warm-up
                    # (both servers reuse a slot's prefix) and its stream would skip its prefill
                    warm = [[rng.randrange(30000, 60000) for _ in range(a.prompt_tokens)]]
                    load_run(f"http://127.0.0.1:{port}/v1", warm, 4)
                    r = load_run(f"http://127.0.0.1:{port}/v1", prompts, a.max_tokens)
                finally:
                    proc.stop()
                r["server"] = name
                r["repeat"] = rep
                rows.append(r)
                print(json.dumps(r), flush=True)
    write_record("serve", {"streams": streams, "prompt_tokens": a.prompt_tokens, "max_tokens": a.max_tokens,
                                 "threads": a.threads, "context_per_slot": a.context, "quick": a.quick, "repeat": a.repeat,
                                 "llama_server": str(binary) if binary else None, "rows": rows}, notes=a.note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
