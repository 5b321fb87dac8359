"""What an attacker or a defender does with a teacher's samples before a student trains on them.

- `pick_per_prompt`: of each prompt's samples keep the one a score ranks first (highest or lowest).
- `likelihood_per_char`: a model's log-likelihood of each response per character (any tokenizer: each pair is
  re-encoded with the scoring model's own tokenizer), the score of both filters below.
- The attacker's best-of-n (`distill.keep_most_likely`): n samples per prompt, keep the verified-correct one that
  the attacker's own student base finds most likely: the adaptive attack on a calibration that made the
  teacher's samples unlikely for small models.
- The defender's `least_likely`: the teacher answers each prompt with the correct sample of `m` that its own
  small model (the calibration proxy) finds least likely, and always that one (best-of-n on it gains nothing).
- The defender's `answer_only`: the chain of thought removed, only the final answer returned.
"""

from __future__ import annotations

from collections.abc import Sequence

from .scoring import normalise, sequence_logprobs


def pick_per_prompt(rows: Sequence[dict], scores: Sequence[float], highest: bool = True,
                    prefer_correct: bool = True) -> list[dict]:
    """One row per prompt (in order of first appearance): the one whose score ranks first (ties: the earliest).
    With `prefer_correct`, rows marked correct (`correct` >= 1) outrank every incorrect one of their prompt."""
    if len(rows) != len(scores):
        raise ValueError(f"{len(rows)} rows but {len(scores)} scores")
    best: dict[str, tuple[tuple, int]] = {}
    for i, (row, score) in enumerate(zip(rows, scores)):
        correct = float(row.get("correct", 0) or 0) >= 1.0 if prefer_correct else True
        key = (correct, score if highest else -score)
        prompt = row["prompt"]
        if prompt not in best or key > best[prompt][0]:
            best[prompt] = (key, i)
    return [rows[i] for _, i in best.values()]


def likelihood_per_char(model, tokenizer, rows: Sequence[dict], use_chat_template: bool = False,
                        autocast: bool = False, batch_size: int = 32) -> list[float]:
    """log p(response | prompt) / characters of the response, for each row, under `model`."""
    if not rows:
        return []
    out = sequence_logprobs(model, tokenizer, [r["prompt"] for r in rows], [r["response"] for r in rows],
                            add_eos=[bool(r.get("finished", True)) for r in rows], use_chat_template=use_chat_template,
                            batch_size=batch_size, autocast=autocast)
    return normalise(out["logprob"], [r["response"] for r in rows], out["num_tokens"], "char").tolist()


def answer_only(task, examples_by_prompt: dict, rows: Sequence[dict]) -> list[dict]:
    """Each response cut to its final answer (` #### ANSWER`), re-scored; a response with no answer the task can
    read becomes empty (the throttled API returns nothing usable)."""
    out = []
    for r in rows:
        example = examples_by_prompt[r["prompt"]]
        answer = task.extract(example, r["response"])
        response = f" #### {answer}" if answer is not None else ""
        out.append({**r, "response": response, "correct": task.score(example, response) if response else 0.0})
    return out
