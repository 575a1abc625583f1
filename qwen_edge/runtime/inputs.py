"""Files the user names (messages, schemas, tools, grammars): read as UTF-8 text or JSON, or one-line errors naming the
file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import QwenEdgeError


def read_json(path: str | Path) -> Any:
    """A JSON document from a UTF-8 file (messages, schema, tools), or a one-line QwenEdgeError naming the file."""
    p = Path(path)
    try:
        return json.loads(read_text(p))
    except json.JSONDecodeError as e:
        raise QwenEdgeError(f"{p}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise QwenEdgeError(f"{p}: JSON nested too deeply") from None


def read_text(path: str | Path) -> str:
    """A UTF-8 text file (a grammar), or a one-line QwenEdgeError naming the file."""
    p = Path(path)
    try:
        return p.read_bytes().decode("utf-8")
    except OSError as e:
        raise QwenEdgeError(f"{p}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise QwenEdgeError(f"{p}: not valid UTF-8 (byte {e.start})") from None
