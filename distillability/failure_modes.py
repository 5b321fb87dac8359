"""Failure-mode taxonomy of a response [our definition, docs/method.md §5]; the first match wins:

1. ``degradation``  local decoding degradation: a token n-gram (n >= `ngram`) repeated >= `repeats`
   times in a row, or a distinct-3 ratio below `min_distinct3`, or text not well formed for the task;
2. ``self_correction``  self-correction collapse: no final answer before the length limit, or the
   same reasoning step (line/sentence) restated >= `restatements` times;
3. ``overconfident``  overconfident hallucination: a wrong final answer whose mean token probability
   over the answer span is >= `confident_prob`;
4. ``wrong``; 5. ``correct``.

Tokens here are the words, numbers and single punctuation marks of the text (a model-free
tokenisation, so that responses of models with different tokenizers are judged alike).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

MODES = ("degradation", "self_correction", "overconfident", "wrong", "correct")
_TOKEN = re.compile(r"\d|[^\W\d_]+|[^\w\s]")


@dataclass
class FailureThresholds:
    ngram: int = 3
    repeats: int = 4
    min_distinct3: float = 0.3
    restatements: int = 3
    confident_prob: float = 0.8


def text_tokens(text: str) -> list[str]:
    return _TOKEN.findall(text)


def max_consecutive_repeats(tokens: list[str], n_min: int = 3, n_max: int = 8) -> int:
    """The largest number of back-to-back copies of any n-gram, n in [n_min, n_max]."""
    best = 1
    L = len(tokens)
    for n in range(n_min, min(n_max, L // 2) + 1):
        for start in range(0, L - 2 * n + 1):
            reps = 1
            pos = start + n
            while pos + n <= L and tokens[pos:pos + n] == tokens[start:start + n]:
                reps += 1
                pos += n
            best = max(best, reps)
    return best


def distinct_n(tokens: list[str], n: int = 3) -> float:
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def max_restatements(text: str) -> int:
    steps = [s.strip() for s in re.split(r"[\n.;]|, ", text) if len(s.strip()) >= 3]
    return max(Counter(steps).values()) if steps else 0


def classify(response: str, *, correct: bool, has_answer: bool, finished: bool = True,
             well_formed: bool = True, answer_prob: float | None = None,
             thresholds: FailureThresholds | None = None) -> str:
    """The failure mode of one response (see the module docstring)."""
    th = thresholds or FailureThresholds()
    toks = text_tokens(response)
    if (max_consecutive_repeats(toks, th.ngram) >= th.repeats or (len(toks) >= 12 and distinct_n(toks) < th.min_distinct3)
            or (has_answer and not well_formed)):
        return "degradation"
    if not has_answer or max_restatements(response) >= th.restatements:
        return "self_correction"
    if correct:
        return "correct"
    if answer_prob is not None and answer_prob >= th.confident_prob:
        return "overconfident"
    return "wrong"
