"""Where the time goes in one cross-tokenizer KD/GKD step on the real models (issue #9): Gemma-3-270M
teacher (vocabulary 262,144) -> SmolLM2-135M student (49,152), next-character loss, GSM8K text.

    .venv/bin/python bench/profile_crosstok.py [--batch 8] [--tokens 96] [--repeats 3]

Prints seconds per phase (median over repeats) of the recipe's own TokenLoss (off-policy step:
loss + backward) and of the student's on-policy generation, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data", default="../shared/data/gsm8k/train.jsonl")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    from distillability.config import TaskConfig, load_config
    from distillability.kd_loss import token_loss
    from distillability.precision import use_bf16
    from distillability.recipes.distill import DistillConfig
    from distillability.sampling import generate

    cfg = load_config(DistillConfig, None, {"teacher": "packaged:gemma-3-270m", "student": "packaged:smollm2-135m-instruct",
                                      "method": "gkd", "cross_tokenizer": "char", "max_new_tokens": args.tokens,
                                      "runtime": {"bf16": True, "progress": False}})
    cfg.task = TaskConfig(name="gsm8k", path=args.data, fallback="gym:gsm_symbolic", num_train=64, num_eval=4)
    task = cfg.task.load()
    rows = task.train[: args.batch]
    t0 = time.time()
    teacher, ttok = cfg.runtime.load(cfg.teacher, frozen=True)
    student, stok = cfg.runtime.load(cfg.student)
    t_load = time.time() - t0
    t0 = time.time()
    loss_fn = token_loss(cfg, teacher, ttok, student, stok, "jsd")
    t_init = time.time() - t0
    prompts = [e.prompt for e in rows]
    # off-policy responses: the reference solutions cut to about `tokens` student tokens
    responses = [stok.decode(stok(e.solutions.get("worked", e.reference), add_special_tokens=False)["input_ids"][: args.tokens])
                 for e in rows]
    times: dict[str, list[float]] = {"loss_forward": [], "backward": [], "on_policy_generate": []}
    for _ in range(args.repeats):
        student.zero_grad(set_to_none=True)
        t0 = time.time()
        loss = loss_fn(prompts, responses, [True] * len(rows), on_policy=False)
        t1 = time.time()
        loss.backward()
        t2 = time.time()
        gens = generate(student, stok, prompts, args.tokens, 1.0, seed=0, autocast=use_bf16("auto"))
        t3 = time.time()
        times["loss_forward"].append(t1 - t0)
        times["backward"].append(t2 - t1)
        times["on_policy_generate"].append(t3 - t2)
    med = {k: round(statistics.median(v), 3) for k, v in times.items()}
    gen_tokens = sum(len(stok(g.text, add_special_tokens=False)["input_ids"]) for g in gens)
    result = {"load_s": round(t_load, 1), "projector_init_s": round(t_init, 2), **med,
              "generated_tokens": gen_tokens, "batch": args.batch, "tokens": args.tokens,
              "peak_rss_gb": round(__import__("resource").getrusage(__import__("resource").RUSAGE_SELF).ru_maxrss / 2**20, 2),
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    for k, v in result.items():
        print(f"{k:>22}: {v}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
