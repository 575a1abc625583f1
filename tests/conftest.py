"""Shared fixtures: synthesized tiny checkpoints and exported artifacts, built once per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hostile import pytest_terminal_summary  # noqa: F401  (hostile-input count, tests/hostile.py)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def reference_cache_dir(tmp_path_factory):
    """verify's reference cache (quality/refcache.py) in a session directory, shared by the verifies of one source
    (and by the CLI subprocesses, through the environment), never the user's cache: an entry of the full text is
    1.4 GB, a quick one 362 MB, and the broken-checkpoint tests make one per source: the session's directory is
    removed at its end (pytest keeps the last sessions' temporary directories). $QWEN_EDGE_REFERENCE_CACHE set by the
    caller (a CI cache path) is used and kept."""
    import shutil

    from qwen_edge.quality.refcache import ENV

    if os.environ.get(ENV):
        yield Path(os.environ[ENV])
        return
    path = tmp_path_factory.mktemp("reference_cache")
    os.environ[ENV] = str(path)
    try:
        yield path
    finally:
        os.environ.pop(ENV, None)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("qwen_edge")


@pytest.fixture(scope="session")
def synth_ckpt(workdir):
    """synth_ckpt("tiny-qwen3", seed=0) -> Path of a checkpoint directory, cached per session."""
    from qwen_edge.model.synth import synth

    cache: dict[tuple[str, int], Path] = {}

    def make(arch: str, seed: int = 0) -> Path:
        key = (arch, seed)
        if key not in cache:
            cache[key] = synth(arch, workdir / "ckpt" / f"{arch}-s{seed}", seed=seed)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def exported(workdir, synth_ckpt):
    """exported("tiny-qwen3", "gguf", "f16", **options) -> Path of an artifact directory, cached per session."""
    from qwen_edge.export import export

    cache: dict[tuple, Path] = {}

    def make(arch: str, fmt: str, quant: str, seed: int = 0, **options) -> Path:
        key = (arch, fmt, quant, seed, tuple(sorted(options.items())))
        if key not in cache:
            name = f"{arch}-s{seed}-{fmt}-{quant}" + ("-" + "-".join(f"{k}{v}" for k, v in sorted(options.items()))
                                                      if options else "")
            cache[key] = export(synth_ckpt(arch, seed), fmt, quant, workdir / "artifacts", name=name,
                                options=options)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def thinking_artifact(workdir, synth_ckpt):
    """thinking_artifact("gguf" | "onnx") -> a tiny Qwen3 artifact (f16 / fp32) whose template opens the think block
    when thinking is on (tests/thinking_ckpt.py), cached per session."""
    from qwen_edge.export import export
    from thinking_ckpt import thinking_opening_checkpoint

    ckpt = thinking_opening_checkpoint(synth_ckpt("tiny-qwen3"), workdir / "ckpt" / "tiny-qwen3-opens-think")
    cache: dict[str, Path] = {}

    def make(fmt: str) -> Path:
        if fmt not in cache:
            quant = {"gguf": "f16", "onnx": "fp32"}[fmt]
            cache[fmt] = export(ckpt, fmt, quant, workdir / "artifacts", name=f"tiny-qwen3-think-{fmt}")
        return cache[fmt]

    return make


def run_cli(*args: str, input: str | None = None, timeout: float = 600, env: dict | None = None):
    """Run the real console entry point in a subprocess; returns CompletedProcess (text)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "qwen_edge.cli", *args], capture_output=True, text=True,
                          input=input, timeout=timeout, env=full_env)


@pytest.fixture(scope="session")
def cli():
    return run_cli


def has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


requires_torch = pytest.mark.skipif(not (has_module("torch") and has_module("transformers")),
                                    reason="needs the [verify] extra (torch, transformers)")
