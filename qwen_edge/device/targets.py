"""Target profiles (runtimes/*.yaml): threads, execution providers, GPU layers, accuracy level, memory cap."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .datafiles import find, list_files
from ..errors import QwenEdgeError, first_line

ALIASES = {"cpu": "cpu-x86_64", "x86_64": "cpu-x86_64", "arm64": "arm64-mobile", "gpu": "cuda"}
ARM64_MACHINES = ("aarch64", "arm64", "aarch64_be")
"""`platform.machine()` names of a 64-bit Arm CPU (Linux says aarch64, macOS arm64)."""


@dataclass
class Target:
    """A hardware preset that pairs with recipes and drives backends and bench."""

    name: str
    """Profile name, e.g. `cpu-x86_64`."""
    description: str = ""
    device: str = "cpu"
    """`cpu` or `cuda`."""
    arch: str = "x86_64"
    """CPU architecture the profile describes (`x86_64`, `arm64`)."""
    source: str = ""
    """Where the profile was read from: a file path, `packaged:NAME`, or empty for one given as a mapping."""
    threads: int | str = "auto"
    """CPU threads for compute; `auto` = physical cores, less those other processes keep busy when a model loads."""
    spin: bool | int | str = "auto"
    """How idle compute threads wait for work: false = sleep at once, true = the engine's own spinning (busy-wait),
    N = spin up to N microseconds, then sleep (onnxruntime's `session.intra_op.spin_duration_us`; llama.cpp's OpenMP
    has no time bound: PASSIVE there), `auto` = what measured best per engine (benchmarks/RESULTS.md, "Busy machine"):
    onnxruntime spins when its threads have cores to themselves at load and sleeps at once when not, llama.cpp keeps
    OpenMP's default (spin a while, then sleep)."""
    execution_providers: list[str] = field(default_factory=lambda: ["CPUExecutionProvider"])
    """onnxruntime providers, in order of preference."""
    gpu_layers: int = 0
    """llama.cpp layers to offload (-1 = all)."""
    accuracy_level: int = 4
    """onnxruntime MatMulNBits accuracy level (4 = int8 compute on CPU, 0 = unset)."""
    onnx_block_size: int | None = None
    """Default MatMulNBits block size of this target's int4/int8 ONNX exports (None: the exporter's, 32); an export
    option or recipe still overrides it. Fewer scale bytes per weight: a memory-bound CPU decodes faster."""
    onnx_lm_head_bits: int | None = None
    """Default LM head bits of this target's int4/int8 ONNX exports: 4, 8 or 16 (None: the exporter's, 8)."""
    llama_extra_buffers: str = "auto"
    """Which of llama.cpp's extra CPU buffer types (AMX, CPU_REPACK) may hold GGUF weights: `auto` (llama.cpp's
    choice unless AMX is present, then a cached probe decides), `all`, `repack` (all but AMX) or `none`
    (qwen_edge/device/llama_bufts.py; $QWEN_EDGE_LLAMA_EXTRA_BUFFERS overrides)."""
    max_context: int = 4096
    """KV cache tokens a runtime preallocates by default."""
    memory_cap_mb: int | None = None
    """Memory the device gives the model (informational; bench reports against it)."""

    def resolved_threads(self) -> int:
        """`threads`, or for `auto` the physical cores less those other processes keep busy right now (at least 1):
        a compute thread that shares its core with another busy process holds its partners up at every barrier."""
        if isinstance(self.threads, int) and self.threads > 0:
            return self.threads
        return auto_threads(physical_cores(), busy_cores())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)


LLAMA_EXTRA_BUFFERS = ("auto", "all", "repack", "none")
"""`llama_extra_buffers` values (llama_bufts.POLICIES): here so that checking a profile does not import llama_bufts
(ctypes, subprocess: load time of an ONNX artifact, issue 24)."""


def check_spin(value: Any, name: str = "spin") -> bool | int | str:
    """A spin policy as given in a profile or to load(): true, false, auto, or microseconds (0 = false)."""
    if isinstance(value, bool) or value == "auto":
        return value
    if isinstance(value, int) and 0 <= value <= 1_000_000:
        return value if value else False
    raise QwenEdgeError(f"{name} must be true, false, auto or microseconds (0..1000000), not {value!r}")


def auto_threads(cores: int, busy: float) -> int:
    """Threads for `threads: auto`: the cores no other process keeps busy, at least one."""
    return max(1, cores - int(busy + 0.5))


def busy_cores(samples: int = 5, interval_s: float = 0.01) -> float:
    """Cores other processes keep busy right now: the kernel's count of runnable threads (/proc/stat procs_running,
    averaged over `samples` reads `interval_s` apart: ~40 ms) less this process's one; 0 where it cannot be read.

    Instantaneous on purpose: the load average trails by a minute and counts this process's own recent work."""
    import time

    counts = []
    try:
        for i in range(samples):
            if i:
                time.sleep(interval_s)
            with open("/proc/stat", "rb") as f:
                for line in f:
                    if line.startswith(b"procs_running"):
                        counts.append(int(line.split()[1]))
                        break
    except (OSError, ValueError, IndexError):
        return 0.0
    if not counts:
        return 0.0
    return max(0.0, sum(counts) / len(counts) - 1)


def _sysfs_cores() -> int:
    """Linux: distinct cores in sysfs's CPU topology (psutil.cpu_count(logical=False)'s first method, without
    importing psutil: ~0.03 s of every load, issue 24); 0 where sysfs does not say."""
    import glob

    cores = set()
    for pattern in ("core_cpus_list", "thread_siblings_list"):  # the newer name, then the deprecated one
        for path in glob.glob(f"/sys/devices/system/cpu/cpu[0-9]*/topology/{pattern}"):
            try:
                with open(path, "rb") as f:
                    cores.add(f.read().strip())
            except OSError:
                pass
        if cores:
            break
    return len(cores)


def physical_cores() -> int:
    n = _sysfs_cores()
    if n:
        return n
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
        if n:
            return int(n)
    except Exception:
        pass
    import os

    return max(1, (os.cpu_count() or 2))


def default_target_name(machine: str | None = None) -> str:
    """The profile a run gets when none is named: `arm64-mobile` on a 64-bit Arm CPU, else `cpu-x86_64`."""
    import platform

    m = (machine if machine is not None else platform.machine()).lower()
    return "arm64-mobile" if m in ARM64_MACHINES else "cpu-x86_64"


def available_targets() -> list[str]:
    """Profile names along the search path ($QWEN_EDGE_RUNTIMES_PATH, then the packaged profiles)."""
    return sorted(p.stem for p, _ in list_files("runtimes"))


def load_target(name_or_path: str | dict | Target | None) -> Target:
    """A profile by name (`cpu-x86_64`, alias `cpu`/`arm64`/`cuda`) or from a YAML path; None: this machine's
    default (default_target_name())."""
    if isinstance(name_or_path, Target):
        return name_or_path
    if name_or_path is None:
        name_or_path = default_target_name()
    if isinstance(name_or_path, dict):
        data, src = dict(name_or_path), "target"
    else:
        key = ALIASES.get(name_or_path, name_or_path)
        found = (Path(key), "file") if key.endswith((".yaml", ".yml")) else find("runtimes", key) if _is_name(key) else None
        if found is None or not found[0].is_file():
            raise QwenEdgeError(f"unknown target {name_or_path!r} (available: {', '.join(available_targets())})")
        path, origin = found
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise QwenEdgeError(f"{path}: cannot read target profile ({first_line(e)})") from None
        except RecursionError:
            raise QwenEdgeError(f"{path}: target profile nested too deeply") from None
        src = str(path) if origin != "packaged" else f"packaged:{path.stem}"
        if not isinstance(data, dict):
            raise QwenEdgeError(f"{path}: a target profile must be a mapping")
    known = {f.name for f in fields(Target)}
    for k in data:
        if k not in known:
            raise QwenEdgeError(f"{src}: unknown key {k!r} (known: {', '.join(sorted(known))})")
    if "name" not in data:
        raise QwenEdgeError(f"{src}: missing 'name'")
    t = Target(**{**data, "source": src if src != "target" else str(data.get("source") or "")})
    if t.device not in ("cpu", "cuda"):
        raise QwenEdgeError(f"{src}: device must be cpu or cuda, not {t.device!r}")
    if not isinstance(t.max_context, int) or isinstance(t.max_context, bool) or t.max_context <= 0:
        raise QwenEdgeError(f"{src}: max_context must be a positive integer")
    if t.threads != "auto" and (not isinstance(t.threads, int) or isinstance(t.threads, bool) or t.threads <= 0):
        raise QwenEdgeError(f"{src}: threads must be a positive integer or auto, not {t.threads!r}")
    try:
        t.spin = check_spin(t.spin)
    except QwenEdgeError as e:
        raise QwenEdgeError(f"{src}: {e}") from None
    if t.llama_extra_buffers not in LLAMA_EXTRA_BUFFERS:
        raise QwenEdgeError(f"{src}: llama_extra_buffers must be one of {', '.join(LLAMA_EXTRA_BUFFERS)}, "
                            f"not {t.llama_extra_buffers!r:.60}")
    for key, allowed in (("onnx_block_size", (16, 32, 64, 128, 256)), ("onnx_lm_head_bits", (4, 8, 16))):
        v = getattr(t, key)
        if v is not None and (isinstance(v, bool) or v not in allowed):
            raise QwenEdgeError(f"{src}: {key} must be one of {', '.join(map(str, allowed))}, not {v!r}")
    return t


def _is_name(key: str) -> bool:
    """A bare profile name (no path separators, no `..`), safe to look up along the search path."""
    return bool(key) and "/" not in key and "\\" not in key and ".." not in key and "\0" not in key
