"""Answer extraction and verifiers: a response and a reference in, a reward in [0, 1] out.

Model output is only ever parsed with bounded regular expressions; nothing is passed to `eval`.
"""

from __future__ import annotations

import re
from fractions import Fraction

MAX_ANSWER_CHARS = 64  # anything longer is not a number we compare; bounds the work per response

_NUM = r"-?\$?\d[\d,]*(?:\.\d+)?(?:/\d+)?"
_MARKER = re.compile(r"####\s*(" + _NUM + r")")
_BOXED = re.compile(r"\\boxed\{([^{}]{1,64})\}")
_ANSWER_IS = re.compile(r"answer is:?\s*\$?\(?(" + _NUM + r")")
_LAST_NUM = re.compile(_NUM)
_FRAC = re.compile(r"^\\[dt]?frac\{(-?\d+)\}\{(\d+)\}$")


def parse_number(text: str | None) -> Fraction | None:
    """Exact value of a numeric answer: '1,234', '$5', '-3.50', '3/4', '\\frac{3}{4}'; else None."""
    if text is None:
        return None
    s = text.strip().replace(",", "").replace("$", "").rstrip(".")
    if not s or len(s) > MAX_ANSWER_CHARS:
        return None
    m = _FRAC.match(s)
    if m:
        return Fraction(int(m.group(1)), int(m.group(2)))
    try:
        if "/" in s:
            num, den = s.split("/", 1)
            return Fraction(int(num), int(den)) if int(den) != 0 else None
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def extract_math_answer(response: str, strict: bool = False) -> str | None:
    """The final numeric answer: the last `#### N`, else `\\boxed{N}`, else 'answer is N', else (unless
    strict) the last number in the text."""
    for pattern in (_MARKER, _BOXED, _ANSWER_IS):
        hits = pattern.findall(response[-4000:])
        if hits:
            return hits[-1].strip()
    if strict:
        return None
    hits = _LAST_NUM.findall(response[-4000:])
    return hits[-1] if hits else None


def math_equal(predicted: str | None, reference: str) -> bool:
    """Exact numeric comparison (as fractions), then a normalised string comparison."""
    a, b = parse_number(predicted), parse_number(reference)
    if a is not None and b is not None:
        return a == b
    if predicted is None:
        return False
    norm = lambda s: re.sub(r"\s+", "", s).lower()  # noqa: E731
    return norm(predicted) == norm(reference)


_LETTER_MARK = re.compile(r"####\s*\(?([A-J])\)?")
_LETTER_IS = re.compile(r"answer is:?\s*\(?([A-J])\)?")
_LETTER_PAREN = re.compile(r"\(([A-J])\)")
_LETTER_ALONE = re.compile(r"^\s*\(?([A-J])\)?[.:)]?\s*$")


def extract_choice(response: str, strict: bool = False) -> str | None:
    """The chosen letter: `#### B`, 'answer is (B)', else (unless strict) a last '(B)' or a lone letter."""
    tail = response[-4000:]
    for pattern in (_LETTER_MARK, _LETTER_IS) if strict else (_LETTER_MARK, _LETTER_IS, _LETTER_PAREN):
        hits = pattern.findall(tail)
        if hits:
            return hits[-1]
    if not strict:
        m = _LETTER_ALONE.match(tail)
        if m:
            return m.group(1)
    return None


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased word tokens."""
    p = re.findall(r"\w+", prediction.lower())[:2000]
    r = re.findall(r"\w+", reference.lower())[:2000]
    if not p or not r:
        return 0.0
    lcs = _lcs(p, r)
    if lcs == 0:
        return 0.0
    prec, rec = lcs / len(p), lcs / len(r)
    return 2 * prec * rec / (prec + rec)


def extract(family: str, response: str, strict: bool = False) -> str | None:
    if family == "math":
        return extract_math_answer(response, strict=strict)
    if family == "mc":
        return extract_choice(response, strict=strict)
    return response.strip() or None


def score(family: str, response: str, reference: str, strict: bool = False) -> float:
    """Reward in [0, 1] for a response to an example of `family` ('math', 'mc', 'open')."""
    if family == "math":
        return float(math_equal(extract_math_answer(response, strict=strict), reference))
    if family == "mc":
        return float(extract_choice(response, strict=strict) == reference.strip())
    if family == "open":
        return rouge_l(response, reference)
    raise ValueError(f"unknown task family {family!r}")
