"""Where recipes and target profiles come from: directories the user names, then the copies inside the package."""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal, Sequence

from ..errors import QwenEdgeError

Kind = Literal["recipes", "runtimes"]

ENV_VARS: dict[str, str] = {"recipes": "QWEN_EDGE_RECIPES_PATH", "runtimes": "QWEN_EDGE_RUNTIMES_PATH"}
"""Environment variables naming extra directories (separated by os.pathsep), searched before the packaged data."""
PACKAGED = "packaged"


@dataclass(frozen=True)
class SearchDir:
    """One directory searched for recipes or target profiles, and why it is searched."""

    path: Path
    origin: str
    """`packaged` (inside the installed qwen-edge), `QWEN_EDGE_..._PATH` (the environment) or `--recipes-dir`."""


def packaged_dir(kind: Kind) -> Path:
    """The data shipped inside the package (`qwen_edge/data/recipes`, `qwen_edge/data/runtimes`).

    In a checkout these are links to the top-level `export_recipes/` and `runtimes/`; a built wheel holds copies.
    """
    sub = "recipes" if kind == "recipes" else "runtimes"
    return Path(str(resources.files("qwen_edge") / "data" / sub))


def cache_dir() -> Path:
    """The user cache (built tokenizer.json files, llama.cpp probe verdicts): $QWEN_EDGE_CACHE_DIR, else the XDG cache."""
    env = os.environ.get("QWEN_EDGE_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qwen_edge"


def search_dirs(kind: Kind, extra: Sequence[str | os.PathLike[str]] = (), extra_origin: str = "--recipes-dir"
                ) -> list[SearchDir]:
    """Directories in lookup order: those passed in `extra`, those in the environment, then the packaged data."""
    dirs = []
    for p in extra:
        if not Path(p).is_dir():
            raise QwenEdgeError(f"{p}: no such {kind} directory ({extra_origin})")
        dirs.append(SearchDir(Path(p), extra_origin))
    env = ENV_VARS[kind]
    dirs += [SearchDir(Path(p), env) for p in os.environ.get(env, "").split(os.pathsep) if p.strip()]
    dirs.append(SearchDir(packaged_dir(kind), PACKAGED))
    return dirs


def find(kind: Kind, name: str, extra: Sequence[str | os.PathLike[str]] = ()) -> tuple[Path, str] | None:
    """The first `name` or `name.yaml` along the search path, with its origin; None when nowhere."""
    for d in search_dirs(kind, extra):
        for cand in (d.path / name, d.path / f"{name}.yaml"):
            if cand.suffix in (".yaml", ".yml") and cand.is_file():
                return cand, d.origin
    return None


def list_files(kind: Kind, extra: Sequence[str | os.PathLike[str]] = ()) -> list[tuple[Path, str]]:
    """Every `*.yaml` along the search path with its origin; an earlier directory shadows a later file of the same name."""
    seen: set[str] = set()
    out: list[tuple[Path, str]] = []
    for d in search_dirs(kind, extra):
        if not d.path.is_dir():
            continue
        for p in sorted(d.path.glob("*.yaml")):
            if p.name not in seen:
                seen.add(p.name)
                out.append((p, d.origin))
    return out
