"""Real-looking captions with the oddities of scraped alt text, for the tokenizer tests and the speed script.

`captions(n, seed)` joins a plain caption (COCO-like or product-title-like) with random pieces that cleaning must
handle: curly quotes, full-width letters, ligatures, mojibake, nested HTML entities, emoji, composed and decomposed
accents, CJK / Arabic / other scripts, numbers with separators, URLs, hashtags, @mentions, upper-case contractions,
odd whitespace, zero-width and control characters; some are very long (truncation) and some blank.
"""

import random

PLAIN = (
    "a photo of a goldfish.",
    "A man riding a wave on top of a surfboard.",
    "Two dogs playing with a frisbee in the park",
    "The kitchen is clean and ready for us to see.",
    "a close-up of a red flower with water drops",
    "Vintage leather handbag, brown, women's, size M",
    "Aerial view of the city at sunset",
    "an old black and white picture of a train station",
    "Portrait of a smiling woman wearing a hat",
    "Stock photo: business people shaking hands in an office",
)


def _mojibake(text: str, codec: str) -> str:
    """UTF-8 bytes read back with a one-byte codec, as broken web pipelines do ("café" -> "cafÃ©")."""
    return text.encode("utf-8").decode(codec, errors="replace")


# Grouped by kind, several to a line.
# fmt: off
PIECES = (
    # curly quotes and apostrophes
    "don’t", "it’s", "‘single’", "“double quoted”", "we’re", "L’Oréal", "„German“", "«French»",
    # full-width letters and digits, ligatures
    "Ｆｕｌｌ ｗｉｄｔｈ", "ＣＡＴ", "１２３", "ﬁsh", "ﬂower", "oﬃce", "ﬀ", "Ǆ", "ĳ",
    # mojibake (UTF-8 read as Latin-1 / Windows-1252)
    "cafÃ©", _mojibake("crème brûlée", "latin-1"), _mojibake("naïve façade", "cp1252"),
    _mojibake("don’t", "cp1252"), _mojibake("“quoted”", "cp1252"), _mojibake("日本", "latin-1"),
    # HTML entities, escaped once, twice and three times
    "Tom &amp; Jerry", "&amp;amp;", "rock &amp;amp; roll", "&amp;amp;amp; triple", "&quot;classic&quot;",
    "it&#39;s", "&lt;b&gt;bold&lt;/b&gt;", "&amp;lt;1940&amp;gt;", "a&nbsp;b", "&#x2019;", "&eacute;t&eacute;",
    "&ndash; size XL", "<b>tag</b>", "5 &lt; 6 &gt; 4",
    # with a tag in the line ftfy leaves entities alone, and only the two later unescapes run
    "<i>cafe&#769;</i>", "<p>&amp;amp;</p>", "<br>&amp;amp;amp;",
    # emoji (modifiers, joiners, flags)
    "🐱", "😂😂", "👍🏽", "👨‍👩‍👧", "🇫🇷", "❤️", "✨new✨",
    # accents composed and decomposed
    "café", "cafe\u0301", "Ångström", "A\u030angstro\u0308m", "crème brûlée", "naïve façade", "ßtraße",
    "İstanbul", "ǅ", "e&#769;",
    # other scripts
    "東京タワーの夜景", "北京烤鸭", "서울의 밤", "مرحبا بالعالم", "صورة قطة", "שלום", "नमस्ते", "สวัสดี",
    "Москва — столица", "Ελλάδα",
    # numbers with separators, units, prices, dates
    "1,000,000", "3.14", "12:30", "2024-01-05", "$19.99", "50% off", "1 234,56 €", "١٢٣", "½ cup", "x²",
    "3840x2160", "Ⅻ", "No. 5",
    # URLs, hashtags, mentions, file names
    "https://example.com/images/IMG_2034.JPG?w=800&h=600", "www.site.org", "#sunset", "#NoFilter",
    "@john_doe", "IMG_0001.jpeg", "foo@bar.com",
    # contractions, also upper case and curly
    "DON'T", "IT'S", "WE'RE", "I'LL", "YOU'VE", "HE'D", "I'M", "DON’T", "rock'n'roll", "'quoted'", "dogs'",
    # odd whitespace, zero-width and control characters
    "\t", "\n", "\r\n", "\u00a0", "\u2003", "\u3000", "\u2028", "  ", "\u200b", "\u200c", "\u200d", "\ufeff",
    "\u2060", "\x1b[31mred\x1b[0m", "\x00", "\x7f", "\u00ad",
)
# fmt: on
SEPARATORS = (" ", " ", " ", "", ", ", " - ", "\t", "  ", "\n")
BLANK = ("", " ", "   ", "\t\n", "\u00a0", "\u3000 \u2003", "&nbsp;")


def captions(n: int, seed: int = 0) -> list[str]:
    """`n` captions: mostly a plain caption with 1-6 pieces, some very long (truncation), some blank."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if i % 25 == 0:
            out.append(BLANK[(i // 25) % len(BLANK)])
            continue
        parts = [rng.choice(PLAIN)] + [rng.choice(PIECES) for _ in range(rng.randint(1, 6))]
        rng.shuffle(parts)
        if i % 10 == 3:  # long scraped descriptions: more than 77 tokens
            parts = parts * rng.randint(8, 20)
        text = parts[0]
        for part in parts[1:]:
            text += rng.choice(SEPARATORS) + part
        out.append(text.upper() if i % 17 == 5 else text)
    return out
