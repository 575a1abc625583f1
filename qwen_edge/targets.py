"""Target profiles (runtimes/*.yaml): threads, execution providers, GPU layers, accuracy level, memory cap."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .datafiles import find, list_files
from .errors import QwenEdgeError, first_line

ALIASES = {"cpu": "cpu-x86_64", "x86_64": "cpu-x86_64", "arm64": "arm64-mobile", "gpu": "cuda"}


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
    """CPU threads for compute; `auto` = physical cores of the machine."""
    execution_providers: list[str] = field(default_factory=lambda: ["CPUExecutionProvider"])
    """onnxruntime providers, in order of preference."""
    gpu_layers: int = 0
    """llama.cpp layers to offload (-1 = all)."""
    accuracy_level: int = 4
    """onnxruntime MatMulNBits accuracy level (4 = int8 compute on CPU, 0 = unset)."""
    max_context: int = 4096
    """KV cache tokens a runtime preallocates by default."""
    memory_cap_mb: int | None = None
    """Memory the device gives the model (informational; bench reports against it)."""

    def resolved_threads(self) -> int:
        if isinstance(self.threads, int) and self.threads > 0:
            return self.threads
        return physical_cores()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)


def physical_cores() -> int:
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
        if n:
            return int(n)
    except Exception:
        pass
    import os

    return max(1, (os.cpu_count() or 2))


def available_targets() -> list[str]:
    """Profile names along the search path ($QWEN_EDGE_RUNTIMES_PATH, then the packaged profiles)."""
    return sorted(p.stem for p, _ in list_files("runtimes"))


def load_target(name_or_path: str | dict | Target | None) -> Target:
    """A profile by name (`cpu-x86_64`, alias `cpu`/`arm64`/`cuda`) or from a YAML path."""
    if isinstance(name_or_path, Target):
        return name_or_path
    if name_or_path is None:
        name_or_path = "cpu-x86_64"
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
        except (OSError, yaml.YAMLError) as e:
            raise QwenEdgeError(f"{path}: cannot read target profile ({first_line(e)})") from None
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
    if not isinstance(t.max_context, int) or t.max_context <= 0:
        raise QwenEdgeError(f"{src}: max_context must be a positive integer")
    return t


def _is_name(key: str) -> bool:
    """A bare profile name (no path separators, no `..`), safe to look up along the search path."""
    return bool(key) and "/" not in key and "\\" not in key and ".." not in key and "\0" not in key
