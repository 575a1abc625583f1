"""Artifact directories: the manifest contract, sha256 of every file, atomic writes, safe reads."""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..errors import QwenEdgeError

if TYPE_CHECKING:
    from .checkpoint import Checkpoint

# Loading an artifact must not import .checkpoint / .families: they import gguf-py (~0.04 s), which an ONNX load
# never needs (issue 24); the export-side helpers below import them where they are used.


def sha256_file(path: Path) -> str:
    from .checkpoint import sha256_file as sha256

    return sha256(path)


def family_of(arch: Any) -> Any:
    from ..families import family_of as family

    return family(arch)

SCHEMA_VERSION = 1
READ_BY_TOOLKIT = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json", "genai_config.json", "special_tokens_map.json")
"""Files the toolkit reads from an artifact when present: each must be listed (and hashed) in the manifest."""
READ_BY_RUNTIMES = (".gguf", ".onnx", ".data", ".onnx_data")
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 16 * 1024 * 1024


def safe_relpath(root: Path, rel: str, what: str = "path") -> Path:
    """Resolve `rel` under `root`, refusing absolute paths, `..`, and symlinks that leave the root."""
    if not isinstance(rel, str) or len(rel) > 1024 or not rel or rel.startswith(("/", "\\")) or ":" in rel[:3] or "\0" in rel:
        raise QwenEdgeError(f"{what} {str(rel)[:120]!r}: must be a relative path inside {root}")
    parts = Path(rel).parts
    if any(p in ("..", "") for p in parts):
        raise QwenEdgeError(f"{what} {rel!r}: must not contain '..'")
    p = root / rel
    try:
        resolved = p.resolve()
        root_resolved = root.resolve()
    except (OSError, ValueError, RuntimeError) as e:  # ELOOP, ENAMETOOLONG, symlink loops
        raise QwenEdgeError(f"{what} {rel!r}: cannot resolve ({e})") from None
    if resolved != root_resolved and root_resolved not in resolved.parents:
        raise QwenEdgeError(f"{what} {rel!r}: resolves outside {root}")
    return p


def file_entry(root: Path, rel: str) -> dict[str, Any]:
    p = root / rel
    return {"path": rel, "bytes": p.stat().st_size, "sha256": sha256_file(p)}


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: Path, obj: Any) -> None:
    data = json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _remove_stale(parent: Path, name: str) -> None:
    """Delete temporary/old directories a killed writer left for `name` (their process no longer runs)."""
    for p in parent.glob(f".{glob.escape(name)}.*-*"):
        kind, _, rest = p.name[len(name) + 2:].partition("-")
        pid = rest.split("-", 1)[0]
        if kind not in ("tmp", "old") or not pid.isdigit() or not p.is_dir() or p.is_symlink():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # still running (or not ours to signal): leave it alone
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (PermissionError, OverflowError, ValueError):
            continue


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        at_fdcwd, rename_exchange = -100, 2
        return libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
    except (OSError, AttributeError):
        return False


class ArtifactWriter:
    """Builds an artifact in a temporary sibling directory and renames it into place on `commit()`.

    Use as a context manager; leaving the block without `commit()` (an exception, Ctrl-C) removes the
    temporary directory, so no partial artifact ever appears under the final name.
    """

    def __init__(self, final_dir: str | os.PathLike):
        self.final = Path(final_dir)
        self.tmp: Path | None = None
        self.committed = False

    def __enter__(self) -> "ArtifactWriter":
        parent = self.final.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            _remove_stale(parent, self.final.name)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.tmp-{os.getpid()}-", dir=parent))
        except OSError as e:
            raise QwenEdgeError(f"{parent}: cannot create output directory ({e.strerror})") from None
        return self

    @property
    def dir(self) -> Path:
        if self.tmp is None:
            raise RuntimeError("ArtifactWriter used outside its `with` block")
        if self.committed:
            raise RuntimeError("ArtifactWriter already committed")
        return self.tmp

    def commit(self, manifest: dict[str, Any] | None) -> Path:
        """Hash every file, write manifest.json (unless None), fsync, and atomically swap the directory in."""
        d = self.dir
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(d, 0o777 & ~umask)  # mkdtemp makes it 0700; an artifact is an ordinary directory
        files = sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and p.name != MANIFEST)
        if manifest is not None:
            manifest = dict(manifest)
            manifest["files"] = [file_entry(d, rel) for rel in files]
            write_json(d / MANIFEST, manifest)
        for rel in files:
            with open(d / rel, "rb+") as f:
                os.fsync(f.fileno())
        fsync_dir(d)
        old = None
        if self.final.exists():
            old = self.final.with_name(f".{self.final.name}.old-{os.getpid()}")
            if _exchange(d, self.final):  # one atomic step: no instant without an artifact under the name
                os.replace(d, old)
            else:
                os.replace(self.final, old)
                os.replace(d, self.final)
        else:
            os.replace(d, self.final)
        fsync_dir(self.final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self.committed = True
        return self.final

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed and self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


@dataclass
class Artifact:
    """An artifact directory opened for reading, its manifest validated."""

    path: Path
    manifest: dict[str, Any]
    files: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def format(self) -> str:
        return self.manifest["format"]

    @property
    def quant(self) -> str:
        return self.manifest.get("quant", "")

    @property
    def model_file(self) -> Path:
        return safe_relpath(self.path, self.manifest["model_file"], "model_file")

    @property
    def architecture(self) -> dict[str, Any]:
        return self.manifest.get("architecture", {})

    @property
    def stop_ids(self) -> list[int]:
        tok = self.manifest.get("tokenizer", {})
        if "stop_ids" in tok:
            return list(tok["stop_ids"])
        from ..families.qwen2 import ENDOFTEXT_ID, IM_END_ID

        return [IM_END_ID, ENDOFTEXT_ID]

    @property
    def context_length(self) -> int:
        return int(self.manifest.get("context_length") or self.architecture.get("max_position_embeddings", 4096))

    @property
    def size_bytes(self) -> int:
        return sum(int(f["bytes"]) for f in self.manifest.get("files", []))

    @property
    def bits_per_weight(self) -> float | None:
        return self.manifest.get("quantization", {}).get("bits_per_weight")

    def file(self, rel: str) -> Path:
        return safe_relpath(self.path, rel)

    def update_manifest(self, **fields: Any) -> None:
        """Rewrite manifest.json atomically with extra top-level fields (e.g. the parity report)."""
        self.manifest.update(fields)
        write_json(self.path / MANIFEST, self.manifest)

    @classmethod
    def open(cls, path: str | os.PathLike, *, check_hashes: bool = True) -> "Artifact":
        root = Path(path)
        if not root.is_dir():
            raise QwenEdgeError(f"{root}: not an artifact directory")
        mpath = root / MANIFEST
        if not mpath.is_file():
            raise QwenEdgeError(f"{root}: no {MANIFEST} (not a qwen-edge artifact)")
        if mpath.is_symlink():
            raise QwenEdgeError(f"{mpath}: symlinks are not allowed in an artifact")
        if mpath.stat().st_size > MAX_MANIFEST_BYTES:
            raise QwenEdgeError(f"{mpath}: manifest is implausibly large")
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"), parse_constant=_no_constant)
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise QwenEdgeError(f"{mpath}: corrupt manifest ({str(e)[:200]})") from None
        if not isinstance(manifest, dict):
            raise QwenEdgeError(f"{mpath}: manifest is not a JSON object")
        for key in ("schema_version", "format", "model_file", "files", "architecture"):
            if key not in manifest:
                raise QwenEdgeError(f"{mpath}: manifest lacks {key!r}")
        if manifest["schema_version"] != SCHEMA_VERSION:
            raise QwenEdgeError(f"{mpath}: unsupported schema_version {manifest['schema_version']!r}")
        _check_types(manifest, mpath)
        art = cls(root, manifest)
        for entry in manifest["files"]:
            if not isinstance(entry, dict) or not {"path", "bytes", "sha256"} <= set(entry):
                raise QwenEdgeError(f"{mpath}: malformed files entry {entry!r:.80}")
            p = safe_relpath(root, entry["path"], "manifest file")
            try:
                if p.is_symlink():
                    raise QwenEdgeError(f"{entry['path']}: symlinks are not allowed in an artifact")
                if not p.is_file():
                    raise QwenEdgeError(f"{root.name}/{entry['path']}: missing (listed in the manifest)")
                size = p.stat().st_size
            except OSError as e:
                raise QwenEdgeError(f"{root.name}/{entry['path']}: cannot read ({e.strerror})") from None
            if size != entry["bytes"]:
                raise QwenEdgeError(
                    f"{root.name}/{entry['path']}: {size} bytes, manifest says {entry['bytes']} (truncated or altered)"
                )
            if check_hashes and sha256_file(p) != entry["sha256"]:
                raise QwenEdgeError(f"{root.name}/{entry['path']}: sha256 disagrees with the manifest (corrupt or altered)")
            art.files[entry["path"]] = entry
        if manifest["model_file"] not in art.files:
            raise QwenEdgeError(f"{mpath}: model_file {manifest['model_file']!r:.120} is not among the listed files")
        for p in root.iterdir():
            if p.name not in art.files and (p.name in READ_BY_TOOLKIT or p.name.endswith(READ_BY_RUNTIMES)):
                raise QwenEdgeError(f"{root.name}/{p.name}: not listed in the manifest (added or altered after export)")
        return art


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid JSON number")


def _check_types(m: dict[str, Any], mpath: Path) -> None:
    """The manifest fields the toolkit acts on have the types it expects (a hostile manifest fails here)."""
    def bad(key: str, want: str) -> QwenEdgeError:
        return QwenEdgeError(f"{mpath}: {key!r} must be {want}, not {type(m.get(key)).__name__}")

    if not isinstance(m["format"], str):
        raise bad("format", "a string")
    if not isinstance(m["model_file"], str):
        raise bad("model_file", "a string")
    if not isinstance(m["files"], list):
        raise bad("files", "a list")
    if not isinstance(m["architecture"], dict):
        raise bad("architecture", "an object")
    ctx = m.get("context_length")
    if ctx is not None and (type(ctx) is not int or not 0 < ctx <= 1 << 24):
        raise QwenEdgeError(f"{mpath}: context_length {ctx!r:.40} is not a positive integer")
    tok = m.get("tokenizer", {})
    if not isinstance(tok, dict):
        raise bad("tokenizer", "an object")
    stop = tok.get("stop_ids", [])
    if not isinstance(stop, list) or not all(type(x) is int and 0 <= x < 1 << 24 for x in stop):
        raise QwenEdgeError(f"{mpath}: tokenizer.stop_ids must be a list of token ids")
    for entry in m["files"]:
        if isinstance(entry, dict) and not (type(entry.get("bytes")) is int and isinstance(entry.get("sha256"), str)):
            raise QwenEdgeError(f"{mpath}: files entry {entry.get('path')!r:.120} has malformed bytes or sha256")


def stop_ids_for(ckpt: Checkpoint) -> list[int]:
    """Stop ids from the checkpoint's own generation config and config, then the family's."""
    ids: list[int] = []
    for src in (ckpt.generation_config.get("eos_token_id"), ckpt.config.get("eos_token_id")):
        for x in (src if isinstance(src, list) else [src]):
            if isinstance(x, int) and x not in ids:
                ids.append(x)
    for x in family_of(ckpt.arch).stop_ids:
        if x not in ids and x < ckpt.arch.vocab_size:
            ids.append(x)
    return ids


def chat_template_of(ckpt: Checkpoint) -> str:
    p = ckpt.path / "chat_template.jinja"
    if p.is_file():
        return p.read_text(encoding="utf-8")
    tmpl = ckpt.tokenizer_config.get("chat_template")
    if isinstance(tmpl, str) and tmpl:
        return tmpl
    from ..text.tokenizer import load_template

    return load_template(family_of(ckpt.arch).default_template)


def write_tokenizer_files(ckpt: Checkpoint, dest: Path) -> dict[str, Any]:
    """Copy the tokenizer, the chat template and the generation config beside the model; returns manifest facts."""
    src = ckpt.path / "tokenizer.json"
    if not src.is_file():
        raise QwenEdgeError(f"{ckpt.path}: no tokenizer.json (the artifact must carry its tokenizer)")
    shutil.copyfile(src, dest / "tokenizer.json")
    template = chat_template_of(ckpt)
    (dest / "chat_template.jinja").write_text(template, encoding="utf-8")
    tcfg = dict(ckpt.tokenizer_config)
    tcfg.pop("chat_template", None)
    write_json(dest / "tokenizer_config.json", tcfg)
    gen = dict(ckpt.generation_config)
    write_json(dest / "generation_config.json", gen)
    stop = stop_ids_for(ckpt)
    default_pad = family_of(ckpt.arch).pad_token_id
    pad = gen.get("pad_token_id", ckpt.config.get("pad_token_id", default_pad))
    return {
        "sha256": sha256_file(dest / "tokenizer.json"),
        "template_sha256": sha256_file(dest / "chat_template.jinja"),
        "stop_ids": stop,
        "eos_token_id": stop[0],
        "pad_token_id": pad if isinstance(pad, int) else default_pad,
        "bos_token_id": ckpt.config.get("bos_token_id"),
        "add_bos": False,
    }


def base_manifest(ckpt: Checkpoint, *, name: str, fmt: str, quant: str, model_file: str, source: str,
                  context_length: int, target: str | None, recipe: dict | None, tokenizer: dict[str, Any],
                  quantization: dict[str, Any], extra: dict[str, Any] | None = None,
                  hub: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest fields every exporter writes (files are added by `ArtifactWriter.commit`).

    `source` is the directory as given, or the hub id; `hub` (`Source.record()`) adds a hub source's `hub_id`, the
    `revision` asked for (null: the default branch) and the `commit` it resolved to."""
    m: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "toolkit": {"name": "qwen-edge", "version": __version__},
        "name": name,
        "format": fmt,
        "quant": quant,
        "model_file": model_file,
        "source": {"path": source, "weights_sha256": ckpt.weights_sha256,
                   "name_or_path": ckpt.config.get("_name_or_path"), **(hub or {})},
        "architecture": ckpt.arch.to_dict(),
        "context_length": context_length,
        "quantization": quantization,
        "tokenizer": tokenizer,
        "target": target,
        "recipe": recipe,
        "parity": None,
    }
    if extra:
        m.update(extra)
    return m
