"""The reference cache: the PyTorch reference's logits on the evaluation text, computed once per source.

verify() compares an artifact's full-vocabulary logits with its reference checkpoint's at every position of the
evaluation windows, and the artifact's greedy runs with the reference's. That reference is deterministic in its
inputs, so a matrix of quantizations of one source (or a CI re-run) need not recompute it: an entry holds

- `<key>.npy`: the reference's logits at every position of every window, float32, (positions, vocab): the exact
  values the uncached path feeds the gates (max/mean abs logit error and KL need the full distribution at every
  position; a top-k form would change them). The fidelity checkpoint's and Qwen2.5-0.5B's 2,348 positions x
  151,936 tokens take 1.43 GB; nothing compressible in float32 logits is worth the CPU time it costs.
- `<key>.json`: the key's inputs (echoed and compared on read), the array's shape and sha256, the window lengths,
  the greedy continuations with their top-2 margins, and the reference backend's name.

The key is the sha256 of everything that changes the reference: the source's weights (sha256) and config files,
the adapters merged on it, the evaluation text, its windows' and greedy prompts' token ids, the greedy length, the
reference dtype, the torch and transformers versions and CACHE_VERSION. Entries are written to temporary files and
renamed (the .json last: it commits the entry); a read checks the key echo, the shape, the window layout and the
sha256 of the logits, and an entry failing any check is recomputed and replaced (with a log line), never trusted.

Location: $QWEN_EDGE_REFERENCE_CACHE (a CI cache path), else `reference/` in the user cache (datafiles.cache_dir:
$QWEN_EDGE_CACHE_DIR, else $XDG_CACHE_HOME/qwen_edge or ~/.cache/qwen_edge). `--no-reference-cache` opts out.

Size: the directory is kept under $QWEN_EDGE_REFERENCE_CACHE_MAX_GB (default 6, four full-text entries of a Qwen
vocabulary; 0 means no limit): after an entry is stored, the least recently used ones (a hit counts as a use) are
removed until the rest fit, never the entry just stored.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .reports import Log

CACHE_VERSION = 1
ENV = "QWEN_EDGE_REFERENCE_CACHE"
MAX_ENV = "QWEN_EDGE_REFERENCE_CACHE_MAX_GB"
DEFAULT_MAX_GB = 6.0
DTYPE = "float32"
"""The reference runtime's dtype (backends.torch_ref loads checkpoints in fp32) and the cached logits'."""
_HASH_ROWS = 64


def cache_root() -> Path:
    env = os.environ.get(ENV)
    if env:
        return Path(env)
    from ..device.datafiles import cache_dir

    return cache_dir() / "reference"


def max_bytes() -> int | None:
    """The cache's size limit in bytes ($QWEN_EDGE_REFERENCE_CACHE_MAX_GB; None: no limit)."""
    from ..errors import QwenEdgeError

    raw = os.environ.get(MAX_ENV, "").strip()
    try:
        gb = float(raw) if raw else DEFAULT_MAX_GB
    except ValueError:
        raise QwenEdgeError(f"{MAX_ENV}={raw!r} is not a number of gigabytes") from None
    if gb < 0 or gb != gb:
        raise QwenEdgeError(f"{MAX_ENV}={raw!r} must be 0 (no limit) or a positive number of gigabytes")
    return None if gb == 0 else int(gb * 1024 ** 3)


def _ids_sha256(seqs: Sequence[Sequence[int]]) -> str:
    return hashlib.sha256(json.dumps([list(map(int, s)) for s in seqs]).encode()).hexdigest()


def reference_key(ref_dir: Path, weights_sha256: str, adapters: Sequence[Path], eval_sha256: str, quick: bool,
                  windows: Sequence[Sequence[int]], prompts: Sequence[Sequence[int]], greedy_tokens: int,
                  window: int) -> dict[str, Any]:
    """The inputs that determine the reference's logits and greedy runs (the cache key is their sha256); the
    versions from the installed distributions' metadata (importing torch to ask costs seconds)."""
    from importlib.metadata import version

    from ..export import source_config_sha256
    from ..model.adapters import adapter_sha256

    return {"cache_version": CACHE_VERSION, "weights_sha256": weights_sha256,
            "config_sha256": source_config_sha256(ref_dir), "adapters": [adapter_sha256(Path(a)) for a in adapters],
            "eval_text_sha256": eval_sha256, "quick": bool(quick), "window": int(window),
            "windows_sha256": _ids_sha256(windows), "prompts_sha256": _ids_sha256(prompts),
            "greedy_tokens": int(greedy_tokens), "dtype": DTYPE, "torch": version("torch"),
            "transformers": version("transformers")}


def key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _digest(a: np.ndarray) -> str:
    h = hashlib.sha256()
    for s in range(0, a.shape[0], _HASH_ROWS):
        h.update(np.ascontiguousarray(a[s:s + _HASH_ROWS]).data)
    return h.hexdigest()


@dataclass
class CachedReference:
    """A checked entry: the windows' reference logits (a read-only memory map) and the greedy runs."""

    logits: np.ndarray
    lengths: list[int]
    greedy: list[list[int]]
    margins: list[list[float]]
    backend: str
    key: str

    def window(self, i: int) -> np.ndarray:
        start = sum(self.lengths[:i])
        return self.logits[start:start + self.lengths[i]]


class ReferenceCache:
    """One cache directory; `load` returns a checked entry or None, `writer` records a new one."""

    def __init__(self, root: Path | None = None, log: Log = None):
        self.root = Path(root) if root is not None else cache_root()
        self.log = log
        max_bytes()  # a bad size limit is a one-line error before the reference is computed, not after

    def _say(self, msg: str, quiet: bool = False) -> None:
        """A log line (and the caller's `log`): a bad entry on stderr, a stored one with -v only."""
        from ..log import logger

        (logger.debug if quiet else logger.info)(msg)
        if self.log:
            self.log(msg)

    def paths(self, digest: str) -> tuple[Path, Path]:
        return self.root / f"{digest}.json", self.root / f"{digest}.npy"

    def load(self, key: dict[str, Any], lengths: Sequence[int], prompts: int) -> CachedReference | None:
        """The entry of `key` if present and sound; a corrupt or mismatched one is reported and dropped (None)."""
        digest = key_digest(key)
        meta_path, npy_path = self.paths(digest)
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if not isinstance(meta, dict) or meta.get("key") != key:
                raise ValueError("its key does not match")
            if [int(x) for x in meta["window_lengths"]] != list(lengths):
                raise ValueError("its windows differ")
            greedy = [[int(t) for t in g] for g in meta["greedy"]]
            margins = [[float(m) for m in g] for g in meta["greedy_margins"]]
            if len(greedy) != prompts or [len(g) for g in greedy] != [len(m) for m in margins] or any(
                    len(g) != key["greedy_tokens"] for g in greedy):
                raise ValueError("its greedy runs do not fit the prompts")
            logits = np.load(npy_path, mmap_mode="r")
            if logits.dtype != np.float32 or logits.ndim != 2 or logits.shape != (sum(lengths), int(meta["vocab"])):
                raise ValueError(f"its logits have shape {logits.shape} {logits.dtype}")
            if _digest(logits) != meta["sha256"]:
                raise ValueError("its logits do not match their sha256")
        except (OSError, ValueError, KeyError, TypeError, EOFError) as e:
            self._say(f"reference cache: entry {digest[:12]} in {self.root} is unusable ({e}); recomputing it")
            self.drop(digest)
            return None
        try:
            os.utime(meta_path)  # a use: the size limit removes the least recently used entries first
        except OSError:
            pass
        return CachedReference(logits, list(lengths), greedy, margins, str(meta.get("backend", "torch")), digest)

    def drop(self, digest: str) -> None:
        for p in self.paths(digest):
            try:
                p.unlink()
            except OSError:
                pass

    def trim(self, keep: str) -> None:
        """Remove the least recently used entries until the directory fits max_bytes(); `keep` (the entry just
        stored) is never removed."""
        limit = max_bytes()
        if limit is None:
            return
        entries = []
        for meta in self.root.glob("*.json"):
            digest = meta.stem
            try:
                size = sum(p.stat().st_size for p in self.paths(digest) if p.exists())
                entries.append((meta.stat().st_mtime, digest, size))
            except OSError:
                continue
        total = sum(e[2] for e in entries)
        for _, digest, size in sorted(entries):
            if total <= limit:
                break
            if digest == keep:
                continue
            self.drop(digest)
            total -= size
            self._say(f"reference cache: removed least recently used entry {digest[:12]} ({size / 1024 ** 2:.0f} MB; "
                      f"{MAX_ENV} keeps the cache under {limit / 1024 ** 3:g} GB)", quiet=True)

    def writer(self, key: dict[str, Any], lengths: Sequence[int]) -> "EntryWriter":
        return EntryWriter(self, key, list(lengths))


class EntryWriter:
    """Streams a new entry window by window into temporary files; `commit` renames them into place."""

    def __init__(self, cache: ReferenceCache, key: dict[str, Any], lengths: list[int]):
        self.cache, self.key, self.lengths = cache, key, lengths
        self.digest = key_digest(key)
        self.tmp = f".{os.getpid()}.{id(self):x}.tmp"
        self.array: np.memmap[Any, Any] | None = None
        self.pos = 0
        self.hash = hashlib.sha256()
        self.failed = ""

    def _fail(self, e: BaseException) -> None:
        self.failed = str(getattr(e, "strerror", None) or e)
        self.array = None
        self.abort()

    def add_window(self, logits: np.ndarray) -> None:
        if self.failed:
            return
        try:
            if self.array is None:
                self.cache.root.mkdir(parents=True, exist_ok=True)
                npy = self.cache.paths(self.digest)[1]
                self.array = np.lib.format.open_memmap(str(npy) + self.tmp, mode="w+", dtype=np.float32,
                                                       shape=(sum(self.lengths), logits.shape[1]))
            n = logits.shape[0]
            block = np.asarray(logits, dtype=np.float32)
            self.array[self.pos:self.pos + n] = block
            for s in range(0, n, _HASH_ROWS):
                self.hash.update(np.ascontiguousarray(block[s:s + _HASH_ROWS]).data)
            self.pos += n
        except (OSError, ValueError) as e:
            self._fail(e)

    def commit(self, greedy: Sequence[Sequence[int]], margins: Sequence[Sequence[float]], backend: str) -> bool:
        """Rename the entry into place (the .json last); False (and a log line) when it could not be written."""
        meta_path, npy_path = self.cache.paths(self.digest)
        array = self.array
        if not self.failed and (array is None or self.pos != array.shape[0]):
            self.failed = "incomplete"
        if not self.failed and array is not None:
            try:
                vocab = int(array.shape[1])
                array.flush()
                self.array = array = None
                meta = {"key": self.key, "window_lengths": self.lengths, "vocab": vocab,
                        "sha256": self.hash.hexdigest(), "greedy": [list(map(int, g)) for g in greedy],
                        "greedy_margins": [[float(m) for m in g] for g in margins], "backend": backend}
                Path(str(meta_path) + self.tmp).write_text(json.dumps(meta))
                os.replace(str(npy_path) + self.tmp, npy_path)
                os.replace(str(meta_path) + self.tmp, meta_path)
                self.cache._say(f"reference cache: stored entry {self.digest[:12]} in {self.cache.root}", quiet=True)
                self.cache.trim(keep=self.digest)
                return True
            except OSError as e:
                self._fail(e)
        self.abort()
        self.cache._say(f"reference cache: entry not stored ({self.failed})")
        return False

    def abort(self) -> None:
        self.array = None
        for p in self.cache.paths(self.digest):
            try:
                os.unlink(str(p) + self.tmp)
            except OSError:
                pass
