"""Command-line interface: parse arguments (one module per verb group), call one library function per verb, map
errors to exit codes. Library functions never see an argparse namespace."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence

from .. import __version__
from ..errors import GateFailed, NativeCrash, QwenEdgeError, first_line
from ..log import NORMAL, QUIET, VERBOSE, configure
from . import artifacts, run, serve


class _Parser(argparse.ArgumentParser):
    """argparse with the project's error contract: one line `error: ...` on stderr, exit 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


# --- parser --------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    level = common.add_mutually_exclusive_group()
    level.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="say more: debug messages, llama.cpp's own log")
    level.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                       help="print nothing on stderr but errors (stdout keeps its output)")
    ap = _Parser(prog="qwen-edge", description="Export, verify, run and benchmark small Qwen models "
                 "as ONNX and GGUF artifacts on CPU, arm64 and GPU.", parents=[common])
    ap.add_argument("--version", action="version", version=f"qwen-edge {__version__}")
    sub = ap.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True

    def add(name: str, **kw: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kw)

    artifacts.add_verbs(add)
    run.add_verbs(add)
    serve.add_verbs(add)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure(QUIET if getattr(args, "quiet", False) else VERBOSE if getattr(args, "verbose", False) else NORMAL,
              bars=False if getattr(args, "json", False) else None)
    try:
        return int(args.func(args) or 0)
    except QwenEdgeError as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    except GateFailed as e:
        print(f"failed: {e}", file=sys.stderr)
        return 1
    except NativeCrash as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except Exception as e:  # a bug, not bad input: one line unless debugging is asked for
        if os.environ.get("QWEN_EDGE_DEBUG"):
            raise
        print(f"error: internal error: {type(e).__name__}: {first_line(e)} "
              "(set QWEN_EDGE_DEBUG=1 for a traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
