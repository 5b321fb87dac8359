"""The tiny world: synthetic verifiable tasks that a model of a few million parameters learns in
minutes on 2 CPU cores.

Two families:
- `math`: a chain of 2-4 single-digit additions/subtractions ("Q: 7+5-3=?"), running total kept
  in 0..99;
- `mc`: pick the largest of 3-4 two-digit numbers, answer a letter (worked: a running maximum).

Each example comes with reference solutions in several *styles*; the teacher's SFT data mixes them
(docs/method.md §7, lesson 4: an undistillable teacher needs correct modes a weak student cannot imitate):
- `worked`: every step spelled out ("7+5=12, 12-3=9. #### 9") - easy to imitate;
- `running`: only the running totals ("12, 9. #### 9") - needs mental arithmetic per step;
- `direct`: the answer alone ("#### 9") - needs the whole chain in one forward pass.
"""

from __future__ import annotations

import dataclasses
import random
import re
from dataclasses import dataclass

from ..errors import ConfigError
from .base import Example

STYLES = ("worked", "running", "direct")


def style_of(text: str) -> str:
    """Which of the STYLES a response is written in: no work before the answer is `direct`, shown operations
    (`7+5=12`, `max(37,52)=52`) are `worked`, anything else (running totals, "52 is (B)") is `running`."""
    head = text.split("####")[0]
    if not head.strip():
        return "direct"
    return "worked" if ("=" in head or "max(" in head) else "running"


@dataclass
class WorldSpec:
    min_terms: int = 2
    max_terms: int = 4
    mc_share: float = 0.25  # fraction of multiple-choice examples
    modulus: int = 0  # 0: plain arithmetic; m: every step modulo m, numbers 0..m-1
    heldout: str = "iid"  # iid: a random sample of the distinct prompts; first: drawn first (see world_splits)
    terms: tuple[int, ...] = ()  # keep only chains of these many terms, after the splits are drawn (see world_splits)


def _math_example(rng: random.Random, spec: WorldSpec) -> Example:
    m = spec.modulus
    n = rng.randint(spec.min_terms, spec.max_terms)
    total = rng.randrange(m) if m else rng.randint(1, 9)
    expr, steps, running = str(total), [], []
    for _ in range(n - 1):
        if m:  # modular: any digit, either sign, the total wraps
            b, op = rng.randrange(m), rng.choice("+-")
            new = (total + b) % m if op == "+" else (total - b) % m
        else:  # plain: totals never go below 0
            b = rng.randint(1, 9)
            op = "-" if (b <= total and rng.random() < 0.5) else "+"
            new = total + b if op == "+" else total - b
        expr += f"{op}{b}"
        steps.append(f"{total}{op}{b}={new}")
        running.append(str(new))
        total = new
    prompt = f"Q: {expr}{f' mod {m}' if m else ''}=?\nA:"
    styles = {
        "worked": f" {', '.join(steps)}. #### {total}",
        "running": f" {', '.join(running)}. #### {total}",
        "direct": f" #### {total}",
    }
    return Example(prompt=prompt, reference=str(total), family="math", solutions=styles)


def _mc_example(rng: random.Random) -> Example:
    k = rng.randint(3, 4)
    nums = rng.sample(range(10, 100), k)
    letters = "ABCD"[:k]
    options = " ".join(f"({c}) {v}" for c, v in zip(letters, nums))
    best = max(range(k), key=lambda i: nums[i])
    prompt = f"Q: largest? {options}\nA:"
    # worked: a running maximum, one comparison per step (like the arithmetic chains)
    steps, cur = [], nums[0]
    for v in nums[1:]:
        new = max(cur, v)
        steps.append(f"max({cur},{v})={new}")
        cur = new
    styles = {
        "worked": f" {', '.join(steps)}, so {letters[best]}. #### {letters[best]}",
        "running": f" {nums[best]} is ({letters[best]}). #### {letters[best]}",
        "direct": f" #### {letters[best]}",
    }
    return Example(prompt=prompt, reference=letters[best], family="mc", solutions=styles)


def generate_world(n: int, seed: int, spec: WorldSpec | None = None, exclude: set[str] | None = None) -> list[Example]:
    """n distinct examples (distinct prompts), none of whose prompts is in `exclude`."""
    spec = spec or WorldSpec()
    rng = random.Random(seed)
    seen = set(exclude or ())
    out: list[Example] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ConfigError(f"config key 'task.num_train': the tiny world has fewer than {n} distinct prompts with "
                              f"world_min_terms={spec.min_terms}, world_max_terms={spec.max_terms}, "
                              f"world_mc_share={spec.mc_share:g}; lower task.num_train + task.num_eval or widen "
                              f"the world")
        ex = _mc_example(rng) if rng.random() < spec.mc_share else _math_example(rng, spec)
        if ex.prompt in seen:
            continue
        seen.add(ex.prompt)
        out.append(ex)
    return out


def world_splits(num_train: int, num_eval: int, seed: int, spec: WorldSpec | None = None):
    """(train, held-out), disjoint in prompts. `spec.heldout`:
    - iid: one pool of num_train + num_eval distinct prompts, split at random, so the held-out prompts follow
      the training distribution (chain lengths included);
    - first: the held-out prompts are drawn first and excluded from training. Short chains have few distinct
      prompts (~130 with 2 terms), so the held-out draw takes most of them and training sees almost none: the
      held-out accuracy then measures generalisation to chain lengths the models hardly trained on.
    `spec.terms` (non-empty): both splits keep only the arithmetic chains of these many terms, filtered after the
    full world's splits are drawn, so they are subsets of its splits: a calibration on the 2-3-term chains never
    sees a held-out prompt, and a split of the 4-term held-out chains holds no prompt any model of the full world
    trained on."""
    spec = spec or WorldSpec()
    if spec.terms:
        full = dataclasses.replace(spec, terms=())
        train, held_out = world_splits(num_train, num_eval, seed, full)
        keep = [e for e in train if chain_terms(e) in spec.terms], [e for e in held_out if chain_terms(e) in spec.terms]
        if not keep[1]:
            raise ConfigError(f"config key 'task.world_terms': no held-out chain of {list(spec.terms)} terms among "
                              f"task.num_eval={num_eval} prompts of {spec.min_terms}-{spec.max_terms} terms")
        return keep
    if spec.heldout == "first":
        eval_set = generate_world(num_eval, seed=10_000 + seed, spec=spec)
        train = generate_world(num_train, seed=seed, spec=spec, exclude={e.prompt for e in eval_set})
        return train, eval_set
    if spec.heldout != "iid":
        raise ConfigError(f"config key 'task.world_heldout': unknown split '{spec.heldout}' (iid, first)")
    pool = generate_world(num_train + num_eval, seed=seed, spec=spec)
    random.Random(10_000 + seed).shuffle(pool)
    return pool[num_eval:], pool[:num_eval]


def chain_terms(example: Example) -> int:
    """The number of terms of an arithmetic chain's prompt ("Q: 7+5-3=?" has 3; a modulus is not a term); 0 for
    a multiple-choice example."""
    if example.family != "math":
        return 0
    expr = example.prompt.split("Q: ", 1)[-1].split("=?", 1)[0].split(" mod ", 1)[0]
    return len(re.findall(r"\d+", expr))
