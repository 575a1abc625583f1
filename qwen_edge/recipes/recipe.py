"""Export recipes: typed dataclasses loaded from YAML, dotted overrides, validation, listing.

The export -> cache -> verify pipeline lives in recipe_run.py; its names are re-exported here (lazily: recipe_run
imports this module)."""

from __future__ import annotations

import os
import types
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Sequence, Union, get_args, get_origin, get_type_hints

import yaml

from ..device.datafiles import PACKAGED, find, list_files, packaged_dir
from ..errors import QwenEdgeError
from ..device.targets import default_target_name

RECIPES_DIR = packaged_dir("recipes")
"""The recipes shipped inside the package (in a checkout: a link to export_recipes/)."""
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
ONNX_ONLY = ("block_size", "symmetric", "accuracy_level", "lm_head_bits", "lm_head_block_size",
             "quantize_embeddings", "kv_dtype")
GGUF_ONLY = ("intermediate",)


@dataclass
class QuantConfig:
    """How weights are quantized; fields left unset (null) take the exporter's and target's defaults."""

    type: str = ""
    """Quantization name: GGUF `f32 f16 bf16 q8_0 q4_0 q4_k_m q5_k_m q6_k iq4_nl ...`; ONNX `fp32 fp16 int8 int4`."""
    block_size: int | None = None
    """ONNX int4/int8: weights per quantization block (16, 32, 64, 128 or 256; exporter default 32)."""
    symmetric: bool | None = None
    """ONNX int4/int8: symmetric blocks (no zero point) when true, asymmetric with zero points when false."""
    accuracy_level: int | None = None
    """ONNX MatMulNBits compute type: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 (default: the target profile's)."""
    lm_head_bits: int | None = None
    """ONNX int4/int8: bits of the LM head (4, 8 or 16; exporter default 8, which protects quality)."""
    lm_head_block_size: int | None = None
    """ONNX: block size of an 8-bit LM head (exporter default 128: a quarter of the scale bytes, same accuracy)."""
    quantize_embeddings: bool | None = None
    """ONNX int4/int8: quantize the token embedding table too (smaller file, gathers dequantize per row)."""
    kv_dtype: str | None = None
    """ONNX: KV cache dtype, `float16` or `float32` (exporter default: float16 for fp16 exports and memory-capped
    targets such as arm64-mobile, else float32). float16 halves the cache; the attention then runs in float16."""
    intermediate: str | None = None
    """GGUF k-/i-quants: float type written before llama.cpp quantizes (`bf16`, `f16`, `f32`; default: the source's)."""
    imatrix: str | None = None
    """GGUF 4-bit and below, ONNX int4/int8 (symmetric): importance matrix the quantizer weighs each weight's error
    by: `auto` (computed over the calibration text, cached) or a llama.cpp imatrix file (GGUF or legacy .dat).
    Required by iq3_xxs and iq2_xs."""
    awq: bool | None = None
    """GGUF 4-bit and below, ONNX int4/int8 (symmetric): activation-aware per-channel scales (AWQ-style) searched
    on the calibration text and folded into the preceding norm or projection before quantization (export/awq.py);
    combines with `imatrix`."""
    gptq: bool | None = None
    """GGUF (its Q4_0, Q4_K, Q6_K and IQ4_XS block linears), ONNX int4/int8 (symmetric): GPTQ error compensation over
    the calibration inputs' Hessian (export/gptq.py): same types and layout, codes chosen to keep each linear's output;
    combines with `imatrix` and `awq`."""
    calibration_text: str | None = None
    """With `imatrix: auto`, `awq: true` or `gptq: true`: the text the matrix is computed over (a .txt, or a .json of documents and chats like
    qwen_edge/data/calib_text.json; default: that shipped text)."""

    def options(self) -> dict[str, Any]:
        """The exporter options this config sets (everything but `type`, unset fields left out)."""
        return {k: v for k, v in asdict(self).items() if k != "type" and v is not None}


@dataclass
class VerifyConfig:
    """The parity check run after export (needs the verify extra: torch + transformers)."""

    enabled: bool = True
    """Run verify after export when torch and transformers are importable (`--no-verify` turns it off)."""
    quick: bool = False
    """Use the short evaluation text (seconds instead of minutes on 1B+ models)."""
    thresholds: dict[str, float] = field(default_factory=dict)
    """Overrides of the per-quantization gate thresholds, e.g. `{kl_mean: 0.05, top1_agreement: 0.9}`."""


@dataclass
class Recipe:
    """One (model, format, quantization, target) export, as a CI build step runs it."""

    name: str = ""
    """Recipe name; by convention the file's stem, e.g. `qwen2.5-0.5b-instruct.gguf-q4_k_m.cpu`."""
    description: str = ""
    """One line for humans."""
    source: str = ""
    """Hugging Face hub id (e.g. `Qwen/Qwen2.5-0.5B-Instruct`) or a local checkpoint directory."""
    source_path: str | None = None
    """A local checkpoint directory that replaces `source` (relative paths are relative to the current directory)."""
    revision: str | None = None
    """Hub revision of `source`: a branch, tag or commit (default: the repository's default branch); `source:
    Org/Name@rev` says the same. The manifest records the commit it resolved to. Not used with `source_path`."""
    model: str = ""
    """Registry architecture (qwen_edge.families.MODELS, e.g. `qwen2.5-0.5b`); the source is checked against it."""
    format: str = ""
    """`gguf` or `onnx`."""
    quant: QuantConfig = field(default_factory=QuantConfig)
    """Quantization type and its options."""
    target: str = field(default_factory=default_target_name)
    """Target profile in runtimes/ (`cpu-x86_64`, `arm64-mobile`, `cuda`) the artifact is built for (default: this
    machine's, `arm64-mobile` on a 64-bit Arm CPU, else `cpu-x86_64`)."""
    max_context: int | None = None
    """Context length recorded in the artifact (default: the model's trained maximum); runtimes still allocate
    only the target profile's `max_context` tokens of KV cache unless asked for more."""
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    """Parity check after export."""
    output: str = ""
    """Artifact directory name under the output directory (default: the recipe name)."""
    adapter: list[str] = field(default_factory=list)
    """PEFT LoRA adapters (directories or hub ids), applied in order; one string is a list of one. Relative paths
    are relative to the current directory. The manifest records each (source, sha256, rank, alpha, targets)."""
    adapter_mode: str = "merge"
    """`merge`: folded into the weights in float32 before quantization (GGUF and ONNX); `separate`: the base
    exported unmodified, each adapter beside it (GGUF: a llama.cpp LoRA GGUF; ONNX: an onnxruntime `.onnx_adapter`
    fed to the LoRA inputs the graph then carries)."""

    @property
    def effective_source(self) -> str:
        return self.source_path or self.source

    @property
    def effective_revision(self) -> str | None:
        """The revision that goes with `effective_source` (a `source_path` replaces the hub id and its revision)."""
        return None if self.source_path else self.revision

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def build_inputs(self) -> dict[str, Any]:
        """What determines the artifact's bytes (verify settings excluded): recorded as the manifest's recipe."""
        out: dict[str, Any] = {"name": self.name or None, "model": self.model or None, "format": self.format,
                               "quant": asdict(self.quant), "target": self.target, "max_context": self.max_context}
        if self.adapter:  # only then: a plain recipe's record (and its cached artifacts) stay as they were
            out.update(adapter=list(self.adapter), adapter_mode=self.adapter_mode)
        return out


# --- loading --------------------------------------------------------------------------------------------------
def _type_ok(value: Any, tp: Any) -> bool:
    """Whether a YAML value fits a field annotation (int, float, bool, str, dict[str, float], X | None)."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in get_args(tp))
    if tp is type(None):
        return value is None
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    if origin is list:
        return isinstance(value, list) and all(_type_ok(v, get_args(tp)[0]) for v in value)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    return False


def _type_name(tp: Any) -> str:
    return " or ".join(getattr(a, "__name__", str(a)).replace("NoneType", "null") for a in (get_args(tp) or (tp,))) \
        if get_origin(tp) in (Union, types.UnionType) else str(tp) if get_origin(tp) else tp.__name__


def _build(cls: type, data: Any, src: str, prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise QwenEdgeError(f"{src}: {prefix.rstrip('.') or 'recipe'} must be a mapping")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            raise QwenEdgeError(f"{src}: unknown key '{prefix}{key}' (known: {', '.join(sorted(known))})")
        tp = hints[key]
        if is_dataclass(tp):
            if isinstance(value, str) and key == "quant":
                value = {"type": value}  # `quant: q4_k_m` shorthand
            kwargs[key] = _build(tp, value if value is not None else {}, src, f"{prefix}{key}.")
            continue
        if get_origin(tp) is list and isinstance(value, str):
            value = [value]  # `adapter: DIR` shorthand for a list of one
        if not _type_ok(value, tp):
            raise QwenEdgeError(f"{src}: '{prefix}{key}' must be {_type_name(tp)}, "
                                f"not {type(value).__name__} {value!r:.40}")
        kwargs[key] = value
    return cls(**kwargs)


def _apply_override(data: dict[str, Any], key: str, raw: str, src: str) -> None:
    """Set `a.b.c=value` in the raw recipe mapping, checking every part against the dataclasses."""
    parts = key.split(".")
    if parts == ["quant"]:  # `quant=q8_0` is shorthand for `quant.type=q8_0`
        parts = ["quant", "type"]
    cls: Any = Recipe
    node = data
    for i, part in enumerate(parts):
        known = {f.name for f in fields(cls)}
        if part not in known:
            raise QwenEdgeError(f"override {key!r}: unknown key {'.'.join(parts[:i + 1])!r} for {src} "
                                f"(known: {', '.join(sorted(known))})")
        tp = get_type_hints(cls)[part]
        last = i == len(parts) - 1
        if is_dataclass(tp):
            if last:
                raise QwenEdgeError(f"override {key!r}: {part!r} is a section; set one of its keys")
            sub = node.get(part)
            if part == "quant" and isinstance(sub, str):
                sub = {"type": sub}
            sub = {} if sub is None else sub
            if not isinstance(sub, dict):
                raise QwenEdgeError(f"{src}: {part!r} must be a mapping")
            node[part] = sub
            node, cls = sub, tp
            continue
        if last:
            node[part] = _scalar(raw, key)
            return
        if "dict" in str(tp) and i == len(parts) - 2:  # verify.thresholds.kl_mean=0.1
            sub = node.get(part)
            sub = {} if sub is None else sub
            if not isinstance(sub, dict):
                raise QwenEdgeError(f"{src}: {part!r} must be a mapping")
            node[part] = sub
            sub[parts[-1]] = _scalar(raw, key)
            return
        raise QwenEdgeError(f"override {key!r}: {part!r} is not a section")


def _scalar(raw: str, key: str) -> Any:
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise QwenEdgeError(f"override {key}={raw!r}: not a YAML scalar") from None
    if isinstance(value, (dict, list)):
        raise QwenEdgeError(f"override {key}={raw!r}: expected a scalar (number, string, true/false, null)")
    return value


def resolve_recipe_path(path_or_name: str | os.PathLike[str], dirs: Sequence[str | os.PathLike[str]] = ()) -> Path:
    """A recipe file path, or a recipe name looked up in `dirs`, $QWEN_EDGE_RECIPES_PATH, then the packaged recipes."""
    p = Path(path_or_name)
    if p.is_file():
        return p
    name = str(path_or_name)
    if set(name) <= NAME_CHARS and ".." not in name:
        found = find("recipes", name, dirs)
        if found is not None:
            return found[0]
    if p.exists():
        raise QwenEdgeError(f"{p}: not a recipe file")
    raise QwenEdgeError(f"{path_or_name}: no such recipe file or name (see `qwen-edge recipes`)")


def load_recipe(path: str | os.PathLike[str], overrides: dict[str, str] | None = None,
                dirs: Sequence[str | os.PathLike[str]] = ()) -> Recipe:
    """Read a recipe YAML (or a recipe name on the search path, see `resolve_recipe_path`), apply dotted
    overrides, validate it."""
    p = resolve_recipe_path(path, dirs)
    src = str(p)
    try:
        text = p.read_text(encoding="utf-8")
        data = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError) as e:
        raise QwenEdgeError(f"{src}: cannot read recipe ({e})") from None
    except yaml.YAMLError as e:
        raise QwenEdgeError(f"{src}: invalid YAML ({' '.join(str(e).split())[:160]})") from None
    except RecursionError:
        raise QwenEdgeError(f"{src}: YAML nested too deeply") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise QwenEdgeError(f"{src}: a recipe must be a mapping of keys to values")
    for key, raw in (overrides or {}).items():
        _apply_override(data, key, raw, src)
    recipe = _build(Recipe, data, src)
    if not recipe.name:
        recipe.name = p.name[:-5] if p.name.endswith(".yaml") else p.stem
    validate_recipe(recipe, src)
    return recipe


def recipe_from_args(source: str | None, fmt: str | None, quant: str | None, target: str | None,
                     overrides: dict[str, str] | None = None) -> Recipe:
    """A recipe built from plain CLI flags (no file): `export SOURCE --format F --quant Q`."""
    missing = [flag for flag, v in (("SOURCE", source), ("--format", fmt), ("--quant", quant)) if not v]
    if missing:
        raise QwenEdgeError(f"export needs --recipe FILE, or SOURCE with --format and --quant "
                            f"(missing: {', '.join(missing)})")
    data: dict[str, Any] = {"source": source, "format": fmt, "quant": {"type": quant},
                            "target": target or default_target_name()}
    for key, raw in (overrides or {}).items():
        _apply_override(data, key, raw, "--set")
    recipe = _build(Recipe, data, "--set")
    validate_recipe(recipe, "command line")
    return recipe


def known_quants(fmt: str) -> tuple[str, ...]:
    """The exporter's registered quantizations (the documented set when the exporter cannot be imported)."""
    from ..export import get_exporter

    try:
        return tuple(get_exporter(fmt).quants)
    except ImportError:
        from ..formats.quants import DOCUMENTED

        return DOCUMENTED[fmt]


def _one_of(values: tuple[Any, ...]) -> str:
    """`a, b or c`."""
    words = [str(v) for v in values]
    return ", ".join(words[:-1]) + " or " + words[-1] if len(words) > 1 else words[0]


def validate_recipe(r: Recipe, src: str) -> None:
    """Check names, format/quantization pairs, target and context; raise QwenEdgeError naming the file."""
    from ..families import MODELS
    from ..device.targets import load_target

    if not r.effective_source:
        raise QwenEdgeError(f"{src}: 'source' is required (a hub id or a checkpoint directory)")
    if r.revision is not None:
        from ..model.checkpoint import split_hub_id

        hub = split_hub_id(r.source)
        if not r.revision.strip():
            raise QwenEdgeError(f"{src}: 'revision' must not be empty")
        if hub is None and not r.source_path:
            raise QwenEdgeError(f"{src}: 'revision' needs a hub id (Org/Name) as 'source', not {r.source!r:.80}")
        if hub is not None and hub[1] is not None and hub[1] != r.revision:
            raise QwenEdgeError(f"{src}: 'source' {r.source!r:.80} and 'revision' {r.revision!r:.40} name two "
                                "revisions")
    if r.model and r.model.lower() not in MODELS:
        raise QwenEdgeError(f"{src}: unknown model {r.model!r} (known: {', '.join(MODELS)})")
    if r.format not in ("gguf", "onnx"):
        raise QwenEdgeError(f"{src}: 'format' must be gguf or onnx, not {r.format!r}")
    if not r.quant.type:
        raise QwenEdgeError(f"{src}: 'quant.type' is required")
    quants = known_quants(r.format)
    if r.quant.type not in quants:
        raise QwenEdgeError(f"{src}: format {r.format} has no quantization {r.quant.type!r} "
                            f"(available: {', '.join(quants)})")
    q = r.quant
    if r.format == "gguf":
        bad = [k for k in ONNX_ONLY if getattr(q, k) is not None]
        if bad:
            raise QwenEdgeError(f"{src}: 'quant.{bad[0]}' applies to ONNX only (GGUF types fix their own blocks)")
    else:
        bad = [k for k in GGUF_ONLY if getattr(q, k) is not None]
        if bad:
            raise QwenEdgeError(f"{src}: 'quant.{bad[0]}' applies to GGUF only")
    if q.calibration_text is not None and q.imatrix != "auto" and not q.awq and not q.gptq:
        raise QwenEdgeError(f"{src}: 'quant.calibration_text' needs 'quant.imatrix: auto', 'quant.awq: true' or "
                            "'quant.gptq: true'")
    if q.intermediate is not None and q.intermediate not in ("bf16", "f16", "f32"):
        raise QwenEdgeError(f"{src}: 'quant.intermediate' must be bf16, f16 or f32, not {q.intermediate!r}")
    if r.format == "onnx":  # the exporter's own table of option values (an ONNX recipe imported it for its quants)
        from ..export.onnx import KV_DTYPES, OPTION_VALUES

        for key, allowed in OPTION_VALUES.items():
            value = getattr(q, key)
            if value is not None and value not in allowed:
                raise QwenEdgeError(f"{src}: 'quant.{key}' must be {_one_of(allowed)}, not {value}")
        if q.kv_dtype is not None and q.kv_dtype not in KV_DTYPES:
            raise QwenEdgeError(f"{src}: 'quant.kv_dtype' must be {_one_of(tuple(KV_DTYPES))}, not {q.kv_dtype!r}")
    try:
        load_target(r.target)
    except QwenEdgeError as e:
        raise QwenEdgeError(f"{src}: {e}") from None
    if r.max_context is not None:
        if r.max_context <= 0:
            raise QwenEdgeError(f"{src}: 'max_context' must be a positive integer")
        if r.model:
            limit = MODELS[r.model.lower()].arch.max_position_embeddings
            if r.max_context > limit:
                raise QwenEdgeError(f"{src}: max_context {r.max_context} exceeds {r.model}'s {limit} positions")
    if r.output:
        check_output_name(r.output, src)
    if r.adapter_mode not in ("merge", "separate"):
        raise QwenEdgeError(f"{src}: 'adapter_mode' must be merge or separate, not {r.adapter_mode!r:.40}")
    if r.adapter_mode == "separate" and r.format not in ("gguf", "onnx"):
        raise QwenEdgeError(f"{src}: adapter_mode separate needs format gguf or onnx, not {r.format!r:.40}")
    if any(not a.strip() for a in r.adapter):
        raise QwenEdgeError(f"{src}: 'adapter' entries must not be empty")
    from ..quality.verify import METRICS

    for k, v in r.verify.thresholds.items():
        if k not in METRICS:
            raise QwenEdgeError(f"{src}: unknown key 'verify.thresholds.{k}' (known: {', '.join(METRICS)})")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise QwenEdgeError(f"{src}: 'verify.thresholds.{k}' must be a number, not {v!r:.40}")


def check_output_name(name: str, src: str) -> None:
    """An artifact directory name is one plain path component: no separators, no '..', not absolute."""
    if not name or name in (".", "..") or not set(name) <= NAME_CHARS or name.startswith("."):
        raise QwenEdgeError(f"{src}: output name {name!r} must be a plain directory name "
                            "(letters, digits, '.', '_', '-'; no '/', no '..')")


# --- listing --------------------------------------------------------------------------------------------------
def list_recipes(dirs: Sequence[str | os.PathLike[str]] = ()) -> list[dict[str, Any]]:
    """Every recipe along the search path (`dirs`, $QWEN_EDGE_RECIPES_PATH, the packaged ones), validated, as rows
    usable as a CI matrix. `origin` says where each came from; a name found earlier shadows a later one."""
    if isinstance(dirs, (str, os.PathLike)):
        dirs = [dirs]
    rows = []
    for p, origin in list_files("recipes", dirs):
        r = load_recipe(p)
        rows.append({"name": r.name, "file": str(p) if origin != PACKAGED else p.name, "origin": origin,
                     "model": r.model, "source": r.source, "revision": r.revision, "format": r.format,
                     "quant": r.quant.type, "target": r.target, "output": r.output or r.name})
    return rows


def render_recipes(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no recipes"
    cols = ("name", "model", "format", "quant", "target", "origin")
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in cols)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in cols) for r in rows]
    lines.append(f"{len(rows)} recipes ({_origins(rows)}) — export one: qwen-edge export --recipe NAME -o dist/")
    return "\n".join(line.rstrip() for line in lines)


def _origins(rows: list[dict[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["origin"]] = counts.get(r["origin"], 0) + 1
    return ", ".join(f"{n} {o}" for o, n in counts.items())
