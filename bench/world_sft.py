"""One tiny-world model trained alone by SFT, then its greedy accuracy on held-out prompts by family and by
the style it answers in (issue #11, session 10: why the default world's teacher is weak).

    .venv/bin/python bench/world_sft.py --style-mix 0.5 0.5 0 --steps 2000 --lr 3e-3            # the default teacher
    .venv/bin/python bench/world_sft.py --style-mix 1 0 0 --size 128 2 384 --steps 1200          # a student-sized model

Char tokenizer, bf16 autocast where the CPU has it natively (else float32), 2 threads; ~0.14 s per step for the default teacher size on this machine.
"""

from __future__ import annotations

import argparse
import random
import time

from distillability.config import TaskConfig
from distillability.evaluation import greedy_accuracy
from distillability.metrics import accuracy_by_key
from distillability.models import TinyModelSpec, build_tiny_model, train_tokenizer
from distillability.precision import use_bf16
from distillability.tasks.world import STYLES, style_of
from distillability.training import fit_lm, seed_everything, set_threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-train", type=int, default=3000)
    ap.add_argument("--num-eval", type=int, default=200)
    ap.add_argument("--max-terms", type=int, default=3)
    ap.add_argument("--mc-share", type=float, default=0.25, help="share of multiple choice (the default world: 0)")
    ap.add_argument("--heldout", choices=("first", "iid"), default="first",
                    help="held-out split (task.world_heldout): first, as in the bench/README numbers; the default world: iid")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch-size", type=int, default=48)
    ap.add_argument("--style-mix", type=float, nargs=3, default=[0.5, 0.5, 0.0], help="worked running direct")
    ap.add_argument("--size", type=int, nargs=3, default=[192, 3, 512], help="hidden layers mlp")
    ap.add_argument("--bpe-vocab", type=int, default=0, help="0: character tokenizer (the teacher's); e.g. 420: "
                    "byte-level BPE like the world's student base (trained on every third training text)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    set_threads(a.threads)
    seed_everything(a.seed)
    task = TaskConfig(num_train=a.num_train, num_eval=a.num_eval, seed=a.seed, world_max_terms=a.max_terms,
                      world_mc_share=a.mc_share, world_heldout=a.heldout).load()
    corpus = [e.prompt + s for e in task.train for s in e.solutions.values()]
    tok = (train_tokenizer(corpus[1::3], a.bpe_vocab, "bpe") if a.bpe_vocab else train_tokenizer(corpus, 0, "char"))
    rng = random.Random(a.seed)
    chosen = [rng.choices(STYLES, weights=a.style_mix)[0] for _ in task.train]
    h, layers, mlp = a.size
    model = build_tiny_model(TinyModelSpec(hidden_size=h, num_layers=layers, num_heads=4, intermediate_size=mlp), tok,
                             seed=a.seed)
    t0 = time.time()
    losses = fit_lm(model, tok, [e.prompt for e in task.train], [e.solutions[s] for e, s in zip(task.train, chosen)],
                    steps=a.steps, batch_size=a.batch_size, lr=a.lr, autocast=use_bf16("auto"), progress=True)
    train_s = time.time() - t0
    acc, gens = greedy_accuracy(model, tok, task, task.eval, 64, True)
    ev = [(task.eval[g.prompt_index], g.text) for g in gens]
    oks = [task.score(e, text) for e, text in ev]
    family = accuracy_by_key([e.family for e, _ in ev], oks)
    style = accuracy_by_key(*zip(*[(style_of(t), ok) for (e, t), ok in zip(ev, oks) if e.family == "math"]))
    fmt = lambda d: ", ".join(f"{k} {v['greedy_accuracy']:.2f} (n={v['num_prompts']})" for k, v in d.items())  # noqa: E731
    tail = losses[-50:]
    print(f"{'bpe ' + str(a.bpe_vocab) if a.bpe_vocab else 'char'} size {a.size} mix {a.style_mix} lr {a.lr} steps {a.steps}: train {train_s:.0f} s, final loss "
          f"{sum(tail) / len(tail):.4f}, held-out greedy accuracy {acc:.3f}; by family: {fmt(family)}; "
          f"math by the style it answers in: {fmt(style)}")


if __name__ == "__main__":
    main()
