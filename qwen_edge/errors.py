"""Exception types that map onto the CLI's exit codes (2: bad input, 1: a gate failed)."""

from __future__ import annotations


class QwenEdgeError(Exception):
    """Bad input or usage: the CLI prints `error: <message>` and exits 2."""

    exit_code = 2


class GateFailed(Exception):
    """A quality or speed gate failed (verify thresholds, bench budget): exit 1."""

    exit_code = 1


class NotAvailable(QwenEdgeError):
    """A capability that needs an optional dependency or hardware that is not present."""
