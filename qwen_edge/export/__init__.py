"""Exporters register by format name; `export()` runs one into an atomically written artifact directory."""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from ..artifact import ArtifactWriter, base_manifest, write_tokenizer_files
from ..checkpoint import Checkpoint, Source, resolve
from ..errors import QwenEdgeError


@dataclass
class ExportResult:
    """What a format's exporter reports back about the files it wrote into the artifact directory."""

    model_file: str
    quantization: dict[str, Any]
    """`requested`, `tensor_types` {name: type}, `type_counts` {type: n}, `bits_per_weight` (file bits / params)."""
    context_length: int
    extra: dict[str, Any] = field(default_factory=dict)


class Exporter(Protocol):
    quants: tuple[str, ...]

    def __call__(self, ckpt: Checkpoint, out: Path, quant: str, *, target: dict | None,
                 options: dict[str, Any], tokenizer: dict[str, Any]) -> ExportResult: ...


_EXPORTERS: dict[str, Exporter] = {}
_MODULES = {"gguf": "qwen_edge.export.gguf", "onnx": "qwen_edge.export.onnx"}


def register_exporter(fmt: str, quants: tuple[str, ...]) -> Callable[[Callable], Callable]:
    def deco(fn):
        fn.quants = quants
        _EXPORTERS[fmt] = fn
        return fn
    return deco


def get_exporter(fmt: str) -> Exporter:
    if fmt not in _MODULES:
        raise QwenEdgeError(f"unknown format {fmt!r} (available: {', '.join(_MODULES)})")
    importlib.import_module(_MODULES[fmt])
    return _EXPORTERS[fmt]


def formats() -> dict[str, tuple[str, ...]]:
    return {fmt: get_exporter(fmt).quants for fmt in _MODULES}


def default_name(source: "str | Source", fmt: str, quant: str) -> str:
    """`<source name>-<format>-<quant>`: a directory's name, or a hub id's repository name (without `@rev`)."""
    if isinstance(source, Source) and source.hub_id:
        source = source.hub_id
    base = Path(str(source).rstrip("/")).name or "model"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{base}-{fmt}-{quant}").strip("-.")


def export(source: str | os.PathLike | Source, fmt: str, quant: str, out_dir: str | os.PathLike, *,
           name: str | None = None, target: str | dict | None = None, options: dict[str, Any] | None = None,
           recipe: dict[str, Any] | None = None, context_length: int | None = None,
           revision: str | None = None) -> Path:
    """Export a checkpoint to `out_dir/name` (atomically). Returns the artifact directory.

    `source` is a checkpoint directory, a hub id (`Org/Name`, `Org/Name@rev`, or with `revision`) resolved through
    the Hugging Face cache, or a `Source` already resolved (`qwen_edge.checkpoint.resolve`); the manifest records
    a hub source's id, the revision asked for and the commit it resolved to."""
    exporter = get_exporter(fmt)
    if quant not in exporter.quants:
        raise QwenEdgeError(f"format {fmt} has no quantization {quant!r} (available: {', '.join(exporter.quants)})")
    profile: dict | None
    if isinstance(target, str):
        from ..targets import load_target

        profile = load_target(target)
    else:
        profile = target
    src = resolve(source, revision)
    ckpt = Checkpoint(src.path)
    name = name or default_name(src, fmt, quant)
    if "/" in name or name in ("", ".", ".."):
        raise QwenEdgeError(f"invalid artifact name {name!r}")
    final = Path(out_dir) / name
    ctx = int(context_length or ckpt.arch.max_position_embeddings)
    try:
        with ArtifactWriter(final) as w:
            tok = write_tokenizer_files(ckpt, w.dir)
            res = exporter(ckpt, w.dir, quant, target=profile, options=dict(options or {}), tokenizer=tok)
            manifest = base_manifest(
                ckpt, name=name, fmt=fmt, quant=quant, model_file=res.model_file, source=src.hub_id or src.spec,
                context_length=min(ctx, res.context_length), target=(profile or {}).get("name"),
                recipe=recipe, tokenizer=tok, quantization=res.quantization, extra=res.extra, hub=src.record(),
            )
            return w.commit(manifest)
    except OSError as e:
        raise QwenEdgeError(f"{final}: write failed ({e.strerror or e})") from None
    finally:
        ckpt.close()
