"""Exporters register by format name; `export()` runs one into an atomically written artifact directory."""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from ..artifact import ArtifactWriter, base_manifest, write_tokenizer_files
from ..checkpoint import Checkpoint, Source, resolve
from ..errors import QwenEdgeError

log = logging.getLogger(__name__)

RUN_ONLY_OPTIONS = ("threads",)
"""Exporter options that change how fast an export runs, not the bytes it writes (left out of the build record)."""


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


def default_name(source: "str | Source", fmt: str, quant: str) -> str:
    """`<source name>-<format>-<quant>`: a directory's name, or a hub id's repository name (without `@rev`)."""
    if isinstance(source, Source) and source.hub_id:
        source = source.hub_id
    base = Path(str(source).rstrip("/")).name or "model"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{base}-{fmt}-{quant}").strip("-.")


@dataclass
class Exported:
    """What `export_artifact` did: the artifact directory, and whether an up-to-date one was kept as is."""

    path: Path
    skipped: bool


def export(source: str | os.PathLike[str] | Source, fmt: str, quant: str, out_dir: str | os.PathLike[str], *,
           name: str | None = None, target: str | dict[str, Any] | None = None,
           options: dict[str, Any] | None = None, context_length: int | None = None, revision: str | None = None,
           force: bool = False) -> Path:
    """Export a checkpoint to `out_dir/name` (atomically). Returns the artifact directory.

    `source` is a checkpoint directory, a hub id (`Org/Name`, `Org/Name@rev`, or with `revision`) resolved through
    the Hugging Face cache, or a `Source` already resolved (`qwen_edge.checkpoint.resolve`); the manifest records
    a hub source's id, the revision asked for and the commit it resolved to.

    An artifact already at `out_dir/name`, intact and built by this toolkit version from the same source (weights,
    tokenizer, configs, hub commit) with the same settings, is kept as it is, with its parity record, and
    returned without exporting (logged on the `qwen_edge` logger, as the CLI says "up to date, export skipped");
    `force=True` rebuilds it."""
    return export_artifact(source, fmt, quant, out_dir, name=name, target=target, options=options,
                           context_length=context_length, revision=revision, force=force).path


def export_artifact(source: str | os.PathLike[str] | Source, fmt: str, quant: str, out_dir: str | os.PathLike[str],
                    *, name: str | None = None, target: str | dict[str, Any] | None = None,
                    options: dict[str, Any] | None = None, recipe: dict[str, Any] | None = None,
                    context_length: int | None = None, revision: str | None = None,
                    force: bool = False) -> Exported:
    """`export()`, telling whether it exported; `recipe` is the build record a recipe export stores in the
    manifest (default: one made from these arguments) and compares for the up-to-date check."""
    exporter = get_exporter(fmt)
    if quant not in exporter.quants:
        raise QwenEdgeError(f"format {fmt} has no quantization {quant!r} (available: {', '.join(exporter.quants)})")
    profile: Any
    if isinstance(target, str):
        from ..targets import load_target

        profile = load_target(target)
    else:
        profile = target
    src = resolve(source, revision)
    name = name or default_name(src, fmt, quant)
    if "/" in name or name in ("", ".", ".."):
        raise QwenEdgeError(f"invalid artifact name {name!r}")
    final = Path(out_dir) / name
    opts = dict(options or {})
    if recipe is None:
        recipe = {"name": None, "format": fmt, "quant": quant, "target": (profile or {}).get("name"),
                  "max_context": context_length,
                  "options": {k: v for k, v in sorted(opts.items()) if k not in RUN_ONLY_OPTIONS},
                  "source_config_sha256": source_config_sha256(src.path)}
    if not force and up_to_date(final, src, recipe):
        log.info("%s: up to date, export skipped (same source and settings; force=True rebuilds)", final)
        return Exported(final, True)
    ckpt = Checkpoint(src.path)
    ctx = int(context_length or ckpt.arch.max_position_embeddings)
    try:
        with ArtifactWriter(final) as w:
            tok = write_tokenizer_files(ckpt, w.dir)
            res = exporter(ckpt, w.dir, quant, target=profile, options=opts, tokenizer=tok)
            manifest = base_manifest(
                ckpt, name=name, fmt=fmt, quant=quant, model_file=res.model_file, source=src.hub_id or src.spec,
                context_length=min(ctx, res.context_length), target=(profile or {}).get("name"),
                recipe=recipe, tokenizer=tok, quantization=res.quantization, extra=res.extra, hub=src.record(),
            )
            return Exported(w.commit(manifest), False)
    except OSError as e:
        raise QwenEdgeError(f"{final}: write failed ({e.strerror or e})") from None
    finally:
        ckpt.close()


def source_config_sha256(path: Path) -> str:
    """sha256 over the source's config, generation config, tokenizer config and template (inputs besides the
    weights and tokenizer.json)."""
    h = hashlib.sha256()
    for name in ("config.json", "generation_config.json", "tokenizer_config.json", "chat_template.jinja"):
        p = path / name
        h.update(name.encode() + b"\0")
        if p.is_file():
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def up_to_date(final: Path, source: Path | Source, record: dict[str, Any]) -> bool:
    """True when `final` is an intact artifact (every sha256 checked) built by this toolkit version from the same
    inputs: the same build record, and the same source (for a hub source: the same id, revision asked for and
    commit; always the same tokenizer.json and weights)."""
    from .. import __version__
    from ..artifact import Artifact
    from ..checkpoint import sha256_file

    if not (final / "manifest.json").is_file():
        return False
    try:
        art = Artifact.open(final, check_hashes=True)
    except QwenEdgeError:
        return False  # corrupt or altered: rebuild
    m = art.manifest
    if (m.get("toolkit") or {}).get("version") != __version__ or m.get("recipe") != record:
        return False
    hub = source.record() if isinstance(source, Source) else {}
    if any((m.get("source") or {}).get(k) != hub.get(k) for k in ("hub_id", "revision", "commit")):
        return False
    source_dir = source.path if isinstance(source, Source) else source
    if (m.get("tokenizer") or {}).get("sha256") != sha256_file(source_dir / "tokenizer.json"):
        return False
    ckpt = Checkpoint(source_dir, validate=False)
    try:
        return (m.get("source") or {}).get("weights_sha256") == ckpt.weights_sha256
    finally:
        ckpt.close()
