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
from .recipe import (QuantConfig, Recipe, check_output_name, known_quants, load_recipe, recipe_from_args,
                     validate_recipe)
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
                  announce: Log = None, reference_cache: bool | str = True) -> ExportOutcome:
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
                   reference_cache: bool | str = True) -> ExportOutcome:
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


def _recipe_for(source: str | None, fmt: str | None, quant: str | None, target: str | None,
                recipe_path: str | None, overrides: dict[str, str], name: str | None, max_context: int | None,
                recipe_dirs: Sequence[str], adapters: Sequence[str], adapter_mode: str | None) -> Recipe:
    """The recipe `export` runs: a recipe file (plus flags/overrides) or plain flags, validated."""
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
    return recipe


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


def run_export(source: str | None, fmt: str | None, quant: str | None, target: str | None, out_dir: str,
               recipe_path: str | None = None, overrides: dict[str, str] | None = None, name: str | None = None,
               verify: bool = True, force: bool = False, max_context: int | None = None, revision: str | None = None,
               recipe_dirs: Sequence[str] = (), adapters: Sequence[str] = (), adapter_mode: str | None = None,
               reference_cache: bool = True) -> int:
    """`qwen-edge export`: a recipe (plus flags/overrides) or plain flags; prints one summary line to stderr.
    Comma lists in --format/--quant make a matrix (run_export_matrix)."""
    overrides = dict(overrides or {})
    fmts, quants = _split(fmt), _split(quant)
    args = (target, recipe_path, overrides, name, max_context, recipe_dirs, adapters, adapter_mode)
    if len(fmts) > 1 or len(quants) > 1:
        return run_export_matrix(source, fmts, quants, out_dir, args, verify=verify, force=force,
                                 revision=revision, reference_cache=reference_cache)
    recipe = _recipe_for(source, fmt, quant, *args)
    from ..log import logger, say

    outcome = export_recipe(recipe, out_dir, verify=verify, force=force, revision=revision,
                            log=lambda msg: logger.debug(f"verify: {msg}"), announce=say,
                            reference_cache=reference_cache)
    say(outcome.summary())
    if not outcome.passed:
        raise GateFailed(f"verify: {outcome.failure}")
    return 0


def matrix_recipes(source: str | None, fmts: list[str], quants: list[str], args: tuple) -> list[Recipe]:
    """One recipe per (format, quantization) pair the exporters know, in the order given; every pair validated
    before anything is exported. A quantization no listed format knows is bad input."""
    if args[3]:
        raise QwenEdgeError("--name names one artifact: a matrix (several --format or --quant values) names each "
                            "artifact after its source, format and quantization")
    base = _recipe_for(source, fmts[0] if fmts else None, quants[0] if quants else None, *args)
    fmts = fmts or [base.format]
    quants = quants or [base.quant.type]
    unknown = [q for q in quants if not any(q in known_quants(f) for f in fmts)]
    if unknown:
        raise QwenEdgeError(f"--quant {', '.join(unknown)}: not a quantization of {' or '.join(fmts)}")
    return [_recipe_for(source, f, q, *args) for f in fmts for q in quants if q in known_quants(f)]


def run_export_matrix(source: str | None, fmts: list[str], quants: list[str], out_dir: str, args: tuple, *,
                      verify: bool, force: bool, revision: str | None, reference_cache: bool) -> int:
    """`export SRC --format gguf,onnx --quant q4_k_m,q8_0,int4`: every pair the exporters know, each verified
    against one reference (the reference cache: computed by the first verify, read by the rest; with
    --no-reference-cache a temporary cache that lives as long as the matrix); one summary table on stdout, and
    exit 1 naming the artifacts whose gate failed."""
    import tempfile

    from ..log import logger, say

    recipes = matrix_recipes(source, fmts, quants, args)
    outcomes: list[ExportOutcome] = []
    with tempfile.TemporaryDirectory(prefix="qwen_edge_reference_") as tmp:
        cache: bool | str = reference_cache or tmp
        for i, recipe in enumerate(recipes):
            say(f"[{i + 1}/{len(recipes)}] {recipe.format} {recipe.quant.type}")
            outcomes.append(export_recipe(recipe, out_dir, verify=verify, force=force, revision=revision,
                                          log=lambda msg: logger.debug(f"verify: {msg}"), announce=say,
                                          reference_cache=cache))
    print(render_matrix(outcomes))
    failed = [o for o in outcomes if not o.passed]
    if failed:
        raise GateFailed(f"verify failed for {len(failed)} of {len(outcomes)}: " + "; ".join(o.failure for o in failed))
    return 0


def render_matrix(outcomes: Sequence[ExportOutcome]) -> str:
    """The matrix's summary: one row per artifact (format, quantization, size, verdict, KL, top-1, times)."""
    from ..model.artifact import Artifact

    head = ("artifact", "format", "quant", "size", "verify", "kl_mean", "top1", "reference", "verify s", "export")
    rows = [head]
    for o in outcomes:
        art = Artifact.open(o.path, check_hashes=False)
        m = (o.report or {}).get("metrics") or {}
        rc = (o.report or {}).get("reference_cache") or {}
        verdict = o.verify.split(" (")[0].split(" [")[0] if o.passed else "FAILED"
        rows.append((o.path.name, art.format, art.quant, _fmt_size(art.size_bytes), verdict,
                     f"{m['kl_mean']:.3g}" if "kl_mean" in m else "-",
                     f"{m['top1_agreement']:.3f}" if "top1_agreement" in m else "-",
                     {"hit": "cached", "computed": "computed", "off": "computed"}.get(rc.get("state"), "-"),
                     f"{o.verify_seconds:.1f}" if o.verify_seconds else "-",
                     "up to date" if o.skipped else f"{o.seconds:.1f} s"))
    widths = [max(len(str(r[c])) for r in rows) for c in range(len(head))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    n_failed = sum(not o.passed for o in outcomes)
    lines.append(f"{len(outcomes)} artifacts, " + (f"{n_failed} FAILED" if n_failed else "all passed"))
    return "\n".join(lines)
