"""Chat templates: the bundled files and a sandboxed, time- and size-limited Jinja renderer."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from importlib import resources
from types import FrameType
from typing import Any

from ..errors import QwenEdgeError, first_line

TEMPLATE_TIME_BUDGET_S = 2.0
TEMPLATE_MAX_OUTPUT_CHARS = 1_000_000


class TemplateError(QwenEdgeError, ValueError):
    """A chat template failed to compile or render, ran too long, produced too much, or touched internals."""


def template_names() -> list[str]:
    """Names of the chat templates bundled in `qwen_edge/templates`."""
    root = resources.files("qwen_edge") / "templates"
    return sorted(p.name[: -len(".jinja")] for p in root.iterdir() if p.name.endswith(".jinja"))


def load_template(name: str) -> str:
    """The bundled chat template `name` (`qwen2`, `qwen2_5`, `qwen3`), as Jinja source."""
    path = resources.files("qwen_edge") / "templates" / f"{name}.jinja" if name.replace("_", "").isalnum() else None
    if path is None or not path.is_file():
        raise QwenEdgeError(f"unknown chat template {name!r} (bundled: {', '.join(template_names())})")
    return path.read_text(encoding="utf-8")


class _RenderDeadline(BaseException):
    """Raised from the trace hook; a BaseException so template machinery cannot swallow it."""


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\d*)(?:\.(\d*))?")
_BRACE_SPEC = re.compile(r"\{[^{}]*:([^{}]*)\}")


def _format_widths(fmt: str) -> list[int]:
    """Widths and precisions named in the %-style and {}-style conversion specs of a format string."""
    widths = [int(d) for m in _PERCENT_SPEC.finditer(fmt) for d in m.groups() if d]
    widths += [int(d) for m in _BRACE_SPEC.finditer(fmt) for d in re.findall(r"\d+", m.group(1))]
    return widths


@functools.lru_cache(maxsize=1)
def _sandbox() -> Any:
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    import jinja2.runtime
    import jinja2.utils
    from jinja2.compiler import CodeGenerator
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    cap = TEMPLATE_MAX_OUTPUT_CHARS
    sized = (str, bytes, list, tuple)

    def check_size(n: int, what: str) -> None:
        if n > cap:
            raise SecurityError(f"{what} too large for a chat template ({n} > {cap})")

    def check_result(value: Any, what: str) -> Any:
        if isinstance(value, sized):
            check_size(len(value), what)
        return value

    def check_format(fmt: Any) -> None:
        if isinstance(fmt, str):
            for width in _format_widths(fmt):
                check_size(width, "format width")

    def estimate_replace(s: Any, old: Any, new: Any) -> None:
        if isinstance(s, str) and isinstance(old, str) and isinstance(new, str):
            count = s.count(old) if old else len(s) + 1
            check_size(len(s) + count * max(0, len(new) - len(old)), "replacement")

    def precheck_str_method(owner: str, name: str, args: tuple[Any, ...]) -> None:
        if name in ("center", "ljust", "rjust", "zfill") and args and isinstance(args[0], int):
            check_size(args[0], f"str.{name} width")
        elif name == "expandtabs":
            check_size(len(owner) * (args[0] if args and isinstance(args[0], int) else 8), "expandtabs")
        elif name == "replace" and len(args) >= 2:
            estimate_replace(owner, args[0], args[1])
        elif name == "join" and args and isinstance(args[0], (list, tuple)):
            check_size(sum(len(x) for x in args[0] if isinstance(x, str)) + len(owner) * len(args[0]), "join")
        elif name in ("format", "format_map"):
            check_format(owner)

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (HF's assistant-mask marker) renders its body unchanged."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    class Namespace(jinja2.utils.Namespace):
        """`namespace()` that refuses underscore-prefixed attribute names and oversized values."""

        def __init__(*args: Any, **kwargs: Any) -> None:  # `self` travels in args, as in jinja2
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for key, value in attrs.items():
                Namespace._check(key, value)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            Namespace._check(name, value)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any, value: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise SecurityError(f"namespace attribute {name!r} is not allowed")
            check_result(value, "namespace value")

    class SizeCheckedCodeGenerator(CodeGenerator):
        def visit_Concat(self, node: Any, frame: Any) -> None:  # `a ~ b`: size-checked before joining
            self.write("environment.checked_concat((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    class Env(ImmutableSandboxedEnvironment):
        code_generator_class = SizeCheckedCodeGenerator
        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
            raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

        def checked_concat(self, parts: tuple[Any, ...]) -> str:
            strs = [str(p) for p in parts]
            check_size(sum(len(s) for s in strs), "concatenation")
            return "".join(strs)

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
                if right * math.log2(abs(left)) > 128:  # chat templates have no use for huge integers
                    raise SecurityError("integer power too large for a chat template")
            elif operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, sized) and isinstance(n, int):
                        check_size(len(seq) * n, "repetition")
            elif operator == "+" and isinstance(left, sized) and isinstance(right, sized):
                check_size(len(left) + len(right), "concatenation")
            elif operator == "%":
                check_format(left)
            return check_result(super().call_binop(context, operator, left, right), "value")

        def wrap_str_format(self, value: Any) -> Any:  # `'...'.format(...)`: check the spec widths up front
            wrapped = super().wrap_str_format(value)
            if wrapped is not None:
                check_format(value.__self__)
            return wrapped

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # jinja2's signature
            owner = getattr(__obj, "__self__", None)
            if isinstance(owner, str):
                precheck_str_method(owner, getattr(__obj, "__name__", ""), args)
            return check_result(super().call(__context, __obj, *args, **kwargs), "call result")

    def guard_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            plain = [a for a in args if not isinstance(a, (jinja2.runtime.Context, jinja2.nodes.EvalContext))]
            plain = [a for a in plain if not isinstance(a, jinja2.Environment)]
            if name == "center" and len(plain) > 1 and isinstance(plain[1], int):
                check_size(plain[1], "center width")
            elif name == "indent" and plain and isinstance(plain[0], str):
                width = plain[1] if len(plain) > 1 else kwargs.get("width", 4)
                per_line = width if isinstance(width, int) else len(str(width))
                check_size(len(plain[0]) + (plain[0].count("\n") + 1) * per_line, "indent")
            elif name == "format" and plain:
                check_format(plain[0])
            elif name == "replace" and len(plain) >= 3:
                estimate_replace(plain[0], plain[1], plain[2])
            return check_result(func(*args, **kwargs), f"filter {name!r} result")

        return guarded

    def raise_exception(message: str) -> None:
        raise TemplateError(f"chat template raised: {message}")

    def tojson(
        x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
    ) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    def make_dict(*args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    env = Env(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.filters = {name: guard_filter(name, f) for name, f in env.filters.items()}
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = make_dict
    env.globals["namespace"] = Namespace
    return env


@functools.lru_cache(maxsize=32)
def _compile(source: str) -> Any:
    if len(source) > TEMPLATE_MAX_OUTPUT_CHARS:
        raise TemplateError(f"chat template source exceeds {TEMPLATE_MAX_OUTPUT_CHARS} characters")
    try:
        return _sandbox().from_string(source)
    except Exception as e:  # jinja2.TemplateSyntaxError and anything the parser or optimizer trips on
        line = getattr(e, "lineno", None)
        where = f" (line {line})" if line else ""
        raise TemplateError(f"chat template does not compile{where}: {first_line(e)}") from None


@contextlib.contextmanager
def _deadline(budget_s: float) -> Iterator[None]:
    """Abort the Python code run inside (this thread only) once `budget_s` has passed: TemplateError."""
    deadline = time.monotonic() + budget_s
    ticks = 0

    def tracer(frame: FrameType, event: str, arg: Any) -> Callable[..., Any]:
        nonlocal ticks
        ticks += 1
        if ticks & 63 == 0 and time.monotonic() > deadline:
            raise _RenderDeadline
        return tracer

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        yield
        if time.monotonic() > deadline:
            raise _RenderDeadline
    except _RenderDeadline:
        raise TemplateError(f"chat template exceeded its {budget_s:g} s time budget") from None
    finally:
        sys.settrace(previous)


def render_template(
    source: str,
    context: Mapping[str, Any],
    *,
    time_budget_s: float = TEMPLATE_TIME_BUDGET_S,
    max_output_chars: int = TEMPLATE_MAX_OUTPUT_CHARS,
) -> str:
    """Render a chat template in the sandbox; TemplateError on any failure, on overrunning time or output size."""
    chunks: list[str] = []
    size = 0
    _sandbox()  # build the environment (imports jinja2) outside the time budget
    with _deadline(time_budget_s):
        try:
            template = _compile(source)
            for chunk in template.generate(**context):
                size += len(chunk)
                if size > max_output_chars:
                    raise TemplateError(f"chat template output exceeds {max_output_chars} characters")
                chunks.append(chunk)
        except TemplateError as e:
            raise TemplateError(first_line(e)) from None
        except RecursionError:
            raise TemplateError("chat template recursed too deeply") from None
        except Exception as e:  # UndefinedError, SecurityError, OverflowError, TypeError, ...
            raise TemplateError(f"chat template failed: {type(e).__name__}: {first_line(e)}") from None
    return "".join(chunks)
