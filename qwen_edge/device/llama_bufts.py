"""Which of llama.cpp's extra CPU buffer types may hold a model's weights on this machine, decided by a probe.

llama.cpp's CPU backend places quantized weights in "extra" buffer types that bring their own matmul kernels:
`AMX` (Intel AMX tiles; compiled in when llama.cpp was built on a CPU with AMX, used where the OS grants the tiles)
and `CPU_REPACK` (weights interleaved for the AVX2 / AVX-512 / NEON GEMM kernels). On some CPUs with AMX the AMX
kernel segfaults on every prompt batch of a quantized model (`ggml_backend_amx_mul_mat`; q8_0, q4_0, q4_k_m alike),
so a plain `generate` or `verify` would kill the process. Nothing here guesses by vendor: a policy says which extra
buffer types a load may use.

- `auto` (the default): llama.cpp's own choice where no AMX buffer type is present (no probe, parameters
  unchanged). Where AMX is present, a probe in a child process (a prompt batch through q8_0, q4_0, q4_k_m and iq4_xs
  of a tiny 256-wide model) decides, once per machine and llama.cpp build (cached): AMX kept if it runs, else every
  extra buffer type but AMX (`repack`), else none.
- `all`: llama.cpp's default (every extra buffer type, AMX included).
- `repack`: every extra buffer type but AMX (CPU_REPACK's kernels stay: 32 vs 23 tok/s decode measured on a
  0.5B q4_0 against `none` on an AMX machine).
- `none`: no extra buffer types (`use_extra_bufts = false`): plain CPU buffers only.

Set by the load option `extra_buffers`, else `$QWEN_EDGE_LLAMA_EXTRA_BUFFERS`, else the target profile's
`llama_extra_buffers`. `qwen-edge -v` logs the decision and which buffer types hold the weights.

How `repack` is applied: llama.cpp reads the CPU device's NULL-terminated list of extra buffer types
(`ggml_backend_dev_get_extra_bufts`) when it loads a model and offers the weights to each in order. While our load
runs, that list (a writable array inside libggml-cpu) holds only the allowed types; it is restored right after. The
array's memory is checked writable first; where anything about it is not as expected, `repack` falls back to `none`.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import QwenEdgeError, signal_name
from ..log import logger
from .targets import LLAMA_EXTRA_BUFFERS

POLICIES = LLAMA_EXTRA_BUFFERS
ENV = "QWEN_EDGE_LLAMA_EXTRA_BUFFERS"
PROBE_VERSION = 1
"""Bump when the probe's models or checks change: cached verdicts of an older probe are not trusted."""
PROBE_QUANTS = ("q8_0", "q4_0", "q4_k_m", "iq4_xs")
"""The quantizations the probe runs: every common GGUF quant whose types AMX and CPU_REPACK take."""
PROBE_ARCH = "tiny-qwen3-256"
"""256 wide: k-quant rows (256 values a block) and the fast kernels' tile shapes apply; tied LM head."""
PROBE_TIMEOUT_S = 300.0
_MAX_EXTRA = 16

_lock = threading.Lock()


@dataclass
class Decision:
    """What a llama.cpp load does about extra buffer types, and why."""

    policy: str
    """The policy asked for (auto, all, repack, none)."""
    mode: str
    """What is applied: all, repack or none."""
    available: list[str] = field(default_factory=list)
    """The CPU device's extra buffer types in llama.cpp's order, e.g. ['AMX', 'CPU_REPACK']."""
    reason: str = ""

    @property
    def allowed(self) -> list[str]:
        if self.mode == "none":
            return []
        return [n for n in self.available if self.mode == "all" or n != "AMX"]


def check_policy(value: Any, name: str = "llama_extra_buffers") -> str:
    if isinstance(value, str) and value in POLICIES:
        return value
    raise QwenEdgeError(f"{name} must be one of {', '.join(POLICIES)}, not {value!r:.60}")


# --- the CPU device's list of extra buffer types -----------------------------------------------------------------
class _ExtraList:
    """The CPU device's NULL-terminated array of extra buffer types, read (and rewritten) through ggml's C API."""

    def __init__(self, L: Any):
        from llama_cpp import _ggml  # the libggml llama-cpp-python loaded beside libllama

        g = _ggml.libggml
        g.ggml_backend_dev_by_type.restype = ctypes.c_void_p
        g.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
        g.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
        g.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
        g.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
        g.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        g.ggml_backend_buft_name.restype = ctypes.c_char_p
        g.ggml_backend_buft_name.argtypes = [ctypes.c_void_p]
        self._g = g
        dev = g.ggml_backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
        reg = g.ggml_backend_dev_backend_reg(dev) if dev else None
        fn = g.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts") if reg else None
        self.array: Any = None
        self.original: list[int] = []
        if fn:
            get = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)(fn)
            ptr = get(dev)
            if ptr:
                self.array = ctypes.cast(ptr, ctypes.POINTER(ctypes.c_void_p))
                for i in range(_MAX_EXTRA):
                    if not self.array[i]:
                        break
                    self.original.append(int(self.array[i]))
        self.names = [self.name(p) for p in self.original]

    def name(self, buft: int) -> str:
        raw = self._g.ggml_backend_buft_name(ctypes.c_void_p(buft))
        return raw.decode("utf-8", "replace") if raw else "?"

    def writable(self) -> bool:
        """Is the array in writable memory of this process (Linux: /proc/self/maps)?"""
        if self.array is None:
            return False
        start = ctypes.cast(self.array, ctypes.c_void_p).value or 0
        end = start + (len(self.original) + 1) * ctypes.sizeof(ctypes.c_void_p)
        try:
            with open("/proc/self/maps") as f:
                for line in f:
                    lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                    if lo <= start and end <= hi:
                        return line.split()[1].startswith("rw")
        except (OSError, ValueError, IndexError):
            return False
        return False

    def write(self, keep: list[str]) -> None:
        ptrs = [p for p, n in zip(self.original, self.names) if n in keep]
        for i, p in enumerate(ptrs):
            self.array[i] = p
        for i in range(len(ptrs), len(self.original) + 1):
            self.array[i] = None

    def restore(self) -> None:
        for i, p in enumerate(self.original):
            self.array[i] = p
        self.array[len(self.original)] = None


_extra: _ExtraList | None = None


def _extra_list(L: Any) -> _ExtraList | None:
    global _extra
    if _extra is None:
        try:
            _extra = _ExtraList(L)
        except (AttributeError, OSError, ImportError, ValueError) as e:
            logger.debug("llama.cpp: cannot read the CPU device's extra buffer types (%s)", e)
            return None
    return _extra


def available_extra_buffers(L: Any) -> list[str]:
    """The CPU device's extra buffer types in the order llama.cpp offers weights to them ([] if unreadable)."""
    ex = _extra_list(L)
    return list(ex.names) if ex else []


# --- the decision ------------------------------------------------------------------------------------------------
def decide(L: Any, policy: str, *, probe: Any = None) -> Decision:
    """The extra-buffer mode for a load under `policy` on this machine. `probe(mode, available) -> verdict`
    (default: the cached child-process probe) is consulted only for `auto` with AMX present."""
    policy = check_policy(policy)
    available = available_extra_buffers(L)
    if policy != "auto":
        return Decision(policy, policy, available, f"asked for ({policy})")
    if "AMX" not in available:
        return Decision(policy, "all", available, "no AMX buffer type here: llama.cpp's own choice")
    probe = probe or cached_probe
    verdict = probe("all", available)
    if verdict == "ok":
        return Decision(policy, "all", available, "AMX kept: the probe's prompt batches ran with it")
    if [n for n in available if n != "AMX"]:
        second = probe("repack", available)
        if second == "ok":
            return Decision(policy, "repack", available, f"AMX left out: the probe with it {verdict}")
        return Decision(policy, "none", available,
                        f"no extra buffer types: the probe with AMX {verdict}, without AMX {second}")
    return Decision(policy, "none", available, f"no extra buffer types: the probe with AMX {verdict}")


def policy_for(option: Any, target: Any) -> str:
    """The policy a load uses: the load option, else $QWEN_EDGE_LLAMA_EXTRA_BUFFERS, else the profile's."""
    if option is not None:
        return check_policy(option, "llama_cpp option extra_buffers")
    env = os.environ.get(ENV)
    if env:
        return check_policy(env.strip().lower(), ENV)
    return check_policy(getattr(target, "llama_extra_buffers", None) or "auto")


class applied:
    """Context manager around `llama_model_load_from_file`: sets `use_extra_bufts` on the model params and, for
    `repack`, narrows the CPU device's extra buffer list while the load runs (restored after)."""

    def __init__(self, L: Any, decision: Decision, params: Any):
        self.L, self.decision, self.params = L, decision, params
        self.effective = decision.mode
        self._edited = False

    def __enter__(self) -> "applied":
        mode = self.decision.mode
        if mode == "repack":
            ex = _extra_list(self.L)
            if ex is None or not ex.writable():
                logger.debug("llama.cpp: the extra buffer list cannot be narrowed here: no extra buffer types")
                mode = self.effective = "none"
            else:
                _lock.acquire()
                ex.write(self.decision.allowed)
                self._edited = True
        self.params.use_extra_bufts = mode != "none"
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._edited:
            try:
                assert _extra is not None
                _extra.restore()
            finally:
                _lock.release()


_BUFFER_LINE = re.compile(r"\b([A-Za-z0-9_]+) model buffer size\s*=\s*([0-9.]+) MiB")


def weight_buffers(log_text: str) -> dict[str, float]:
    """{buffer type: MiB} of a model's weights, from llama.cpp's load log ("CPU_REPACK model buffer size = ...")."""
    out: dict[str, float] = {}
    for name, mib in _BUFFER_LINE.findall(log_text):
        out[name] = out.get(name, 0.0) + float(mib)
    return out


# --- the probe ---------------------------------------------------------------------------------------------------
def _cache_dir() -> Path:
    from .datafiles import cache_dir as base

    return base()


def cpu_identity() -> dict[str, Any]:
    """The CPU as the probe's cache key sees it: model name and flags (Linux /proc/cpuinfo; else platform)."""
    import platform

    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip().lower(), value.strip())  # the first core's
    except OSError:
        pass
    model = info.get("model name") or info.get("cpu part") or platform.processor() or ""
    flags = info.get("flags") or info.get("features") or ""
    return {"model": model, "flags": " ".join(sorted(flags.split())), "machine": platform.machine()}


def _library_identity() -> dict[str, Any]:
    """llama-cpp-python's version and its native libraries' sizes and times (a rebuild with other flags differs)."""
    import llama_cpp

    lib = Path(llama_cpp.__file__).parent / "lib"
    files = sorted(lib.glob("*ggml*")) + sorted(lib.glob("*llama*")) if lib.is_dir() else []
    return {"llama_cpp": getattr(llama_cpp, "__version__", ""),
            "libs": [[p.name, p.stat().st_size, int(p.stat().st_mtime)] for p in files if p.is_file()]}


def probe_key(available: list[str]) -> str:
    ident = {"probe": PROBE_VERSION, "cpu": cpu_identity(), "lib": _library_identity(), "extra": available}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]


def cached_probe(mode: str, available: list[str]) -> str:
    """The probe's verdict for `mode` on this machine and llama.cpp build: read from the cache, else run (and
    cached). "ok", or what went wrong ("crashed with SIGSEGV", "failed: ...", "timed out")."""
    path = _cache_dir() / f"llama-extra-buffers-{probe_key(available)}.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        verdict = record["verdicts"][mode]
        if isinstance(verdict, str):
            logger.debug("llama.cpp extra buffers: cached probe verdict for %s: %s (%s)", mode, verdict, path)
            return verdict
    except (OSError, ValueError, KeyError, TypeError):
        record = {}
    logger.info("checking which llama.cpp CPU kernels run on this machine (once; %s)", mode)
    verdict = run_probe(mode)
    verdicts = dict(record.get("verdicts") or {}) if isinstance(record, dict) else {}
    verdicts[mode] = verdict
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"verdicts": verdicts, "cpu": cpu_identity(), "lib": _library_identity(),
                                   "extra": available}, indent=1), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass  # not cached: the next process probes again
    return verdict


def run_probe(mode: str, command: list[str] | None = None, timeout: float = PROBE_TIMEOUT_S) -> str:
    """Run the probe for `mode` in a child process: "ok", "crashed with SIGSEGV", "failed: ...", "timed out".

    `command` replaces the child's command line (tests)."""
    cmd = command or [sys.executable, "-m", "qwen_edge.cli.llama_probe", mode]
    env = dict(os.environ)
    env[ENV] = mode  # the child loads under exactly this mode (and so never probes itself)
    env.pop("QWEN_EDGE_CRASH_NOTE", None)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f} s"
    except OSError as e:
        return f"failed: {e}"
    if r.returncode < 0:
        return f"crashed with {signal_name(-r.returncode)}"
    if r.returncode != 0:
        lines = [ln for ln in (r.stderr or "").splitlines() if ln.strip()]
        return "failed: " + (lines[-1][:200] if lines else f"exit code {r.returncode}")
    return "ok"


def describe(decision: Decision, buffers: dict[str, float], mode: str | None = None) -> str:
    """The -v line: where the weights went and why (`mode`: what the load applied, if it fell back)."""
    held = ", ".join(f"{k} {v:.1f} MiB" for k, v in buffers.items()) or "unknown"
    return (f"llama.cpp weights in {held}; extra buffer types {mode or decision.mode} "
            f"(policy {decision.policy}; available: {', '.join(decision.available) or 'none'}; {decision.reason})")


__all__ = ["Decision", "POLICIES", "available_extra_buffers", "decide", "policy_for", "applied", "weight_buffers",
           "cached_probe", "run_probe", "cpu_identity", "check_policy"]
