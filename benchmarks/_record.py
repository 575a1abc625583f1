"""Write one benchmark run as a JSON record under benchmarks/results/ (format: benchmarks/results/README.md).

Every script in benchmarks/ calls `write_record` once per run; `benchmarks/report.py` renders RESULTS.md from the
records. Standard library only, so that importing it costs nothing beside the benchmark.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
FORMAT = "qwen-edge-record/1"
LIBRARIES = {"qwen_edge": "qwen-edge", "onnxruntime": "onnxruntime", "llama_cpp": "llama-cpp-python",
             "numpy": "numpy", "gguf": "gguf", "torch": "torch"}

_STARTED = {"date": datetime.now(timezone.utc), "load": None}


def utc(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


_STARTED["load"] = load_average()


def start() -> None:
    """Mark the start of the measured run (date and load average); importing this module does it too."""
    _STARTED["date"], _STARTED["load"] = datetime.now(timezone.utc), load_average()


def _lscpu() -> tuple[str | None, list[str]]:
    model, flags = None, []
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True,
                             env={**os.environ, "LC_ALL": "C"}).stdout
    except (OSError, subprocess.CalledProcessError):
        return None, []
    for line in out.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Model name" and model is None:
            model = value.strip()
        elif key.strip() == "Flags":
            flags = value.split()
    return model, flags


def physical_cores() -> int | None:
    try:
        out = subprocess.run(["lscpu", "-p=Core,Socket"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return len({ln for ln in out.splitlines() if ln and not ln.startswith("#")}) or None


def memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def machine() -> dict[str, Any]:
    """The machine of this run: lscpu model name and flags (one string), cores, memory, OS, Python, load average at start."""
    model, flags = _lscpu()
    return {"cpu": model or platform.processor() or platform.machine(), "arch": platform.machine(), "flags": " ".join(flags),
            "physical_cores": physical_cores(), "logical_cores": os.cpu_count(), "memory_bytes": memory_bytes(),
            "os": platform.platform(), "python": platform.python_version(),
            "load_average_start": _STARTED["load"], "load_average_end": load_average()}


def _git(*args: str) -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def libraries() -> dict[str, Any]:
    """Installed versions (null when absent) and the git commit of the qwen_edge tree measured."""
    libs: dict[str, Any] = {}
    for key, dist in LIBRARIES.items():
        try:
            libs[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            libs[key] = None
    libs["git_commit"] = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no", "--", "qwen_edge")
    libs["git_dirty"] = None if status is None else bool(status)
    return libs


def command_line(argv: list[str] | None = None) -> str:
    argv = sys.argv if argv is None else argv
    script = Path(argv[0])
    try:
        script = script.resolve().relative_to(ROOT)
    except ValueError:
        pass
    return " ".join(["python", shlex.quote(str(script)), *map(shlex.quote, argv[1:])])


def record_name(bench: str, date: str, label: str = "") -> str:
    stamp = date.replace("-", "").replace(":", "")
    return f"{bench}-{stamp}" + (f"-{label}" if label else "") + ".json"


def write_record(bench: str, figures: Any, *, settings: dict[str, Any] | None = None,
                 notes: list[str] | None = None, label: str = "", argv: list[str] | None = None,
                 out_dir: Path | str | None = None, rendered_in: str | None = None,
                 extra_machine: dict[str, Any] | None = None) -> Path:
    """Write the record of one run; returns its path. `figures` are the measured numbers as computed;
    `extra_machine` adds what the run measured about the machine (e.g. read bandwidth)."""
    date = utc(_STARTED["date"])
    rec: dict[str, Any] = {
        "format": FORMAT, "bench": bench, "command": command_line(argv), "date": date,
        "finished": utc(datetime.now(timezone.utc)), "machine": {**machine(), **(extra_machine or {})},
        "libraries": libraries(),
        "settings": settings or {}, "figures": figures, "notes": list(notes or []),
    }
    if rendered_in:
        rec["rendered_in"] = rendered_in
    out = Path(out_dir or os.environ.get("QWEN_EDGE_RESULTS_DIR") or RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    path = out / record_name(bench, date, label)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, indent=1, sort_keys=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    print(f"record: {path} (render: python benchmarks/report.py)", file=sys.stderr)
    return path


if __name__ == "__main__":  # print what a record would say about this machine
    print(json.dumps({"machine": machine(), "libraries": libraries(), "at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                         time.gmtime())}, indent=1))
