"""`qwen-edge inspect`: describe an artifact directory or a bare .gguf/.onnx file, as JSON or an aligned summary."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import QwenEdgeError


def inspect(path: str | os.PathLike) -> dict[str, Any]:
    """Facts about an artifact directory (manifest validated, every sha256 checked) or a bare model file."""
    p = Path(path)
    if not p.exists():
        raise QwenEdgeError(f"{p}: no such file or directory")
    if p.is_dir():
        return _inspect_artifact(p)
    if p.suffix == ".gguf":
        from ..formats.gguf import gguf_file_info

        info = dict(gguf_file_info(p))
    elif p.suffix == ".onnx":
        from ..formats.onnx import onnx_file_info

        info = dict(onnx_file_info(p))
    else:
        raise QwenEdgeError(f"{p}: not an artifact directory, a .gguf or a .onnx file")
    info.setdefault("format", p.suffix[1:])
    info.setdefault("path", str(p))
    info.setdefault("size_bytes", p.stat().st_size)
    return info


def _inspect_artifact(root: Path) -> dict[str, Any]:
    from ..model.artifact import Artifact

    art = Artifact.open(root, check_hashes=True)
    m = art.manifest
    q = m.get("quantization") or {}
    tok = dict(m.get("tokenizer") or {})
    tok.update(_tokenizer_facts(art.path / "tokenizer.json"))
    return {
        "name": m.get("name", root.name),
        "path": str(root),
        "format": m["format"],
        "quant": m.get("quant"),
        "bits_per_weight": q.get("bits_per_weight"),
        "size_bytes": art.size_bytes,
        "files": m["files"],
        "model_file": m["model_file"],
        "architecture": m["architecture"],
        "context_length": art.context_length,
        "type_counts": q.get("type_counts") or {},
        "tensor_types": q.get("tensor_types") or {},
        "quantization": {k: v for k, v in q.items() if k not in ("tensor_types", "type_counts")},
        "tokenizer": tok,
        "template": _template_facts(art.path / "chat_template.jinja", tok.get("template_sha256")),
        "source": m.get("source"),
        "target": m.get("target"),
        "recipe": m.get("recipe"),
        "toolkit": m.get("toolkit"),
        "parity": m.get("parity"),
        "adapters": m.get("adapters") or [],
        "kv_cache": kv_cache_facts(m, art.size_bytes, art.context_length),
        "integrity": f"sha256 of {len(m['files'])} files checked",
    }


def kv_cache_facts(manifest: dict[str, Any], model_bytes: int, artifact_context: int) -> dict[str, Any] | None:
    """The KV cache a runtime allocates for this artifact: dtype, bytes per token, and bytes at the context load()
    picks by default on the artifact's target profile (min of the profile's max_context, the artifact's, and what
    fits the profile's memory_cap_mb beside the model)."""
    from ..backends.base import artifact_kv_dtype, default_context, kv_bytes_per_token
    from ..device.targets import default_target_name, load_target

    per_token = kv_bytes_per_token(manifest)
    if per_token is None:
        return None
    facts: dict[str, Any] = {"dtype": artifact_kv_dtype(manifest), "bytes_per_token": per_token}
    try:
        profile = load_target(manifest.get("target") or default_target_name())
    except QwenEdgeError:
        profile = None
    ctx = default_context(manifest, model_bytes, artifact_context, profile) if profile is not None \
        else artifact_context
    facts.update(context=ctx, bytes=per_token * ctx, target=profile.name if profile is not None else None,
                 memory_cap_mb=profile.memory_cap_mb if profile is not None else None)
    return facts


def _tokenizer_facts(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        added = data.get("added_tokens") or []
        vocab = (data.get("model") or {}).get("vocab") or {}
        ids = {int(t["id"]) for t in added if isinstance(t, dict) and "id" in t} | set(vocab.values())
        return {"tokens": len(ids), "added_tokens": len(added), "model": (data.get("model") or {}).get("type")}
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise QwenEdgeError(f"{path}: unreadable tokenizer.json ({e})") from None


def _template_facts(path: Path, sha: str | None) -> dict[str, Any]:
    if not path.is_file():
        return {}
    text = path.read_text(encoding="utf-8")
    return {"file": path.name, "chars": len(text), "sha256": sha, "thinking": "<think>" in text,
            "tools": "tools" in text, "text": text}


# --- human output ---------------------------------------------------------------------------------------------
def _size(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "?"
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{int(n)} B"


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def _arch_line(a: dict[str, Any]) -> list[str]:
    if not a:
        return []
    heads = f"{a.get('num_heads')}/{a.get('num_kv_heads')} heads (q/kv, head_dim {a.get('head_dim')})"
    first = (f"{a.get('family')} · {a.get('num_layers')} layers · hidden {a.get('hidden_size')} · {heads} · "
             f"ffn {a.get('intermediate_size')}")
    extra = [f"vocab {a.get('vocab_size')}", "tied embeddings" if a.get("tie_word_embeddings") else "untied lm_head",
             f"rope theta {a.get('rope_theta'):g}" if isinstance(a.get("rope_theta"), (int, float)) else "",
             "qk-norm" if a.get("qk_norm") else "", "qkv bias" if a.get("qkv_bias") else ""]
    try:
        from ..families import Arch

        known = {k: a[k] for k in Arch.__dataclass_fields__ if k in a}
        extra.insert(0, f"{_params(Arch(**known).parameter_count())} params")
    except (TypeError, ValueError):
        pass
    return [first, " · ".join(x for x in extra if x)]


def _counts(d: dict[str, Any]) -> str:
    items = sorted(d.items(), key=lambda kv: (-kv[1], kv[0])) if all(isinstance(v, int) for v in d.values()) \
        else d.items()
    return ", ".join(f"{k} ×{v}" for k, v in items)


def _parity(p: Any) -> str:
    if not p:
        return "not verified (qwen-edge verify ARTIFACT)"
    if not isinstance(p, dict):
        return str(p)
    head = "passed" if p.get("passed") else "FAILED" if "passed" in p else "recorded"
    metrics = p.get("metrics") or {}
    keys = [k for k in ("kl_mean", "top1_agreement", "ppl_rel_change", "max_abs_logit_error") if k in metrics]
    shown = ", ".join(f"{k} {metrics[k]:.4g}" if isinstance(metrics[k], float) else f"{k} {metrics[k]}"
                      for k in keys[:4])
    when = f" · {'quick' if p.get('quick') else 'full'} text"
    when += f", {p['verified_at']}" if p.get("verified_at") else ""
    return head + (f" ({shown})" if shown else "") + when


def _generic(v: Any) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k}={_generic(x)}" for k, x in v.items() if not isinstance(x, (dict, list)) or len(x) < 6)
    if isinstance(v, list):
        return ", ".join(map(str, v)) if len(v) <= 8 else f"{len(v)} entries"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def render_inspect(info: dict[str, Any]) -> str:
    """A compact, aligned summary of `inspect()`'s dict (artifact or bare file)."""
    rows: list[tuple[str, str]] = []

    def add(key: str, value: str | list[str]) -> None:
        for i, line in enumerate([value] if isinstance(value, str) else value):
            rows.append((key if i == 0 else "", line))

    bpw = info.get("bits_per_weight")
    add("path", f"{info.get('path', '')}" + (f"  ({info['integrity']})" if info.get("integrity") else ""))
    add("format", "  ".join(x for x in (f"{info.get('format')} {info.get('quant') or ''}".strip(),
                                         f"{bpw:.2f} bits/weight" if isinstance(bpw, (int, float)) else "",
                                         _size(info.get("size_bytes"))) if x))
    arch = info.get("architecture")
    if isinstance(arch, dict) and arch:
        add("model", _arch_line(arch))
    elif arch:
        hp = info.get("hyperparameters") or {}
        add("model", f"{arch}" + (f" · {_params(info['parameters'])} params" if isinstance(info.get("parameters"), int)
                                  else f" · {info['size_label']}" if info.get("size_label") else ""))
        if hp:
            add("", _generic(hp))
    ctx = info.get("context_length")
    if ctx:
        trained = arch.get("max_position_embeddings") if isinstance(arch, dict) else None
        add("context", f"{ctx} tokens" + (f" (trained {trained})" if trained and trained != ctx else ""))
    counts = info.get("type_counts") or info.get("tensor_types")
    if isinstance(counts, dict) and counts and all(isinstance(v, int) for v in counts.values()):
        add("tensors", (f"{info['tensor_count']}: " if info.get("tensor_count") else "") + _counts(counts))
    tok = info.get("tokenizer") or {}
    if tok:
        parts = []
        if "tokens" in tok:
            parts.append(f"{tok['tokens']} tokens ({tok.get('added_tokens', 0)} added)")
        if tok.get("model") and tok.get("pre"):
            parts.append(f"{tok['model']}/{tok['pre']} BPE, {tok.get('vocab_size')} entries, "
                         f"{tok.get('merges')} merges")
        for k in ("bos_token_id", "eos_token_id", "stop_ids", "pad_token_id", "padding_token_id", "add_bos",
                  "add_bos_token"):
            if tok.get(k) is not None:
                parts.append(f"{k.replace('_token_id', '').replace('_token', '')} {tok[k]}")
        if tok.get("sha256"):
            parts.append(f"sha256 {str(tok['sha256'])[:12]}")
        add("tokenizer", " · ".join(parts) if parts else _generic(tok))
    tmpl = info.get("template")
    if isinstance(tmpl, dict) and tmpl:
        feats = [f for f in ("thinking", "tools") if tmpl.get(f)]
        add("template", f"{tmpl.get('file', 'chat template')} {tmpl.get('chars', 0)} chars"
            + (f" ({', '.join(feats)})" if feats else "") + (f" · sha256 {str(tmpl['sha256'])[:12]}"
                                                              if tmpl.get("sha256") else ""))
    tmpl = tmpl or info.get("chat_template")
    if isinstance(tmpl, str) and tmpl:
        add("template", f"{len(tmpl)} chars" + (" (thinking)" if "<think>" in tmpl else ""))
    elif "chat_template" in info and not tmpl:
        add("template", "none in the file")
    src = info.get("source")
    if isinstance(src, dict):
        add("source", f"{src.get('path')} · weights sha256 {str(src.get('weights_sha256'))[:12]}")
    elif src:
        add("source", str(src))
    for ad in info.get("adapters") or []:
        if isinstance(ad, dict):
            add("adapter", f"{ad.get('source')} · LoRA r{ad.get('rank')} alpha {ad.get('alpha')}"
                + (" rsLoRA" if ad.get("use_rslora") else "") + f" · {','.join(ad.get('targets') or [])} · "
                + (f"separate {ad['file']}" if ad.get("file") else "merged")
                + f" · sha256 {str(ad.get('sha256'))[:12]}")
    if "target" in info or info.get("recipe"):
        rec = info.get("recipe") or {}
        add("target", f"{info.get('target') or '-'}" + (f" · recipe {rec['name']}" if rec.get("name") else ""))
    if "parity" in info:
        add("parity", _parity(info.get("parity")))
    kv = info.get("kv_cache")
    if isinstance(kv, dict) and kv.get("bytes_per_token"):
        line = f"{kv.get('dtype')} · {kv['bytes_per_token'] / 1024:.1f} KiB/token"
        if kv.get("context"):
            line += f" · {_size(kv.get('bytes'))} at {kv['context']} tokens"
            line += f" (target {kv['target']} default" + (f", memory cap {kv['memory_cap_mb']} MiB)"
                                                          if kv.get("memory_cap_mb") else ")") if kv.get("target") else ""
        add("kv cache", line)
    if isinstance(info.get("files"), list):
        add("files", [f"{f['path']:<24} {_size(f.get('bytes')):>9}  {str(f.get('sha256', ''))[:12]}"
                      for f in info["files"] if isinstance(f, dict) and "path" in f])
    shown = {"path", "integrity", "format", "quant", "bits_per_weight", "size_bytes", "architecture", "context_length",
             "type_counts", "tensor_types", "tokenizer", "template", "source", "target", "recipe", "parity", "files",
             "name", "model_file", "quantization", "toolkit", "metadata", "tensors", "chat_template",
             "hyperparameters", "tensor_count", "parameters", "size_label", "kv_cache", "adapters"}
    for k, v in info.items():  # whatever else a bare-file inspector reports
        if k not in shown and v not in (None, "", [], {}):
            add(k, _generic(v))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}".rstrip() for k, v in rows)
