"""Probes of the tiny world's solution styles (issue #11): is there a *correct mode a small student cannot
imitate*? Two measurements on math chains of 2-3 terms (`--terms 4`: of 4 terms; 200 held-out prompts, greedy):

    .venv/bin/python bench/probe_styles.py student [--base-steps 400] [--steps 120] [--examples 512]
        a student-sized model (0.46M, Qwen2, BPE) trained on worked solutions (its base), then fine-tuned
        on N reference solutions of one style (worked / running / direct): accuracy after each.
    .venv/bin/python bench/probe_styles.py teacher [--steps 2000] [--mix 0.5,0.5,0] [--size 192,3,512]
        a teacher-sized model (1.3M, Llama, characters) trained on a style mix: accuracy per style used
        (greedy and T = 1), at half and full training; `--warm-worked N` first trains N steps on worked
        solutions (the curriculum the student's base gets).
"""

from __future__ import annotations

import argparse
import copy
import random
import time

from distillability.models import TinyModelSpec, build_tiny_model, train_tokenizer
from distillability.precision import use_bf16
from distillability.sampling import generate
from distillability.tasks import WorldSpec
from distillability.tasks.world import STYLES, style_of, world_splits
from distillability.training import fit_lm, seed_everything, set_threads


def _answer(text: str) -> str:
    return text.split("####")[-1].strip().split("\n")[0].strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("which", choices=["student", "teacher"])
    ap.add_argument("--base-steps", type=int, default=400)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--examples", type=int, default=512)
    ap.add_argument("--mix", default="0.5,0.5,0")
    ap.add_argument("--size", default="192,3,512", help="teacher: hidden size, layers, MLP size (4 heads)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--terms", default="2,3", help="chain lengths of the probe's prompts (train and held-out)")
    ap.add_argument("--warm-worked", type=int, default=0,
                    help="teacher: first train this many steps on worked solutions, then --steps on the --mix")
    args = ap.parse_args()
    set_threads(args.threads)
    bf16 = use_bf16("auto")  # bf16 only where the CPU has it natively (AMX / AVX512-BF16); emulated it is ~10x slower
    seed_everything(0)
    terms = sorted(int(t) for t in args.terms.split(","))
    train, ev = world_splits(1400, 200, 0, WorldSpec(terms[0], terms[-1], 0.0, 0))
    corpus = [e.prompt + s for e in train for s in e.solutions.values()]

    def accuracy(model, tok, temperature=None):
        gens = generate(model, tok, [e.prompt for e in ev], max_new_tokens=48, greedy=temperature is None,
                        temperature=temperature or 1.0, seed=3, autocast=bf16)
        by: dict[str, list[bool]] = {}
        for g in gens:
            by.setdefault(style_of(g.text), []).append(_answer(g.text) == ev[g.prompt_index].reference)
        total = sum(sum(v) for v in by.values()) / len(ev)
        return round(total, 3), {k: (len(v), round(sum(v) / len(v), 2)) for k, v in by.items()}

    if args.which == "student":
        tok = train_tokenizer(corpus[1::3], 420, "bpe")
        base = build_tiny_model(TinyModelSpec(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=384,
                                              architecture="qwen2"), tok, seed=2)
        fit_lm(base, tok, [e.prompt for e in train], [e.solutions["worked"] for e in train], steps=args.base_steps,
               batch_size=48, lr=3e-3, seed=1, autocast=bf16, progress=False)
        print("base", accuracy(base, tok), flush=True)
        data = train[: args.examples]
        for style in STYLES:
            model = copy.deepcopy(base)
            fit_lm(model, tok, [e.prompt for e in data], [e.solutions[style] for e in data], steps=args.steps or 120,
                   batch_size=16, lr=1e-3, seed=5, autocast=bf16, progress=False, warmup_steps=10)
            print(f"after {args.examples} {style} answers", accuracy(model, tok), flush=True)
        return
    mix = [float(x) for x in args.mix.split(",")]
    tok = train_tokenizer(corpus, 0, "char")
    hidden, layers, mlp = (int(x) for x in args.size.split(","))
    model = build_tiny_model(TinyModelSpec(hidden_size=hidden, num_layers=layers, num_heads=4, intermediate_size=mlp),
                             tok, seed=0)
    print(f"teacher {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, mix {mix}", flush=True)
    if args.warm_worked:
        fit_lm(model, tok, [e.prompt for e in train], [e.solutions["worked"] for e in train], steps=args.warm_worked,
               batch_size=48, lr=3e-3, seed=7, autocast=bf16, progress=False)
        print(f"after {args.warm_worked} worked steps: greedy", accuracy(model, tok), flush=True)
    rng = random.Random(0)
    pairs = [(e.prompt, e.solutions[rng.choices(STYLES, weights=mix)[0]]) for e in train * 14]
    steps, done, t0 = args.steps or 2000, 0, time.time()
    for upto in (steps // 2, steps):
        fit_lm(model, tok, [p for p, _ in pairs], [r for _, r in pairs], steps=upto - done, batch_size=48, lr=3e-3,
               seed=upto, autocast=bf16, progress=False, warmup_steps=20 if done == 0 and not args.warm_worked else 0)
        done = upto
        print(f"step {upto} ({time.time() - t0:.0f}s): greedy", accuracy(model, tok), "T=1", accuracy(model, tok, 1.0),
              flush=True)


if __name__ == "__main__":
    main()
