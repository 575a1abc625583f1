"""CPU latency suite: each artifact timed in its own process, interleaved across repeats, with a roofline.

The reports (markdown table, plot) live in report.py."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import resource
import sys
import time
from importlib import metadata
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import NativeCrash, QwenEdgeError
from ..quality.reports import BenchReport, BenchResult, Log, Stat

BUDGET_METRICS = {
    "decode_tokens_per_s": ("decode_tokens_per_s", "median"),
    "prefill_tokens_per_s": ("prefill_tokens_per_s", "median"),
    "time_to_first_token_s": ("time_to_first_token_s", "median"),
    "load_s": ("load_s", "median"),
    "inter_token_latency_p50_s": ("inter_token_latency_s", "p50"),
    "inter_token_latency_p95_s": ("inter_token_latency_s", "p95"),
    "peak_rss_bytes": ("peak_rss_bytes", None),
    "size_bytes": ("size_bytes", None),
    "bits_per_weight": ("bits_per_weight", None),
    "roofline_fraction": ("roofline", "fraction"),
}
ENGINES = ("qwen-edge", "onnxruntime-genai")
"""What runs an artifact in `bench`: qwen-edge's own backends (the default), or onnxruntime-genai's generator (the
library apps embed) on an ONNX artifact or any onnxruntime-genai model folder (genai_config.json)."""
_BUDGET_RE = re.compile(r"^\s*([a-z0-9_]+)\s*(>=|<=|>|<)\s*([-+0-9.eE]+)\s*$")
KV_BYTES = 2
"""Bytes per cached K/V element the roofline assumes when the artifact does not say (llama.cpp's f16 cache); an ONNX
artifact's manifest says (`onnx.kv_dtype`: fp16 for fp16 exports and memory-capped targets, else fp32)."""


# --- what is measured ------------------------------------------------------------------------------------------
def parse_budget(expr: str) -> tuple[str, str, float]:
    """`decode_tokens_per_s>=20` -> (metric, op, value); QwenEdgeError on anything else."""
    m = _BUDGET_RE.match(expr or "")
    if not m:
        raise QwenEdgeError(f"budget {expr!r}: expected METRIC>=VALUE or METRIC<=VALUE, e.g. decode_tokens_per_s>=20")
    name, op, raw = m.groups()
    if name not in BUDGET_METRICS:
        raise QwenEdgeError(f"budget {expr!r}: unknown metric {name!r} (known: {', '.join(BUDGET_METRICS)})")
    try:
        value = float(raw)
    except ValueError:
        raise QwenEdgeError(f"budget {expr!r}: {raw!r} is not a number") from None
    if not math.isfinite(value):
        raise QwenEdgeError(f"budget {expr!r}: the bound must be finite")
    return name, op, value


def budget_value(result: dict[str, Any], metric: str) -> float | None:
    key, sub = BUDGET_METRICS[metric]
    v = result.get(key)
    if sub is not None:
        v = (v or {}).get(sub)
    return None if v is None else float(v)


def check_budgets(results: list[dict[str, Any]], budgets: Sequence[str]) -> list[str]:
    """Human-readable misses, one per (artifact, budget)."""
    misses = []
    for expr in budgets:
        metric, op, bound = parse_budget(expr)
        for r in results:
            v = budget_value(r, metric)
            ok = v is not None and {">=": v >= bound, "<=": v <= bound, ">": v > bound, "<": v < bound}[op]
            if not ok:
                where = f"{r['name']}" + (f" @{r['threads']} threads" if r.get("sweep") else "")
                misses.append(f"{where}: {metric} {v if v is None else f'{v:.4g}'} (budget {op} {bound:g})")
    return misses


def model_files(path: Path) -> tuple[list[Path], str, str, float | None, dict[str, Any]]:
    """(weight files, format, quant, bits per weight, manifest-or-config) of an artifact or a HF checkpoint dir."""
    if (path / "manifest.json").is_file():
        from ..model.artifact import Artifact

        art = Artifact.open(path, check_hashes=False)
        skip = {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja",
                "genai_config.json", "Modelfile", "special_tokens_map.json"}
        files = [path / f["path"] for f in art.manifest["files"] if Path(f["path"]).name not in skip]
        return files, art.format, art.quant, art.bits_per_weight, art.manifest
    if (path / "genai_config.json").is_file() and not any(path.glob("*.safetensors")):
        return _genai_model_files(path)  # an onnxruntime-genai folder (ours without its manifest carry config.json)
    if (path / "config.json").is_file():
        from ..model.checkpoint import Checkpoint

        ck = Checkpoint(path)
        try:
            files = list(ck.files)
            dtypes = sorted({ck.tensor_info(n).dtype for n in ck.tensor_names()})
            bpw = sum(f.stat().st_size for f in files) * 8 / max(ck.arch.parameter_count(), 1)
            return files, "hf", "torch-fp32 (" + "/".join(d.lower() for d in dtypes) + " weights)", bpw, \
                {"architecture": ck.arch.to_dict()}
        finally:
            ck.close()
    raise QwenEdgeError(f"{path}: not an artifact (no manifest.json) nor a checkpoint (no config.json)")


def _genai_model_files(path: Path) -> tuple[list[Path], str, str, float | None, dict[str, Any]]:
    """An onnxruntime-genai model folder made by another tool (its builder): graph, external data, and the facts of
    genai_config.json; the quant is named from the graph's MatMulNBits bits."""
    from ..formats.onnx import load_onnx_proto

    try:
        cfg = json.loads((path / "genai_config.json").read_text())
        m, d = cfg["model"], cfg["model"]["decoder"]
        arch = {"num_layers": int(d["num_hidden_layers"]), "num_kv_heads": int(d["num_key_value_heads"]),
                "head_dim": int(d["head_size"]), "hidden_size": int(d["hidden_size"]),
                "vocab_size": int(m["vocab_size"]), "num_heads": int(d["num_attention_heads"])}
        model = path / d["filename"]
        proto = load_onnx_proto(model)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise QwenEdgeError(f"{path}/genai_config.json: not a usable onnxruntime-genai model ({e})") from None
    bits = sorted({a.i for n in proto.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"})
    data = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    files = [model] + [path / f for f in sorted(data)]
    quant = "/".join(f"int{b}" for b in bits) or "float"
    return files, "onnx", quant, None, {"architecture": arch, "context_length": m.get("context_length")}


def bytes_per_token(path: Path, fmt: str, files: list[Path], arch: dict[str, Any], context: float) -> dict[str, Any]:
    """Weight bytes a decode step reads plus the KV cache it attends over (the estimate is documented in docs)."""
    total = sum(f.stat().st_size for f in files)
    gather_only = 0
    method = "file size"
    try:
        if fmt == "gguf":
            gather_only, method = _gguf_embedding_bytes(files[0] if files[0].suffix == ".gguf" else
                                                        next(f for f in files if f.suffix == ".gguf"))
        elif fmt == "onnx":
            gather_only, method = _onnx_gather_only_bytes(next(f for f in files if f.suffix == ".onnx"))
        elif fmt == "hf":
            # the torch backend holds weights in fp32 whatever the file's dtype
            v, h = arch["vocab_size"], arch["hidden_size"]
            total = _param_count(arch) * 4
            gather_only = 0 if arch["tie_word_embeddings"] else v * h * 4
            method = "fp32 parameters minus the embedding table (untied head)"
    except (OSError, StopIteration, ValueError, KeyError) as e:
        method = f"file size (tensor table unreadable: {type(e).__name__})"
    kv = (kv_cache_bytes(arch, 1, _kv_itemsize(path, fmt)) or 0) * context
    weights = max(total - gather_only, 0)
    return {"bytes_per_token": int(weights + kv), "weight_bytes": int(weights), "kv_bytes": int(kv),
            "embedding_rows_excluded_bytes": int(gather_only), "method": method}


def _kv_itemsize(path: Path, fmt: str) -> int:
    """Bytes per K/V element of the artifact's cache (its manifest's KV dtype); KV_BYTES when it has none."""
    if fmt != "onnx":
        return KV_BYTES
    if not (path / "manifest.json").is_file():
        return _graph_kv_itemsize(path)
    from ..backends.base import KV_ITEMSIZE, artifact_kv_dtype

    try:
        return KV_ITEMSIZE.get(artifact_kv_dtype(json.loads((path / "manifest.json").read_text())), KV_BYTES)
    except (OSError, ValueError):
        return KV_BYTES


def _graph_kv_itemsize(path: Path) -> int:
    """Bytes per element of the first past_key_values input of an onnxruntime-genai folder's graph."""
    from ..formats.onnx import load_onnx_proto

    try:
        d = json.loads((path / "genai_config.json").read_text())["model"]["decoder"]
        proto = load_onnx_proto(path / d["filename"])
    except (OSError, ValueError, KeyError, TypeError):
        return KV_BYTES
    elem = next((i.type.tensor_type.elem_type for i in proto.graph.input if i.name.startswith("past")), 0)
    return {1: 4, 10: 2, 16: 2}.get(elem, KV_BYTES)


def _param_count(arch: dict[str, Any]) -> int:
    from ..families import Arch

    return Arch(**arch).parameter_count()


def _gguf_embedding_bytes(path: Path) -> tuple[int, str]:
    """token_embd.weight is only gathered (one row per token) when a separate output.weight exists."""
    from ..formats.gguf import tensor_nbytes

    names = tensor_nbytes(path)
    if "output.weight" in names and "token_embd.weight" in names:
        return names["token_embd.weight"], "gguf tensors minus token_embd (untied head)"
    return 0, "gguf tensors (tied: token_embd is read whole as the head)"


def _onnx_gather_only_bytes(path: Path) -> tuple[int, str]:
    """Bytes of initializers that only Gather-type nodes read (embedding tables: one row per token); by stored range,
    so the tied embedding's view over the LM head's bytes (read in full every step) is not subtracted."""
    from ..formats.onnx import load_onnx_proto, weight_uses

    uses = weight_uses(load_onnx_proto(path))
    return sum(r[2] for r, kinds in uses.items() if kinds == {"gather"}), "onnx initializers minus gather-only tables"


def read_bandwidth_gbps(threads: int, size_mb: int = 256, repeats: int = 5) -> float:
    """Best-of-N memory read bandwidth: numpy sums over a buffer much larger than the caches, split over threads."""
    from concurrent.futures import ThreadPoolExecutor

    a = np.ones(size_mb * (1 << 20) // 8, dtype=np.float64)
    parts = np.array_split(a, max(1, threads))
    best = 0.0
    with ThreadPoolExecutor(max(1, threads)) as ex:
        list(ex.map(np.sum, parts))
        for _ in range(repeats):
            t = time.perf_counter()
            list(ex.map(np.sum, parts))
            dt = time.perf_counter() - t
            best = max(best, a.nbytes / dt / 1e9)
    return best


# --- one measurement, in a fresh process ------------------------------------------------------------------------
def _child_call(fn: Any, arg: Any, conn: Any) -> None:
    try:
        out: tuple[bool, Any] = (True, fn(arg))
    except BaseException as e:  # sent back and raised in the parent
        out = (False, e)
    try:
        conn.send(out)
    except Exception as e:  # an exception that does not pickle
        conn.send((False, RuntimeError(f"{type(out[1]).__name__}: {out[1]}; and it could not be sent back ({e})")))
    finally:
        conn.close()


def in_child(ctx: Any, fn: Any, arg: Any, what: str) -> Any:
    """`fn(arg)` in a fresh process of multiprocessing context `ctx`: its result, or its exception raised here; a
    child killed by a signal (a native crash in the engine) raises NativeCrash naming `what` and the signal."""
    from ..errors import signal_name

    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_call, args=(fn, arg, send), daemon=True)
    proc.start()
    send.close()
    try:
        got = recv.recv()
    except EOFError:
        got = None
    finally:
        recv.close()
        proc.join()
    if got is None:
        code = proc.exitcode
        if code is not None and code < 0:
            raise NativeCrash(f"{what}: the engine crashed with {signal_name(-code)} in native code (the bench "
                              "worker died; re-run with -v and report it; for llama.cpp, "
                              "QWEN_EDGE_LLAMA_EXTRA_BUFFERS=none runs its plain CPU kernels)")
        raise NativeCrash(f"{what}: the bench worker exited with code {code} without a result")
    ok, value = got
    if not ok:
        raise value
    return value


def _measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Child process: load, warm up, then time prefill + a greedy decode loop once; peak RSS of this process."""
    from ..backends import load

    t = time.perf_counter()
    rt = load(spec["path"], target=spec["target"], threads=spec["threads"], max_context=spec["max_context"])
    load_s = time.perf_counter() - t
    prompt, gen = spec["prompt"], spec["gen_tokens"]
    try:
        for _ in range(spec["warmup"]):
            _run_once(rt, prompt, min(gen, 8))
        run = _run_once(rt, prompt, gen)
        info = rt.info
        run.update(load_s=load_s, backend=info.backend, threads_used=info.threads, device=info.device,
                   context_length=info.context_length, kv_cache_bytes=info.extra.get("kv_cache_bytes"),
                   kv_dtype=info.extra.get("kv_dtype"))
    finally:
        rt.close()
    run["peak_rss_bytes"] = peak_rss_bytes()
    return run


def _measure_genai(spec: dict[str, Any]) -> dict[str, Any]:
    """Child process: the same prompt and token counts through onnxruntime-genai's Generator (as an app embeds it):
    the folder's genai_config.json as it is, but for the thread count; a cache of the same length as our backend's."""
    import onnxruntime_genai as og

    t = time.perf_counter()
    cfg = og.Config(spec["path"])
    cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": spec["threads"], "inter_op_num_threads": 1}}}}))
    model = og.Model(cfg)
    load_s = time.perf_counter() - t
    prompt, gen = spec["prompt"], spec["gen_tokens"]
    for _ in range(spec["warmup"]):
        _genai_once(og, model, prompt, min(gen, 8), spec["max_context"])
    run = _genai_once(og, model, prompt, gen, spec["max_context"])
    kv = kv_cache_bytes(spec["arch"], spec["max_context"], spec["kv_itemsize"])
    run.update(load_s=load_s, backend="onnxruntime-genai", threads_used=spec["threads"], device="cpu",
               context_length=spec["max_context"], kv_cache_bytes=kv,
               kv_dtype={4: "float32", 2: "float16"}.get(spec["kv_itemsize"]))
    del model
    run["peak_rss_bytes"] = peak_rss_bytes()
    return run


def _genai_once(og: Any, model: Any, prompt: list[int], gen: int, max_length: int) -> dict[str, Any]:
    """As _run_once: append_tokens runs the prompt, the first generate_next_token picks from its logits (time to
    first token); each later one runs one decode step. min_length keeps EOS from ending the run early."""
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max_length, min_length=len(prompt) + gen, do_sample=False)
    g = og.Generator(model, params)
    t0 = time.perf_counter()
    g.append_tokens(prompt)
    g.generate_next_token()
    ttft = time.perf_counter() - t0
    steps: list[float] = []
    while len(steps) + 1 < gen:
        t = time.perf_counter()
        g.generate_next_token()
        steps.append(time.perf_counter() - t)
    out = [int(t) for t in g.get_sequence(0)[len(prompt):]]
    del g
    return _timing(prompt, ttft, steps, out)


def check_engine(path: Path, fmt: str, engine: str) -> None:
    """QwenEdgeError unless `engine` can run the artifact at `path` (of format `fmt`)."""
    if engine not in ENGINES:
        raise QwenEdgeError(f"unknown engine {engine!r} (known: {', '.join(ENGINES)})")
    if engine == "qwen-edge":
        if not (path / "manifest.json").is_file() and fmt != "hf":
            raise QwenEdgeError(f"{path}: an onnxruntime-genai model folder, not a qwen-edge artifact: "
                                "bench it with --engine onnxruntime-genai")
        return
    if fmt != "onnx":
        raise QwenEdgeError(f"{path}: engine onnxruntime-genai runs ONNX models, not {fmt}")
    if not (path / "genai_config.json").is_file():
        raise QwenEdgeError(f"{path}: engine onnxruntime-genai needs genai_config.json beside the model")
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        raise QwenEdgeError("engine onnxruntime-genai needs onnxruntime-genai: pip install 'qwen-edge[genai]'") \
            from None


def peak_rss_bytes() -> int:
    """This process's peak resident set: VmHWM on Linux (ru_maxrss there keeps the pre-exec parent's peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def _run_once(rt: Any, prompt: list[int], gen: int) -> dict[str, Any]:
    rt.reset()
    t0 = time.perf_counter()
    rt.prefill(prompt)
    tok = int(np.argmax(rt.logits()))
    ttft = time.perf_counter() - t0
    out = [tok]
    steps: list[float] = []
    while len(out) < gen:
        t = time.perf_counter()
        rt.decode(tok)
        tok = int(np.argmax(rt.logits()))
        steps.append(time.perf_counter() - t)
        out.append(tok)
    return _timing(prompt, ttft, steps, out)


def _timing(prompt: list[int], ttft: float, steps: list[float], out: list[int]) -> dict[str, Any]:
    decode_s = sum(steps)
    return {"ttft_s": ttft, "prefill_tokens_per_s": len(prompt) / ttft, "decode_s": decode_s,
            "decode_tokens": len(steps), "generated_tokens": len(out), "generated_ids": out,
            "decode_tokens_per_s": len(steps) / decode_s if decode_s > 0 else None, "steps_s": steps}


def kv_cache_bytes(arch: dict[str, Any], context: int, itemsize: int) -> int | None:
    """Bytes of a preallocated K+V cache for `context` tokens (llama.cpp's default cache type is f16: 2 bytes)."""
    try:
        return 2 * int(arch["num_layers"]) * int(arch["num_kv_heads"]) * int(arch["head_dim"]) * int(context) * itemsize
    except (KeyError, TypeError, ValueError):
        return None


def bench_prompt(path: Path, n: int) -> list[int]:
    """n prompt ids: the shipped evaluation text through the artifact's own tokenizer, repeated as needed."""
    from ..text.tokenizer import Tokenizer
    from ..text.evaltext import eval_text

    tok = Tokenizer.from_dir(path)
    ids: list[int] = []
    for d in eval_text()["documents"]:
        ids += tok.encode(d["text"], parse_special=False)
    if not ids:
        raise QwenEdgeError(f"{path}: the tokenizer produced no ids for the benchmark prompt")
    return (ids * (n // len(ids) + 1))[:n]


def _stats(xs: list[float]) -> Stat:
    return {"median": float(np.median(xs)), "min": float(min(xs)), "max": float(max(xs))}


def machine_info(threads: list[int], bandwidth: float) -> dict[str, Any]:
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    libs = {}
    for pkg in ("qwen-edge", "numpy", "onnxruntime", "llama-cpp-python", "torch", "transformers"):
        try:
            libs[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    from .. import __version__

    libs.setdefault("qwen-edge", __version__)
    from ..device.hwinfo import report as kernels

    k = kernels()
    return {"cpu": cpu, "arch": platform.machine(), "emulated": k.pop("emulated"), "kernels": k,
            "physical_cores": psutil.cpu_count(logical=False),
            "logical_cores": psutil.cpu_count(logical=True), "threads": threads,
            "memory_bytes": psutil.virtual_memory().total, "os": platform.platform(),
            "python": platform.python_version(), "libraries": libs, "read_bandwidth_gbps": round(bandwidth, 2)}


def bench(artifacts: Sequence[str | os.PathLike | tuple[str | os.PathLike, str]], *, prompt_tokens: int = 128,
          gen_tokens: int = 128, threads: int | None = None, repeat: int = 3, warmup: int = 1,
          thread_sweep: Sequence[int] | None = None, target: str | None = None, max_context: int | None = None,
          engine: str | Sequence[str] = "qwen-edge", log: Log = None) -> BenchReport:
    """Time each artifact (A B A B ... across repeats, each run in a fresh process); returns the report.

    `engine` names what runs every artifact (ENGINES; several: each artifact under each, side by side); an item of
    `artifacts` given as (path, engine) runs under that engine alone."""
    from ..device.targets import load_target

    if not artifacts:
        raise QwenEdgeError("bench needs at least one artifact")
    for name, v, lo in (("prompt_tokens", prompt_tokens, 1), ("gen_tokens", gen_tokens, 2), ("repeat", repeat, 1),
                        ("warmup", warmup, 0)):
        if not isinstance(v, int) or v < lo:
            raise QwenEdgeError(f"{name} must be an integer >= {lo}, not {v!r}")
    profile = load_target(target)
    sweep = [int(t) for t in thread_sweep] if thread_sweep else [int(threads or profile.resolved_threads())]
    if any(t <= 0 for t in sweep):
        raise QwenEdgeError(f"thread counts must be positive: {sweep}")
    ctx = max_context or int(math.ceil((prompt_tokens + gen_tokens + 8) / 256) * 256)
    if ctx < prompt_tokens + gen_tokens:
        raise QwenEdgeError(f"--max-context {ctx} < prompt {prompt_tokens} + generated {gen_tokens} tokens")
    engines = [engine] if isinstance(engine, str) else list(engine)
    if not engines:
        raise QwenEdgeError("bench needs at least one engine")
    pairs = [(Path(a[0]), a[1]) if isinstance(a, tuple) else (Path(a), e) for a in artifacts
             for e in ([None] if isinstance(a, tuple) else engines)]
    named = len({e for _, e in pairs}) > 1
    entries = []
    for p, eng in pairs:
        if not p.exists():
            raise QwenEdgeError(f"{p}: no such artifact")
        files, fmt, quant, bpw, meta = model_files(p)
        check_engine(p, fmt, eng)
        limit = int(meta.get("context_length") or meta["architecture"].get("max_position_embeddings") or ctx)
        if prompt_tokens + gen_tokens > limit:
            raise QwenEdgeError(f"{p}: prompt {prompt_tokens} + generated {gen_tokens} tokens exceed the artifact's "
                                f"context length {limit}")
        entries.append({"path": p, "engine": eng, "name": p.name + (f" [{eng}]" if named else ""),
                        "files": files, "format": fmt, "quant": quant, "bpw": bpw,
                        "arch": meta["architecture"], "prompt": bench_prompt(p, prompt_tokens),
                        # the rounded-up default never asks for more than the artifact holds
                        "max_context": ctx if max_context else min(ctx, limit)})
    bandwidth = read_bandwidth_gbps(max(sweep))
    runs: dict[tuple[int, int], list[dict[str, Any]]] = {}
    ctx_mp = get_context("spawn")
    t_start = time.perf_counter()
    order = [(r, th, i) for r in range(repeat) for th in sweep
             for i in (range(len(entries)) if r % 2 == 0 else reversed(range(len(entries))))]  # A B, then B A
    from ..log import progress

    for r, th, i in progress(order, desc="bench", unit="run"):
        e = entries[i]
        spec = {"path": str(e["path"]), "target": profile.name if target is None else target, "threads": th,
                "max_context": e["max_context"], "prompt": e["prompt"], "gen_tokens": gen_tokens, "warmup": warmup,
                "arch": e["arch"], "kv_itemsize": _kv_itemsize(e["path"], e["format"])}
        measure = _measure_genai if e["engine"] == "onnxruntime-genai" else _measure
        res = in_child(ctx_mp, measure, spec, f"{e['path']} ({e['engine']}, {th} threads)")
        runs.setdefault((i, th), []).append(res)
        if log:
            log(f"repeat {r + 1}/{repeat} {e['name']} @{th}t: decode "
                f"{res['decode_tokens_per_s']:.1f} tok/s, prefill {res['prefill_tokens_per_s']:.1f} tok/s")
    results = []
    for th in sweep:
        first = None
        for i, e in enumerate(entries):
            rs = runs[(i, th)]
            steps = [s for x in rs for s in x["steps_s"]]
            size = sum(f.stat().st_size for f in e["files"])
            roof = bytes_per_token(e["path"], e["format"], e["files"], e["arch"], prompt_tokens + gen_tokens / 2)
            decode = _stats([x["decode_tokens_per_s"] for x in rs])
            bound = bandwidth * 1e9 / roof["bytes_per_token"] if roof["bytes_per_token"] else None
            roof.update(bound_tokens_per_s=bound, fraction=(decode["median"] / bound) if bound else None,
                        read_bandwidth_gbps=bandwidth)
            res: BenchResult = {
                "artifact": str(e["path"]), "name": e["name"], "format": e["format"], "quant": e["quant"],
                "engine": e["engine"], "backend": rs[0]["backend"], "threads": rs[0]["threads_used"], "sweep": len(sweep) > 1,
                "decode_tokens_per_s": decode,
                "prefill_tokens_per_s": _stats([x["prefill_tokens_per_s"] for x in rs]),
                "time_to_first_token_s": _stats([x["ttft_s"] for x in rs]),
                "load_s": _stats([x["load_s"] for x in rs]),
                "inter_token_latency_s": {"p50": float(np.percentile(steps, 50)),
                                          "p95": float(np.percentile(steps, 95))},
                "peak_rss_bytes": max(x["peak_rss_bytes"] for x in rs),
                "size_bytes": size, "bits_per_weight": e["bpw"],
                "prompt_tokens": len(e["prompt"]), "generated_tokens": rs[0]["generated_tokens"],
                "decode_tokens": rs[0]["decode_tokens"], "repeats": len(rs), "roofline": roof,
                "generated_ids": rs[0]["generated_ids"],
                "per_repeat": {k: [x[k] for x in rs] for k in ("decode_tokens_per_s", "prefill_tokens_per_s")},
            }
            if first is None:
                first = res
            res["ratio_to_first"] = {
                k: res[k]["median"] / first[k]["median"] if first[k]["median"] else None
                for k in ("decode_tokens_per_s", "prefill_tokens_per_s", "time_to_first_token_s")
            }
            res["ratio_to_first"]["size_bytes"] = size / first["size_bytes"] if first["size_bytes"] else None
            # Per repeat the two ran back to back: these ratios cancel the slow drift of a shared machine.
            firsts = runs[(0, th)]
            res["paired_ratio_to_first"] = {
                k: _stats([x[k] / y[k] for x, y in zip(rs, firsts)])
                for k in ("decode_tokens_per_s", "prefill_tokens_per_s")
            }
            kv = rs[0].get("kv_cache_bytes")  # onnxruntime reports its own; llama.cpp's default cache is f16
            if kv is None and e["format"] == "gguf":
                kv = kv_cache_bytes(e["arch"], rs[0].get("context_length") or e["max_context"], 2)
            res["kv_cache_bytes"] = kv
            res["kv_dtype"] = rs[0].get("kv_dtype") or ("float16" if e["format"] == "gguf" else None)
            res["rss_budget_bytes"] = int(1.5 * size + kv) if kv is not None else None
            results.append(res)
    return {
        "machine": machine_info(sweep, bandwidth),
        "results": results,
        "config": {"prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "repeat": repeat, "warmup": warmup,
                   "threads": sweep, "target": profile.name, "max_context": ctx, "sampling": "greedy argmax",
                   "engines": list(dict.fromkeys(e["engine"] for e in entries)),
                   "order": "interleaved (A B A B ...), each run in a fresh spawned process",
                   "seconds": round(time.perf_counter() - t_start, 1),
                   "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    }
