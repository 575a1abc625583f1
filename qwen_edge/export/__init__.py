"""Exporters register by format name; `export()` runs one into an atomically written artifact directory."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..model.artifact import ArtifactWriter, base_manifest, write_tokenizer_files
from ..model.checkpoint import Checkpoint, Source, resolve
from ..errors import QwenEdgeError
from .registry import ExportResult, Exporter, get_exporter, register_exporter  # noqa: F401  (the exporters' API)

log = logging.getLogger(__name__)

RUN_ONLY_OPTIONS = ("threads",)
SEPARATE_FORMATS = ("gguf", "onnx")
"""Formats that can ship an adapter beside unmodified base weights (`adapter_mode="separate"`)."""
"""Exporter options that change how fast an export runs, not the bytes it writes (left out of the build record)."""


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
           force: bool = False, adapters: Sequence[str | os.PathLike[str]] = (), adapter_mode: str = "merge") -> Path:
    """Export a checkpoint to `out_dir/name` (atomically). Returns the artifact directory.

    `source` is a checkpoint directory, a hub id (`Org/Name`, `Org/Name@rev`, or with `revision`) resolved through
    the Hugging Face cache, or a `Source` already resolved (`qwen_edge.model.checkpoint.resolve`); the manifest records
    a hub source's id, the revision asked for and the commit it resolved to.

    An artifact already at `out_dir/name`, intact and built by this toolkit version from the same source (weights,
    tokenizer, configs, hub commit) with the same settings, is kept as it is, with its parity record, and
    returned without exporting (logged on the `qwen_edge` logger, as the CLI says "up to date, export skipped");
    `force=True` rebuilds it.

    `adapters` are PEFT LoRA adapters (directories or hub ids), applied in order: `adapter_mode="merge"` folds
    `W + scale * B @ A` into the weights in float32 before quantization (GGUF and ONNX); `"separate"` writes the
    base weights unmodified plus each adapter beside them: for GGUF a llama.cpp LoRA GGUF, for ONNX an onnxruntime
    `.onnx_adapter` file fed to LoRA inputs the graph then carries (onnxruntime-genai's multi-LoRA layout). The
    manifest records each adapter."""
    return export_artifact(source, fmt, quant, out_dir, name=name, target=target, options=options,
                           context_length=context_length, revision=revision, force=force, adapters=adapters,
                           adapter_mode=adapter_mode).path


def export_artifact(source: str | os.PathLike[str] | Source, fmt: str, quant: str, out_dir: str | os.PathLike[str],
                    *, name: str | None = None, target: str | dict[str, Any] | None = None,
                    options: dict[str, Any] | None = None, recipe: dict[str, Any] | None = None,
                    context_length: int | None = None, revision: str | None = None,
                    force: bool = False, adapters: Sequence[str | os.PathLike[str]] = (),
                    adapter_mode: str = "merge") -> Exported:
    """`export()`, telling whether it exported; `recipe` is the build record a recipe export stores in the
    manifest (default: one made from these arguments) and compares for the up-to-date check."""
    from ..model.adapters import MODES

    exporter = get_exporter(fmt)
    if adapter_mode not in MODES:
        raise QwenEdgeError(f"adapter mode {adapter_mode!r}: expected {' or '.join(MODES)}")
    if adapter_mode == "separate" and fmt not in SEPARATE_FORMATS:
        raise QwenEdgeError(f"--adapter-mode separate: {fmt} exports merge adapters into the weights "
                            f"(--adapter-mode merge); separate adapters: {', '.join(SEPARATE_FORMATS)}")
    if quant not in exporter.quants:
        raise QwenEdgeError(f"format {fmt} has no quantization {quant!r} (available: {', '.join(exporter.quants)})")
    profile: Any
    if isinstance(target, str):
        from ..device.targets import load_target

        profile = load_target(target)
    else:
        profile = target
    src = resolve(source, revision)
    name = name or default_name(src, fmt, quant)
    if "/" in name or name in ("", ".", ".."):
        raise QwenEdgeError(f"invalid artifact name {name!r}")
    opts = dict(options or {})
    if recipe is None:
        recipe = {"name": None, "format": fmt, "quant": quant, "target": (profile or {}).get("name"),
                  "max_context": context_length,
                  "options": {k: v for k, v in sorted(opts.items()) if k not in RUN_ONLY_OPTIONS},
                  "source_config_sha256": source_config_sha256(src.path)}
        if adapters:
            recipe.update(adapter=[os.fspath(a) for a in adapters], adapter_mode=adapter_mode)
    recipe = {**recipe, **_input_file_shas(opts)}
    loaded = _adapters(adapters)
    if loaded:  # the adapters' bytes are build inputs too: a changed adapter at the same path rebuilds
        recipe = {**recipe, "adapter_sha256": [ad.sha256 for ad in loaded]}
    try:
        return _export_into(exporter, src, fmt, quant, Path(out_dir), name, profile, opts, recipe, context_length,
                            force, loaded, adapter_mode)
    finally:
        for ad in loaded:
            ad.close()


def _input_file_shas(opts: dict[str, Any]) -> dict[str, str]:
    """sha256 of the files options name (an imatrix, a calibration text): a changed file at the same path rebuilds."""
    from ..model.checkpoint import sha256_file

    out = {}
    for key in ("imatrix", "calibration_text"):
        value = opts.get(key)
        if isinstance(value, str) and value != "auto" and Path(value).is_file():
            out[f"{key}_sha256"] = sha256_file(Path(value))
    return out


def _adapters(specs: Sequence[str | os.PathLike[str]]) -> list[Any]:
    if not specs:
        return []
    from ..model.adapters import read_adapters

    return read_adapters(specs)


def _export_into(exporter: Exporter, src: Source, fmt: str, quant: str, out_dir: Path, name: str, profile: Any,
                 opts: dict[str, Any], recipe: dict[str, Any], context_length: int | None, force: bool,
                 adapters: list[Any], adapter_mode: str) -> Exported:
    final = out_dir / name
    if not force and up_to_date(final, src, recipe):
        log.info("%s: up to date, export skipped (same source and settings; --force, or force=True, rebuilds it)", final)
        return Exported(final, True)
    ckpt = Checkpoint(src.path)
    if adapters:
        try:
            for ad in adapters:
                ad.bind(ckpt.arch, src.hub_id)
        finally:
            ckpt.close()
        # the one hook: with merge, every exporter reads the merged projections through the checkpoint
        if adapter_mode == "merge":
            from ..model.adapters import MergedCheckpoint

            ckpt = MergedCheckpoint(src.path, adapters)
        else:
            ckpt = Checkpoint(src.path)
    ctx = int(context_length or ckpt.arch.max_position_embeddings)
    try:
        with ArtifactWriter(final) as w:
            tok = write_tokenizer_files(ckpt, w.dir)
            runtime_adapters = {"adapters": adapters} if adapters and adapter_mode == "separate" and fmt == "onnx" \
                else {}  # the ONNX graph itself changes: LoRA inputs, and the exporter writes .onnx_adapter files
            res = exporter(ckpt, w.dir, quant, target=profile, options=opts, tokenizer=tok, **runtime_adapters)
            if adapters and not runtime_adapters:
                res.extra = {**res.extra, "adapters": _adapter_records(adapters, adapter_mode, ckpt, w.dir)}
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


def _adapter_records(adapters: list[Any], mode: str, ckpt: Checkpoint, out: Path) -> list[dict[str, Any]]:
    """The manifest's `adapters`; in separate mode each is written first as a llama.cpp LoRA GGUF into `out`."""
    if mode == "merge":
        return [ad.record(mode) for ad in adapters]
    from ..formats.gguf import ADAPTER_FILE
    from .gguf import write_adapter_gguf

    records = []
    for i, ad in enumerate(adapters):
        file = ADAPTER_FILE if len(adapters) == 1 else ADAPTER_FILE.replace(".gguf", f"-{i + 1}.gguf")
        baked = write_adapter_gguf(ad, ckpt.arch, out / file)
        records.append({**ad.record(mode, file), "scale_in_lora_b": baked})
    return records


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
    from ..model.artifact import Artifact
    from ..model.checkpoint import sha256_file

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
