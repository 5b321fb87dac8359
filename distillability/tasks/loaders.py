"""Task loaders: the tiny world, GSM8K JSONL, BIG-bench task.json, plain multiple-choice and
open-ended JSONL, and reasoning-gym generators. Any bad row is reported with file and line."""

from __future__ import annotations

import random
import re
from pathlib import Path

from ..errors import DataError
from ..io import load_records, require_field
from .base import Example, Task
from .world import WorldSpec, world_splits

LETTERS = "ABCDEFGHIJ"


def _split(rows: list[Example], num_train: int, num_eval: int, seed: int, name: str, path: str) -> tuple[list, list]:
    if not rows:
        raise DataError(f"{path}: no examples in the file (task '{name}')")
    rng = random.Random(seed)
    rows = list(rows)
    rng.shuffle(rows)
    n_eval = min(num_eval, len(rows)) if num_train == 0 else min(num_eval, max(1, len(rows) // 5))
    return rows[n_eval:n_eval + num_train], rows[:n_eval]


def gsm8k_rows(path: str, prompt_template: str = "Question: {question}\nAnswer:") -> list[Example]:
    rows = load_records(path)
    out = []
    for r in rows:
        q = require_field(r, "question", path)
        a = require_field(r, "answer", path)
        if "####" not in a:
            raise DataError(f"{path}:{r.get('__line__', '?')}: field 'answer' has no '#### <number>' line")
        ref = a.rsplit("####", 1)[1].strip().replace(",", "")
        solution = " " + re.sub(r"<<[^>]*>>", "", a).replace("\n#### ", "\n#### ").strip()
        out.append(Example(prompt=prompt_template.format(question=q.strip()), reference=ref, family="math",
                           solutions={"dataset": solution}, source=f"{path}:{r.get('__line__', '?')}"))
    return out


def _mc_prompt(question: str, choices: list[str]) -> str:
    opts = "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(choices))
    return f"Question: {question.strip()}\n{opts}\nAnswer:"


def bigbench_rows(path: str) -> list[Example]:
    """BIG-bench task.json: examples[] with `input` and `target_scores` {choice: score}."""
    p = Path(path)
    if p.is_dir():
        p = p / "task.json"
    rows = load_records(p)
    out = []
    for i, r in enumerate(rows):
        inp = r.get("input")
        scores = r.get("target_scores")
        if not isinstance(inp, str):
            raise DataError(f"{p}: example {i}: missing field 'input'")
        if not isinstance(scores, dict) or not scores:
            raise DataError(f"{p}: example {i}: missing field 'target_scores'")
        choices = list(scores)[: len(LETTERS)]
        best = max(range(len(choices)), key=lambda j: scores[choices[j]])
        letter = LETTERS[best]
        out.append(Example(prompt=_mc_prompt(inp, choices), reference=letter, family="mc",
                           solutions={"dataset": f" {choices[best]}. #### {letter}"}, source=f"{p}: example {i}"))
    return out


def mc_jsonl_rows(path: str) -> list[Example]:
    """Plain JSONL: `question`, `choices` (list), `answer` (a letter, an index or the choice text)."""
    out = []
    for r in load_records(path):
        q = require_field(r, "question", path)
        choices = require_field(r, "choices", path, list)
        ans = require_field(r, "answer", path, (str, int))
        if isinstance(ans, int):
            idx = ans
        elif ans.strip() in LETTERS[: len(choices)] and len(ans.strip()) == 1:
            idx = LETTERS.index(ans.strip())
        elif ans in choices:
            idx = choices.index(ans)
        else:
            raise DataError(f"{path}:{r.get('__line__', '?')}: field 'answer' {ans!r} matches no choice")
        if not 0 <= idx < len(choices):
            raise DataError(f"{path}:{r.get('__line__', '?')}: field 'answer' index {idx} out of range")
        out.append(Example(prompt=_mc_prompt(q, [str(c) for c in choices]), reference=LETTERS[idx], family="mc",
                           solutions={"dataset": f" {choices[idx]}. #### {LETTERS[idx]}"},
                           source=f"{path}:{r.get('__line__', '?')}"))
    return out


def open_jsonl_rows(path: str) -> list[Example]:
    """Dolly-style JSONL: `instruction`, optional `input`, `output` (the reference)."""
    out = []
    for r in load_records(path):
        ins = require_field(r, "instruction", path)
        inp = r.get("input") or r.get("context") or ""
        ref = require_field(r, "output", path)
        prompt = f"Instruction: {ins.strip()}\n" + (f"Input: {inp.strip()}\n" if inp else "") + "Response:"
        out.append(Example(prompt=prompt, reference=ref, family="open", solutions={"dataset": " " + ref.strip()},
                           source=f"{path}:{r.get('__line__', '?')}"))
    return out


def reasoning_gym_rows(name: str, size: int, seed: int) -> list[Example]:
    try:
        import reasoning_gym
    except ImportError:
        raise DataError("task 'gym:*' needs reasoning-gym: pip install 'distillability[gym]'") from None
    try:
        ds = reasoning_gym.create_dataset(name, size=size, seed=seed)
    except Exception as e:  # noqa: BLE001 - unknown generator name etc.
        raise DataError(f"reasoning-gym generator '{name}': {e}") from None
    out = []
    for item in ds:
        ans = str(item["answer"])
        family = "math" if re.fullmatch(r"-?\d+(\.\d+)?", ans.strip()) else "open"
        # generators with worked solutions (gsm_symbolic's answer_cot) give them as the reference solution
        cot = str((item.get("metadata") or {}).get("answer_cot") or "").strip()
        if cot and "####" not in cot:
            cot += f"\n#### {ans}"
        out.append(Example(prompt=f"Question: {item['question']}\nAnswer:", reference=ans, family=family,
                           solutions={"dataset": " " + (cot or f"#### {ans}")}, source=f"gym:{name}[{len(out)}]"))
    return out


def load_task(name: str, path: str | None = None, num_train: int = 1000, num_eval: int = 100, seed: int = 0,
              world: WorldSpec | None = None) -> Task:
    """A task by name:
    - `tiny-world`: synthetic math + multiple choice (no file needed);
    - `gsm8k` (path to a JSONL with question/answer), `bigbench` (path to a task.json or its folder),
      `mc` (JSONL question/choices/answer), `open` (JSONL instruction/input/output);
    - `gym:<generator>` (reasoning-gym, e.g. gym:chain_sum).
    """
    if name == "tiny-world":
        train, ev = world_splits(num_train, num_eval, seed, world)
        return Task(name=name, train=train, eval=ev, strict=True)
    if name.startswith("gym:"):
        rows = reasoning_gym_rows(name[4:], num_train + num_eval, seed)
        return Task(name, rows[num_eval:], rows[:num_eval])
    loaders = {"gsm8k": gsm8k_rows, "bigbench": bigbench_rows, "mc": mc_jsonl_rows, "open": open_jsonl_rows}
    if name not in loaders:
        raise DataError(f"unknown task '{name}' (known: tiny-world, gym:<name>, {', '.join(loaders)})")
    if not path:
        raise DataError(f"task '{name}' needs a data file: set task.path")
    train, ev = _split(loaders[name](path), num_train, num_eval, seed, name, path)
    return Task(name=name, train=train, eval=ev)
