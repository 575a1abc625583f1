"""Messages and progress: the `qwen_edge` logger (the CLI's -v/-q), and progress bars on a terminal only.

A library user sees nothing from qwen-edge until they configure logging themselves (the `qwen_edge` logger has no
handler of its own); the CLI calls `configure()`. Progress bars appear only after `configure()`, only when stderr
is a terminal and only at the default or verbose level, so piped output, `--json` and `-q` stay clean.
"""

from __future__ import annotations

import logging
import sys
from typing import Iterable, Iterator, TypeVar


T = TypeVar("T")

logger = logging.getLogger("qwen_edge")

QUIET, NORMAL, VERBOSE = -1, 0, 1
_bars = False


def configure(verbosity: int = NORMAL, *, bars: bool | None = None) -> None:
    """Send the `qwen_edge` logger to stderr: `QUIET` errors only, `NORMAL` what the CLI says (info), `VERBOSE`
    everything (debug, llama.cpp's own log included). Progress bars when stderr is a terminal (or `bars`)."""
    global _bars
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s" if verbosity >= VERBOSE else "%(message)s"))
    for old in list(logger.handlers):
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(logging.ERROR if verbosity <= QUIET else logging.DEBUG if verbosity >= VERBOSE else logging.INFO)
    tty = _isatty()
    _bars = (tty if bars is None else bars) and verbosity > QUIET
    if not _bars:
        try:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()  # hub downloads: huggingface_hub's own bars follow ours
        except ImportError:
            pass


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever `sys.stderr` is when a message is logged (a test's capture, an app's redirect)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def _isatty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _shape() -> dict[str, int]:
    """The terminal's size for tqdm ($COLUMNS/$LINES first). A new pseudo-terminal reports 0 x 0, and tqdm hides
    every bar beyond the screen's height: fall back to 80 x 24 there."""
    import shutil

    size = shutil.get_terminal_size((80, 24))
    return {"ncols": size.columns or 80, "nrows": size.lines or 24}


def say(message: str) -> None:
    """One line of what the CLI is doing (hidden by -q)."""
    logger.info(message)


def progress(items: Iterable[T], *, total: int | None = None, desc: str = "", unit: str = "it",
             unit_scale: bool = False) -> Iterator[T]:
    """`items`, with a progress bar on stderr when bars are on (see `configure`); otherwise just `items`."""
    if not _bars:
        yield from items
        return
    from tqdm import tqdm

    with tqdm(items, total=total, desc=desc, unit=unit, unit_scale=unit_scale, leave=False, file=sys.stderr,
              **_shape()) as bar:
        yield from bar


class ByteProgress:
    """A bar over bytes (hashing, reading): `update(n)` per chunk; a no-op when bars are off."""

    def __init__(self, total: int, desc: str, *, min_bytes: int = 64 << 20):
        self.bar = None
        if _bars and total >= min_bytes:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False,
                            file=sys.stderr, **_shape())

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> "ByteProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

