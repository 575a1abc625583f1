"""Regenerate tests/data/tokenizer_corpus.json (deterministic): python tests/data/make_tokenizer_corpus.py."""

from __future__ import annotations

import json
import random
import unicodedata
from pathlib import Path

ENGLISH = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure you'll agree it's what they've said we'd do.",
    "IT'S WHAT THEY'VE SAID: WE'D, WE'LL, I'M, YOU'RE, DON'T, HE'S.",
    "JOHN'S CAT'S TOY; Mary'S book; they'Re 'll 'VE 'M 'D 'T",
    "'s 't 're 've 'm 'll 'd at the start",
    "A sentence with trailing spaces   ",
    "   leading spaces and a tab\tin the middle",
    "Punctuation!!! ??? ... --- *** ### @@@ $$$ %%% ^^^ &&& ((( ))) [[[ ]]]",
    "Email: someone@example.com, URL: https://example.org/path?q=1&r=two#frag",
    "Contractions mixed: isn't, aren't, wasn't, couldn't, shouldn't've, y'all'd've",
    "Quotes: \"double\" 'single' `backtick` «guillemets» „low-high“ ‘curly’",
    "Hyphenated-words and en–dash and em—dash and minus − sign",
    "Ellipsis… and non-breaking\u00a0space and thin\u2009space and zero\u200bwidth",
    "CamelCaseIdentifier snake_case_identifier SCREAMING_SNAKE kebab-case",
]

CHINESE = [
    "你好，世界！",
    "通义千问是阿里云研发的大语言模型。",
    "机器学习和深度学习正在改变世界，人工智能的发展日新月异。",
    "今天天气很好，我们去公园散步吧。",
    "《红楼梦》是中国古典四大名著之一。",
    "繁體中文：這是一個測試句子，包含標點符號。",
]

THAI = [
    "สวัสดีครับ ยินดีต้อนรับ",
    "ภาษาไทยไม่มีการเว้นวรรคระหว่างคำ",
    "โมเดลภาษาขนาดใหญ่สามารถเข้าใจและสร้างข้อความได้",
    "กรุงเทพมหานคร อมรรัตนโกสินทร์ มหินทรายุธยา",
    "น้ำ ก็ ไม่ ได้ ไหล่ เก้า ผู้ใหญ่",
]

JAPANESE = [
    "こんにちは、世界！",
    "日本語の文章にはひらがな、カタカナ、漢字が含まれます。",
    "東京タワーは１９５８年に完成しました。",
    "ｶﾀｶﾅ半角とカタカナ全角",
]

KOREAN = [
    "안녕하세요, 세계!",
    "한국어 문장은 띄어쓰기를 사용합니다.",
    "대한민국의 수도는 서울입니다.",
]

ARABIC = [
    "مرحبا بالعالم",
    "اللغة العربية تكتب من اليمين إلى اليسار.",
    "هذا نص عربي مع أرقام ١٢٣٤٥ و 12345.",
    "שלום עולם — עברית",
]

RUSSIAN = [
    "Привет, мир!",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "ЗАГЛАВНЫЕ БУКВЫ И строчные буквы",
    "Ελληνικά: Γειά σου Κόσμε",
]

OTHER_SCRIPTS = [
    "हिन्दी भाषा देवनागरी लिपि में लिखी जाती है।",
    "বাংলা ভাষা",
    "தமிழ் மொழி",
    "ქართული ენა",
    "Հայերեն լեզու",
    "Tiếng Việt có dấu: Người Việt Nam",
    "Türkçe: İstanbul, ığdır, şğüöç",
    "Ελληνικά με τόνους: άέήίόύώ",
    "አማርኛ ቋንቋ",
    "ᠮᠣᠩᠭᠣᠯ",
]

EMOJI = [
    "😀😃😄😁😆😅🤣😂",
    "Family: 👨\u200d👩\u200d👧\u200d👦 and couple 👩\u200d❤\ufe0f\u200d👨",
    "Skin tones: 👍🏻 👍🏼 👍🏽 👍🏾 👍🏿",
    "Flags: 🇹🇭 🇨🇳 🇯🇵 🇺🇸 🇬🇧 🏳\ufe0f\u200d🌈",
    "Professions: 👩🏽\u200d💻 🧑🏿\u200d🚀 👨🏻\u200d🍳",
    "Keycaps: 1\ufe0f\u20e3 #\ufe0f\u20e3 *\ufe0f\u20e3",
    "emoji🙂inside😉words",
    "🤖 Robots love 🔥 and ✨sparkles✨",
]

CODE = [
    "def add(a, b):\n\treturn a + b\n",
    "for (int i = 0; i < n; ++i) {\n\t\tsum += a[i];\n\t}\n",
    "if __name__ == \"__main__\":\n    main()\n",
    "class Foo:\n    def __init__(self, x: int) -> None:\n        self.x = x\n\n"
    "    def __repr__(self):\n        return f\"Foo({self.x!r})\"\n",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name DESC;",
    "const f = (x) => { return x ** 2; };\r\nconsole.log(f(3));\r\n",
    "<html>\n  <body>\n    <p class=\"x\">Hi &amp; bye</p>\n  </body>\n</html>",
    "{\"key\": [1, 2, 3], \"nested\": {\"a\": null, \"b\": true}}",
    "#include <stdio.h>\nint main(void) {\n    printf(\"%d\\n\", 42);\n    return 0;\n}\n",
    "fn main() {\n    let v: Vec<u32> = (0..10).collect();\n    println!(\"{:?}\", v);\n}\n",
    "    \t  \t mixed tabs and spaces\t\t\n",
    "x=1;y=2;z=x*y//3%4**5",
    "$ ls -la | grep '^d' && echo \"done\" >> /tmp/log.txt 2>&1",
]

WHITESPACE = [
    " ",
    "  ",
    "    ",
    "\t",
    "\n",
    "\n\n",
    "\r\n",
    "\r\n\r\n",
    "a  b   c    d     e",
    "line1\nline2\r\nline3\rline4",
    "trailing newlines\n\n\n",
    "\n\n\nleading newlines",
    "spaces then newline   \n   spaces after",
    "tab\t\ttab\t\t\ttab",
    "               many spaces               ",
    " \n \n \n ",
    "\u3000ideographic\u3000space\u3000",
    "a\u2028line separator\u2029paragraph",
]

NUMBERS = [
    "0",
    "12",
    "123",
    "1234",
    "1234567890",
    "3.14159265358979323846264338327950288419716939937510",
    "Phone: +1 (555) 123-4567, ext. 89",
    "Price: $1,234,567.89 or €9.99 or ¥100000 or ฿250",
    "2024-01-15T12:34:56Z",
    "IPv4 192.168.0.1 and IPv6 2001:db8::ff00:42:8329",
    "Roman numerals Ⅻ and fractions ½ ¾ and superscripts x² y³",
    "Full-width digits ０１２３４５６７８９",
    "Thai digits ๐๑๒๓๔๕๖๗๘๙",
    "99999999999999999999999999999999999999999",
]

MIXED = [
    "Qwen2.5 是一个 large language model，支持 29 种以上的语言。",
    "ภาษาไทย mixed with English และ 中文 กับ 日本語",
    "Русский text with English words и цифры 123",
    "emoji🇹🇭ไทย中文English123",
    "The word 'café' in French, 'naïve' in English, and 'Zürich' in German.",
    "Math: ∀x∈ℝ, ∃y: x²+y²≥0 ⇒ √(x²) = |x|",
    "Arrows → ← ↑ ↓ ⇐ ⇒ and boxes ┌─┐│└┘",
    "<|im_start|> is not parsed here",
    "Math alphabets 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕄𝕒𝕥𝕙 𝒮𝒸𝓇𝒾𝓅𝓉 and rare CJK 𠀀𠀁𪚥𰻞",
    "Astral symbols 𓀀𓁐 𝄞 🜁 and a lone private-use \ue000 char",
]

# Strings written in decomposed form (NFD) so the NFC normalizer has work to do.
NFD = [
    unicodedata.normalize("NFD", s)
    for s in [
        "café résumé naïve Zürich",
        "Ångström ÅÄÖ åäö",
        "Tiếng Việt: Người Việt Nam yêu hòa bình",
        "한국어 자모 분해",
        "é è ê ë ē ė ę",
        "ñandú pingüino",
    ]
] + [
    "e\u0301 a\u0300 o\u0302 u\u0308",  # combining marks after base letters
    "a\u0328\u0301 combining stack",
    "Z\u0351\u0364\u036b\u0347\u0339 zalgo-ish",
    "\u0301 leading combining mark",
]


def long_strings(rng: random.Random, pools: list[list[str]]) -> list[str]:
    out = []
    flat = [s for pool in pools for s in pool]
    for n in range(8):
        parts = []
        while sum(len(p) for p in parts) < 1000 + 300 * n:
            parts.append(rng.choice(flat))
            parts.append(rng.choice([" ", "\n", "", "  ", "\t", "\r\n", "\n\n"]))
        out.append("".join(parts))
    out.append("a" * 1500)
    out.append(" " * 1200 + "x")
    out.append("\n" * 1100)
    out.append("ไทย" * 400)
    out.append("1234567890" * 120)
    out.append("😀" * 300)
    return out


def mixtures(rng: random.Random, pools: list[list[str]], count: int) -> list[str]:
    flat = [s for pool in pools for s in pool]
    out = []
    for _ in range(count):
        k = rng.randint(2, 4)
        seps = [" ", "", "\n", "  ", "\t", "\r\n", ", "]
        out.append("".join(rng.choice(flat) + rng.choice(seps) for _ in range(k)))
    return out


def corpus() -> list[str]:
    rng = random.Random(20250101)
    pools = [ENGLISH, CHINESE, THAI, JAPANESE, KOREAN, ARABIC, RUSSIAN, OTHER_SCRIPTS, EMOJI, CODE, WHITESPACE,
             NUMBERS, MIXED, NFD]
    base = [s for pool in pools for s in pool]
    strings = base + mixtures(rng, pools, 260 - len(base)) + long_strings(rng, pools)
    seen: set[str] = set()
    unique = []
    for s in strings:
        if s not in seen:
            seen.add(s)
            unique.append(s)
    return unique


def main() -> None:
    path = Path(__file__).with_name("tokenizer_corpus.json")
    data = corpus()
    path.write_text(json.dumps(data, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    print(f"wrote {len(data)} strings to {path}")


if __name__ == "__main__":
    main()
