"""Accuracy, pass@k and the wrong-trace preference rate."""

from __future__ import annotations

import math
from collections.abc import Sequence

from .errors import ConfigError


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k) from n samples of which c are correct."""
    if not 0 < k <= n:
        raise ConfigError(f"pass@k: k={k} must be in 1..n (n={n} samples per prompt)")
    if not 0 <= c <= n:
        raise ValueError(f"pass@k: c={c} must be in 0..n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def mean_pass_at_k(correct_counts: Sequence[int], n: int, k: int) -> float:
    return sum(pass_at_k(n, c, k) for c in correct_counts) / max(1, len(correct_counts))


def wrong_trace_preference(groups: Sequence[Sequence[tuple[bool, float]]]) -> dict[str, float]:
    """Wrong-trace preference rate [our definition, docs/method.md §2].

    groups: per prompt, a list of (is_correct, score) with score the length-normalised log-likelihood
    (nats per character of the response text) a model gives the trace. Over prompts with at least one
    correct and one incorrect trace, the fraction of (correct, incorrect) pairs in which the incorrect
    trace scores higher (ties count one half).
    """
    pairs = wins = 0.0
    prompts = 0
    for g in groups:
        good = [s for ok, s in g if ok]
        bad = [s for ok, s in g if not ok]
        if not good or not bad:
            continue
        prompts += 1
        for sg in good:
            for sb in bad:
                pairs += 1
                wins += 1.0 if sb > sg else 0.5 if sb == sg else 0.0
    return {"rate": wins / pairs if pairs else float("nan"), "pairs": int(pairs), "prompts": prompts}


def group_by_prompt(num_prompts: int, prompt_index: Sequence[int], correct: Sequence[bool],
                    scores: Sequence[float]) -> list[list[tuple[bool, float]]]:
    """(correct, score) of every sample, grouped by the prompt it answers: the input of wrong_trace_preference."""
    groups: list[list[tuple[bool, float]]] = [[] for _ in range(num_prompts)]
    for i, ok, s in zip(prompt_index, correct, scores):
        groups[i].append((ok, s))
    return groups


def accuracy_by_key(keys: Sequence, scores: Sequence[float]) -> dict:
    """Mean score per key (e.g. task family or answer style): {key: {"num_prompts", "greedy_accuracy"}}."""
    seen: dict = {}
    for k, s in zip(keys, scores):
        seen.setdefault(k, []).append(float(s))
    return {k: {"num_prompts": len(v), "greedy_accuracy": sum(v) / len(v)} for k, v in sorted(seen.items())}
