"""GGUF tokenizer metadata (gpt2 BPE, qwen2 pre-tokenizer) and the Ollama Modelfile, from an artifact's own files."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any


from ..errors import QwenEdgeError
from ..formats.gguf import TokenType, VocabKV
from ..families.qwen2 import ENDOFTEXT_ID, IM_END_ID


def _looks_special(text: str) -> bool:
    """Added tokens llama.cpp's converter treats as control even when tokenizer.json says `special: false`."""
    return text.startswith("<|") and text.endswith("|>")


def load_vocab(tokenizer_json: Path, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """Tokens, token types and merges for `tokenizer.ggml.*`, padded with `[PAD{id}]` to the model's vocab size."""
    try:
        data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
        model = data["model"]
        vocab: dict[str, int] = model["vocab"]
        merges_raw = model.get("merges", [])
        added = data.get("added_tokens", [])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise QwenEdgeError(f"{tokenizer_json}: not a usable tokenizer.json ({type(e).__name__}: {e})") from None
    if model.get("type") != "BPE":
        raise QwenEdgeError(f"{tokenizer_json}: model type {model.get('type')!r}, GGUF export needs byte-level BPE")
    tokens: list[str | None] = [None] * vocab_size
    types = [int(TokenType.UNUSED)] * vocab_size
    for text, i in vocab.items():
        if not isinstance(i, int) or not 0 <= i < vocab_size:
            raise QwenEdgeError(f"{tokenizer_json}: token {text!r} has id {i}, outside the model's vocab {vocab_size}")
        tokens[i] = text
        types[i] = int(TokenType.NORMAL)
    for a in added:
        i, text = a.get("id"), a.get("content")
        if not isinstance(i, int) or not 0 <= i < vocab_size or not isinstance(text, str):
            raise QwenEdgeError(f"{tokenizer_json}: added token {a!r:.80} is outside the model's vocab {vocab_size}")
        tokens[i] = text
        control = bool(a.get("special")) or _looks_special(text)
        types[i] = int(TokenType.CONTROL if control else TokenType.USER_DEFINED)
    out = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges_raw]
    if not merges:
        raise QwenEdgeError(f"{tokenizer_json}: no BPE merges")
    return out, types, merges


def vocab_kv(out: Path, vocab_size: int, tok: dict[str, Any], pre: str) -> VocabKV:
    """The GGUF tokenizer metadata from the artifact's own tokenizer.json, template and token ids."""
    tokens, types, merges = load_vocab(out / "tokenizer.json", vocab_size)
    bos = tok.get("bos_token_id")
    bos = bos if isinstance(bos, int) else ENDOFTEXT_ID
    eos = tok.get("eos_token_id", IM_END_ID)
    pad = tok.get("pad_token_id", ENDOFTEXT_ID)
    for key, val in (("bos", bos), ("eos", eos), ("pad", pad)):
        if not isinstance(val, int) or not 0 <= val < vocab_size:
            raise QwenEdgeError(f"{out / 'tokenizer.json'}: {key} token id {val!r} outside the vocab")
    template = (out / "chat_template.jinja").read_text(encoding="utf-8")
    return VocabKV(tokens, types, merges, pre, bos, eos, pad, template)


_DEFAULT_SYSTEM = re.compile(r"'<\|im_start\|>system\\n([^'<\\]+)<\|im_end\|>")


def default_system_prompt(template: str) -> str | None:
    """The system message a ChatML template inserts when the conversation has none (Qwen2/2.5), else None."""
    m = _DEFAULT_SYSTEM.search(template)
    return m.group(1) if m else None


def ollama_template(default_system: str | None) -> str:
    """ChatML in Ollama's Go-template syntax, with the family's default system message."""
    if default_system:
        system = ("{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n"
                  f"{{{{ else }}}}<|im_start|>system\n{default_system}<|im_end|>\n{{{{ end }}}}")
    else:
        system = "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    return (
        "{{- if .Messages }}\n" + system + "\n"
        "{{- range $i, $_ := .Messages }}\n"
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}\n"
        "{{- if eq .Role \"user\" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n"
        "{{ else if eq .Role \"assistant\" }}<|im_start|>assistant\n{{ .Content }}"
        "{{ if not $last }}<|im_end|>\n{{ end }}\n"
        "{{- end }}\n"
        "{{- if and (ne .Role \"assistant\") $last }}<|im_start|>assistant\n{{ end }}\n"
        "{{- end }}\n"
        "{{- else }}\n" + system + "\n"
        "{{- if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
        "{{ end }}{{ .Response }}{{ if .Response }}<|im_end|>{{ end }}"
    )


_PARAMS = (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"), ("min_p", "min_p"),
           ("repetition_penalty", "repeat_penalty"))


def write_modelfile(out: Path, model_file: str, stop_texts: list[str]) -> None:
    """`Modelfile` so `ollama create NAME -f Modelfile` imports the artifact as is."""
    template = (out / "chat_template.jinja").read_text(encoding="utf-8")
    gen_path = out / "generation_config.json"
    gen = json.loads(gen_path.read_text(encoding="utf-8")) if gen_path.is_file() else {}
    lines = [f"FROM ./{model_file}", "", f'TEMPLATE """{ollama_template(default_system_prompt(template))}"""', ""]
    for s in stop_texts:
        lines.append(f"PARAMETER stop {json.dumps(s)}")
    for key, name in _PARAMS:
        v = gen.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            lines.append(f"PARAMETER {name} {v}")
    (out / "Modelfile").write_text("\n".join(lines) + "\n", encoding="utf-8")


def stop_texts(out: Path, stop_ids: list[int]) -> list[str]:
    """The text of each stop id, from the artifact's tokenizer.json (Ollama matches stops as text)."""
    data = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    by_id = {a["id"]: a["content"] for a in data.get("added_tokens", [])}
    texts = [by_id[i] for i in stop_ids if i in by_id]
    for t in ("<|im_end|>", "<|endoftext|>"):
        if t not in texts and t in by_id.values():
            texts.append(t)
    return texts
