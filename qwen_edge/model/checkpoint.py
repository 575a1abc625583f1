"""Read and validate a Hugging Face Qwen checkpoint directory without torch (memory-mapped safetensors)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import QwenEdgeError, first_line
from ..families import Arch, family_of
from .safetensors_io import SafetensorsFile, TensorInfo, to_float32

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "chat_template.jinja", "special_tokens_map.json")


def expected_tensors(arch: Arch) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of this architecture must hold, with its shape (HF names), from its family."""
    return {t.hf: t.shape for t in family_of(arch).tensor_map(arch)}


def _finite(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise ValueError(f"number {text[:40]} is out of range")
    return x


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid JSON number")


def _read_json(path: Path) -> Any:
    """Strict JSON: NaN, Infinity and overflowing numbers are errors, as is pathological nesting."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f, parse_constant=_no_constant, parse_float=_finite)
    except FileNotFoundError:
        raise QwenEdgeError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise QwenEdgeError(f"{path.name}: not valid JSON ({str(e)[:200]})") from None


class Checkpoint:
    """A validated HF checkpoint directory: config, architecture, tensors (memory-mapped), tokenizer files."""

    def __init__(self, path: str | os.PathLike, *, validate: bool = True):
        self.path = Path(path)
        if not self.path.is_dir():
            raise QwenEdgeError(f"{self.path}: not a checkpoint directory")
        self.config: dict[str, Any] = _read_json(self.path / "config.json")
        if not isinstance(self.config, dict):
            raise QwenEdgeError(f"{self.path / 'config.json'}: expected a JSON object")
        try:
            self.arch = Arch.from_hf_config(self.config, str(self.path / "config.json"))
        except QwenEdgeError as e:  # keep the message one short line even when a value is huge
            if len(str(e)) <= 500:
                raise
            raise QwenEdgeError(str(e)[:497] + "...") from None
        self.files = self._weight_files()
        self._tensors: dict[str, TensorInfo] = {}
        self._handles: dict[Path, SafetensorsFile] = {}
        for f in self.files:
            st = SafetensorsFile(f)
            self._handles[f] = st
            for name, info in st.tensors.items():
                if name in self._tensors:
                    raise QwenEdgeError(f"{f.name}: tensor {name!r} also appears in {self._tensors[name].file.name}")
                self._tensors[name] = info
        if validate:
            self.validate()

    def _weight_files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            idx = _read_json(index)
            wm = idx.get("weight_map") if isinstance(idx, dict) else None
            if not isinstance(wm, dict) or not wm:
                raise QwenEdgeError(f"{index.name}: missing or empty weight_map")
            if not all(isinstance(n, str) for n in wm.values()):
                raise QwenEdgeError(f"{index.name}: weight_map values must be shard file names")
            names = sorted(set(wm.values()))
            files = []
            for n in names:
                if not isinstance(n, str) or "/" in n or "\\" in n or "\0" in n or n.startswith("."):
                    raise QwenEdgeError(f"{index.name}: invalid shard name {n!r}")
                p = self.path / n
                if not p.is_file():
                    raise QwenEdgeError(f"{index.name}: shard {n} not found")
                files.append(p)
            return files
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            if list(self.path.glob("*.bin")) or list(self.path.glob("*.pt")):
                raise QwenEdgeError(f"{self.path}: only pickle weights (*.bin); convert to safetensors first")
            raise QwenEdgeError(f"{self.path}: no *.safetensors weights found")
        return files

    def validate(self) -> None:
        expected = expected_tensors(self.arch)
        for name, shape in expected.items():
            info = self._tensors.get(name)
            if info is None:
                raise QwenEdgeError(f"{self.path.name}: missing tensor {name!r}")
            if info.shape != shape:
                raise QwenEdgeError(
                    f"{info.file.name}: tensor {name!r} has shape {list(info.shape)}, config implies {list(shape)}"
                )
            if info.dtype not in ("F32", "F16", "BF16"):
                raise QwenEdgeError(f"{info.file.name}: tensor {name!r} has dtype {info.dtype}, expected a float")
        untied = replace(self.arch, tie_word_embeddings=False)  # some tied checkpoints store the head anyway
        allowed_extra = set(family_of(self.arch).checkpoint_names(untied, "lm_head"))
        extra = [n for n in self._tensors if n not in expected and n not in allowed_extra
                 and not n.endswith("rotary_emb.inv_freq")]
        if extra:
            raise QwenEdgeError(f"{self.path.name}: unexpected tensor {extra[0]!r} ({len(extra)} unexpected)")

    # --- tensors -------------------------------------------------------------------------------------------
    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def tensor_info(self, name: str) -> TensorInfo:
        try:
            return self._tensors[name]
        except KeyError:
            raise QwenEdgeError(f"{self.path.name}: missing tensor {name!r}") from None

    def raw(self, name: str) -> np.ndarray:
        """Stored array, memory-mapped (bf16 as uint16 bits)."""
        info = self.tensor_info(name)
        return self._handles[info.file].raw(name)

    def tensor(self, name: str) -> np.ndarray:
        """A tensor as float32 (a fresh array; one tensor at a time keeps memory low)."""
        info = self.tensor_info(name)
        return to_float32(self.raw(name), info.dtype)

    def lm_head_name(self) -> str:
        """The checkpoint tensor the LM head reads (the embedding table when tied)."""
        fam = family_of(self.arch)
        return (fam.checkpoint_names(self.arch, "lm_head") or fam.checkpoint_names(self.arch, "embed_tokens"))[0]

    # --- metadata ------------------------------------------------------------------------------------------
    @property
    def random_weights(self) -> bool:
        """True for a checkpoint `qwen-edge synth` wrote: its weight files say so in their safetensors metadata
        (`qwen_edge_synth`). Its outputs are near uniform, so top-1 and greedy agreement mean nothing there."""
        return bool(self._handles) and all("qwen_edge_synth" in h.metadata for h in self._handles.values())

    @cached_property
    def weights_sha256(self) -> str:
        """sha256 over the weight files in name order (identifies the source in manifests)."""
        h = hashlib.sha256()
        for f in self.files:
            h.update(f.name.encode())
            h.update(sha256_file(f).encode())
        return h.hexdigest()

    @cached_property
    def generation_config(self) -> dict[str, Any]:
        p = self.path / "generation_config.json"
        return _read_json(p) if p.exists() else {}

    @cached_property
    def tokenizer_config(self) -> dict[str, Any]:
        p = self.path / "tokenizer_config.json"
        return _read_json(p) if p.exists() else {}

    def has_tokenizer(self) -> bool:
        return (self.path / "tokenizer.json").exists()

    def close(self) -> None:
        for h in self._handles.values():
            h.close()


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    from ..log import ByteProgress

    h = hashlib.sha256()
    with open(path, "rb") as f, ByteProgress(os.fstat(f.fileno()).st_size, f"sha256 {path.name}") as bar:
        while block := f.read(chunk):
            h.update(block)
            bar.update(len(block))
    return h.hexdigest()


HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")
"""`Org/Name` as the hub spells repository ids (huggingface_hub validates the finer rules)."""
REVISION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./-]{0,254}")
"""A branch, tag or commit (`main`, `v1.0`, `refs/pr/3`, 40 hex digits)."""
COMMIT = re.compile(r"[0-9a-f]{40}")
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt"]
"""What a checkpoint needs from a hub repository (config, weights, tokenizer, template); pickles are skipped."""


@dataclass(frozen=True)
class Source:
    """A checkpoint source resolved to a local directory; for a hub id also the id, the revision asked for and the
    commit the revision resolved to (the snapshot's commit hash)."""

    path: Path
    spec: str
    """The source as given (a directory, `Org/Name` or `Org/Name@rev`)."""
    hub_id: str | None = None
    revision: str | None = None
    """The revision asked for (`None`: the repository's default branch)."""
    commit: str | None = None

    @property
    def is_hub(self) -> bool:
        return self.hub_id is not None

    def record(self) -> dict[str, Any]:
        """The manifest's hub fields (`hub_id`, `revision`, `commit`); empty for a local directory."""
        return {"hub_id": self.hub_id, "revision": self.revision, "commit": self.commit} if self.is_hub else {}

    @property
    def label(self) -> str:
        """`Org/Name@commit` for a hub source (what to pass to pin it), else the directory as given."""
        return f"{self.hub_id}@{self.commit}" if self.is_hub and self.commit else self.spec

    def __str__(self) -> str:
        return self.spec


def split_hub_id(text: str) -> tuple[str, str | None] | None:
    """`Org/Name` -> (`Org/Name`, None); `Org/Name@rev` -> (`Org/Name`, `rev`); None when `text` is no hub id."""
    repo, at, rev = text.partition("@")
    if not HUB_ID.fullmatch(repo) or (at and not rev):
        return None
    return repo, (rev if at else None)


def _check_revision(rev: str, source: str) -> None:
    if not REVISION.fullmatch(rev) or ".." in rev or "//" in rev or rev.endswith("/"):
        raise QwenEdgeError(f"{source}: invalid revision {rev[:80]!r} (a branch, tag or commit hash)")


def resolve(source: "str | os.PathLike | Source", revision: str | None = None) -> Source:
    """A local checkpoint directory as is; a hub id (`Org/Name`, `Org/Name@rev`, or `revision=`) resolved once
    through huggingface_hub's cache (HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE and HF_TOKEN as huggingface_hub reads
    them), downloading what the cache lacks when online."""
    if isinstance(source, Source):
        if revision is not None and revision != source.revision:
            raise QwenEdgeError(f"{source.spec}: already resolved without revision {revision!r}")
        return source
    text = os.fspath(source)
    p = Path(text).expanduser()
    if p.exists():
        if revision is not None:
            raise QwenEdgeError(f"{text}: a local directory has no revision (revision {revision!r} is for hub ids)")
        return Source(p, text)
    hub = split_hub_id(text) if not text.startswith((".", "/", "~")) else None
    if hub is None:
        raise QwenEdgeError(f"{text}: no such checkpoint directory")
    repo, rev = hub
    if rev is not None and revision is not None and rev != revision:
        raise QwenEdgeError(f"{text}: two revisions given ({rev!r} in the source and {revision!r})")
    rev = rev if rev is not None else revision
    if rev is not None:
        _check_revision(rev, text)
    path = _snapshot(repo, rev, text)
    commit = path.name if COMMIT.fullmatch(path.name) and path.parent.name == "snapshots" else None
    return Source(path, text, hub_id=repo, revision=rev, commit=commit)


def _snapshot(repo: str, rev: str | None, text: str) -> Path:
    """The snapshot directory of `repo` at `rev` from huggingface_hub; every failure is one QwenEdgeError line."""
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub import errors as hf_errors
        from huggingface_hub.file_download import repo_folder_name
    except ImportError:
        raise QwenEdgeError(f"{text}: not a local directory and huggingface_hub is not installed") from None
    at = f" at revision {rev!r}" if rev else ""
    try:
        return Path(snapshot_download(repo, revision=rev, allow_patterns=HUB_FILES))
    except hf_errors.RevisionNotFoundError:
        raise QwenEdgeError(f"{text}: unknown revision {rev!r} of {repo} on the Hugging Face hub") from None
    except hf_errors.GatedRepoError:
        raise QwenEdgeError(f"{text}: {repo} is gated on the Hugging Face hub; accept its terms there and set "
                            "HF_TOKEN") from None
    except hf_errors.RepositoryNotFoundError:
        raise QwenEdgeError(f"{text}: no such checkpoint directory, and no repository {repo} on the Hugging Face hub "
                            "(a private one needs HF_TOKEN)") from None
    except hf_errors.IncompleteSnapshotError as e:
        raise QwenEdgeError(f"{text}: the cached snapshot{at} is incomplete and the hub cannot be reached "
                            f"({first_line(e, 160)})") from None
    except hf_errors.LocalEntryNotFoundError as e:
        cache = Path(constants.HF_HUB_CACHE)
        why = "HF_HUB_OFFLINE is set" if constants.is_offline_mode() else \
            f"the hub cannot be reached ({first_line(e.__cause__ or e, 120)})"
        if not (cache / repo_folder_name(repo_id=repo, repo_type="model")).is_dir():
            raise QwenEdgeError(f"{text}: no such checkpoint directory, and {repo} is not in the Hugging Face cache "
                                f"{cache} while {why}") from None
        raise QwenEdgeError(f"{text}: unknown revision {rev or 'main'!r}: the Hugging Face cache {cache} holds {repo} "
                            f"but not{at or ' at its default branch'}, and {why}") from None
    except ValueError as e:  # HFValidationError: an id or revision the hub refuses
        raise QwenEdgeError(f"{text}: not a valid hub id ({first_line(e, 160)})") from None
    except Exception as e:  # network, disk, auth: all one line for the user
        raise QwenEdgeError(f"{text}: cannot fetch {repo}{at} from the Hugging Face hub ({type(e).__name__}: "
                            f"{first_line(e, 160)})") from None


def resolve_source(source: "str | os.PathLike | Source", revision: str | None = None) -> Path:
    """The local directory of a source (see `resolve`)."""
    return resolve(source, revision).path


def open_checkpoint(source: "str | os.PathLike | Source", revision: str | None = None) -> Checkpoint:
    return Checkpoint(resolve(source, revision).path)
