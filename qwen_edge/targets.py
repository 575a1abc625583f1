"""Target profiles (runtimes/*.yaml): threads, execution providers, GPU layers, accuracy level, memory cap."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import QwenEdgeError, first_line

RUNTIMES_DIR = Path(__file__).resolve().parent.parent / "runtimes"
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
    return sorted(p.stem for p in RUNTIMES_DIR.glob("*.yaml"))


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
        path = Path(key) if key.endswith((".yaml", ".yml")) else RUNTIMES_DIR / f"{key}.yaml"
        if not path.is_file():
            raise QwenEdgeError(f"unknown target {name_or_path!r} (available: {', '.join(available_targets())})")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            raise QwenEdgeError(f"{path}: cannot read target profile ({first_line(e)})") from None
        src = str(path)
        if not isinstance(data, dict):
            raise QwenEdgeError(f"{path}: a target profile must be a mapping")
    known = {f.name for f in fields(Target)}
    for k in data:
        if k not in known:
            raise QwenEdgeError(f"{src}: unknown key {k!r} (known: {', '.join(sorted(known))})")
    if "name" not in data:
        raise QwenEdgeError(f"{src}: missing 'name'")
    t = Target(**data)
    if t.device not in ("cpu", "cuda"):
        raise QwenEdgeError(f"{src}: device must be cpu or cuda, not {t.device!r}")
    if not isinstance(t.max_context, int) or t.max_context <= 0:
        raise QwenEdgeError(f"{src}: max_context must be a positive integer")
    return t
