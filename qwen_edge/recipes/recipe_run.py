"""The recipe pipeline: export (or reuse the cached artifact) -> verify (or reuse a recorded parity) -> summary.

The schema, its YAML type checker and validation live in recipe.py, which re-exports every name defined here."""

from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import GateFailed, QwenEdgeError
from .recipe import QuantConfig, Recipe, check_output_name, load_recipe, recipe_from_args, validate_recipe
from ..quality.reports import Log


def verify_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


def manifest_recipe(recipe: Recipe, source_dir: Path) -> dict[str, Any]:
    """The manifest's `recipe` record: the build inputs, the exporter options and the source config hash."""
    from ..export import source_config_sha256

    return {**recipe.build_inputs(), "options": recipe.quant.options(),
            "source_config_sha256": source_config_sha256(source_dir)}


def _fmt_size(n: int) -> str:
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} B"


@dataclass
class ExportOutcome:
    """What `export_recipe` did: the artifact, whether it was reused, and the verify result."""

    path: Path
    skipped: bool
    seconds: float
    """Time spent checking and exporting (verify not included)."""
    verify: str
    """`passed`, `FAILED (...)`, `skipped (...)` or `off`."""
    passed: bool = True
    report: dict[str, Any] | None = None
    failure: str = ""
    """The failing metrics with their values and bounds, when verify failed."""
    verify_seconds: float = 0.0

    def summary(self) -> str:
        from ..model.artifact import Artifact

        art = Artifact.open(self.path, check_hashes=False)
        bpw = art.bits_per_weight
        parts = [str(self.path), f"{art.format} {art.quant}", _fmt_size(art.size_bytes),
                 f"{bpw:.2f} bpw" if isinstance(bpw, (int, float)) else "? bpw",
                 f"verify {self.verify}" + (f" in {self.verify_seconds:.1f} s" if self.verify_seconds else ""),
                 "up to date, export skipped" if self.skipped else f"exported in {self.seconds:.1f} s"]
        return " | ".join(parts)


def export_recipe(recipe: Recipe, out_dir: str | os.PathLike, *, source: str | None = None, verify: bool = True,
                  force: bool = False, revision: str | None = None, log: Log = None,
                  announce: Log = None, reference_cache: bool = True) -> ExportOutcome:
    """Export (or reuse) the artifact a recipe describes, then verify it when the extra is installed.

    The source (`source`, else the recipe's) is resolved once: a hub id through the Hugging Face cache at `revision`
    (else the recipe's); the export, the up-to-date check and verify all read that snapshot directory."""
    from ..export import export_artifact
    from ..device.targets import load_target

    t0 = time.perf_counter()
    src = source or recipe.effective_source
    if not src:
        raise QwenEdgeError(f"recipe {recipe.name}: no source")
    if revision is None and not source:
        revision = recipe.effective_revision
    from ..model.checkpoint import resolve

    resolved = resolve(src, revision)
    name = recipe.output or recipe.name
    if not name:
        from ..export import default_name

        name = default_name(resolved, recipe.format, recipe.quant.type)
    check_output_name(name, f"recipe {recipe.name or '(flags)'}")
    target = load_target(recipe.target)
    context = recipe.max_context
    options = recipe.quant.options()
    final = Path(out_dir) / name
    source_dir = resolved.path
    _check_model(recipe, source_dir)
    record = manifest_recipe(recipe, source_dir)
    if announce:  # once the inputs are known to be good: bad input stays a single `error:` line
        from ..model.checkpoint import Checkpoint

        ckpt = Checkpoint(source_dir)  # validates config and safetensors headers (no weights read)
        try:
            if recipe.adapter:  # and the adapters against it: a bad one is the only line printed
                from ..model.adapters import read_adapters

                for ad in read_adapters(recipe.adapter, ckpt.arch, resolved.hub_id):
                    ad.close()
        finally:
            ckpt.close()
        checking = verify and recipe.verify.enabled and verify_available()
        announce(f"export {src} -> {final} ({recipe.format} {recipe.quant.type}, target {target.name})"
                 + ("; then verify it against the PyTorch reference"
                    + (" (quick text)" if recipe.verify.quick else " (minutes on 0.5B and up)")
                    + "; --no-verify skips that" if checking else ""))
    skipped = export_artifact(resolved, recipe.format, recipe.quant.type, out_dir, name=name, target=target.name,
                              options=options, recipe=record, context_length=context, force=force,
                              adapters=recipe.adapter, adapter_mode=recipe.adapter_mode).skipped
    seconds = time.perf_counter() - t0
    outcome = ExportOutcome(final, skipped, seconds, "off")
    if not (verify and recipe.verify.enabled):
        outcome.verify = "off (--no-verify)" if not verify else "off (recipe)"
        return outcome
    return verify_outcome(outcome, recipe, str(source_dir), log=log, reference_cache=reference_cache)


def verify_outcome(outcome: ExportOutcome, recipe: Recipe, src: str, log: Log = None,
                   reference_cache: bool = True) -> ExportOutcome:
    """Verify an exported artifact against `src` with the recipe's settings; a recorded pass of an unchanged
    artifact under the same gate is reused. Fills `outcome.verify`, `passed`, `report`, `failure`."""
    final = outcome.path
    skipped = outcome.skipped
    if not verify_available():
        outcome.verify = "skipped (install qwen-edge[verify] for torch + transformers)"
        return outcome
    from ..quality.verify import describe_failures, thresholds_for, verify as run_verify

    if skipped:
        recorded = _recorded_parity(final, recipe, thresholds_for)
        if recorded:
            outcome.verify = recorded
            return outcome
    t1 = time.perf_counter()
    report = run_verify(final, reference=src, thresholds=recipe.verify.thresholds or None, quick=recipe.verify.quick,
                        log=log, reference_cache=reference_cache)
    outcome.verify_seconds = time.perf_counter() - t1
    outcome.report = report
    outcome.passed = bool(report.get("passed"))
    if not outcome.passed:
        outcome.failure = describe_failures(report)
    outcome.verify = "passed" if outcome.passed else f"FAILED ({', '.join(report.get('failed') or ['gate'])})"
    m = report.get("metrics") or {}
    shown = ", ".join(f"{k} {m[k]:.3g}" for k in ("kl_mean", "top1_agreement") if isinstance(m.get(k), (int, float)))
    if outcome.passed and shown:
        outcome.verify += f" ({shown})"
    if (report.get("reference_cache") or {}).get("used"):
        outcome.verify += " [cached reference]"
    if report.get("ungated"):
        outcome.verify += " [random weights: top-1 and greedy agreement not gated]"
    return outcome


def _recorded_parity(final: Path, recipe: Recipe, thresholds_for: Any) -> str | None:
    """A passed parity report already in an up-to-date artifact, made with the same gate and text, is reused."""
    from ..model.artifact import Artifact

    art = Artifact.open(final, check_hashes=False)
    p = art.manifest.get("parity")
    if not isinstance(p, dict) or not p.get("passed") or not p.get("reference_matches_source"):
        return None
    if p.get("quick") and not recipe.verify.quick:
        return None
    try:
        want = thresholds_for(art.quant, art.bits_per_weight, recipe.verify.thresholds or None)
    except QwenEdgeError:
        return None
    from ..quality.verify import RANDOM_WEIGHT_THRESHOLDS

    ungated = [k for k in p.get("ungated") or [] if k in RANDOM_WEIGHT_THRESHOLDS and k not in recipe.verify.thresholds]
    want.update({k: RANDOM_WEIGHT_THRESHOLDS[k] for k in ungated})
    if p.get("thresholds") != want:
        return None
    cached = " against a cached reference" if (p.get("reference_cache") or {}).get("used") else ""
    return f"passed (recorded {p.get('verified_at', 'earlier')}{cached})"


SHAPE_FIELDS = ("family", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                "intermediate_size", "vocab_size", "tie_word_embeddings")


def _check_model(recipe: Recipe, source_dir: Path) -> None:
    """Refuse a source whose shapes differ from the recipe's `model` (the wrong checkpoint for this recipe)."""
    if not recipe.model:
        return
    from ..model.checkpoint import Checkpoint
    from ..families import MODELS

    want = MODELS[recipe.model.lower()].arch.to_dict()
    ckpt = Checkpoint(source_dir, validate=False)
    try:
        got = ckpt.arch.to_dict()
    finally:
        ckpt.close()
    diff = [f"{k} {got[k]} != {want[k]}" for k in SHAPE_FIELDS if got[k] != want[k]]
    if diff:
        raise QwenEdgeError(f"{source_dir}: not a {recipe.model} checkpoint ({', '.join(diff[:3])}); "
                            "pass the matching checkpoint or override model=NAME")


def run_export(source: str | None, fmt: str | None, quant: str | None, target: str | None, out_dir: str,
               recipe_path: str | None = None, overrides: dict[str, str] | None = None, name: str | None = None,
               verify: bool = True, force: bool = False, max_context: int | None = None, revision: str | None = None,
               recipe_dirs: Sequence[str] = (), adapters: Sequence[str] = (), adapter_mode: str | None = None,
               reference_cache: bool = True) -> int:
    """`qwen-edge export`: a recipe (plus flags/overrides) or plain flags; prints one summary line to stderr."""
    overrides = dict(overrides or {})
    if recipe_path:
        recipe = load_recipe(recipe_path, overrides, recipe_dirs)
        if fmt and fmt != recipe.format:
            recipe.format, recipe.quant = fmt, QuantConfig(type=quant or "")
        elif quant:
            recipe.quant.type = quant
        if target:
            recipe.target = target
        if source:
            recipe.source_path = source
    else:
        recipe = recipe_from_args(source, fmt, quant, target, overrides)
    if max_context is not None:
        recipe.max_context = max_context
    if adapters:  # --adapter replaces the recipe's list
        recipe.adapter = list(adapters)
    if adapter_mode:
        recipe.adapter_mode = adapter_mode
    if name:
        check_output_name(name, "--name")
        recipe.output = name
    validate_recipe(recipe, str(recipe_path or "command line"))
    from ..log import logger, say

    outcome = export_recipe(recipe, out_dir, verify=verify, force=force, revision=revision,
                            log=lambda msg: logger.debug(f"verify: {msg}"), announce=say,
                            reference_cache=reference_cache)
    say(outcome.summary())
    if not outcome.passed:
        raise GateFailed(f"verify: {outcome.failure}")
    return 0
