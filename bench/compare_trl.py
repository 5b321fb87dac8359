"""Side by side with TRL, same machine, same run: seconds per optimizer step and peak RSS.

    bench/setup_trl_env.sh            # once: bench/.venv with torch 2.13.0 (CPU), trl 1.16.0 and this package
    bench/.venv/bin/python bench/compare_trl.py [--quick] [--rounds R] [--steps N]

Work (issue #7): tiny Llama models built from configs, teacher 4 layers / hidden 256 / MLP 1024
(4.3M parameters), student 2 / 128 / 512 (0.59M); one byte-level tokenizer (256 bytes + pad + eos);
prompts and completions of exactly 32 tokens.
  (a) on-policy distillation: TRL GKDTrainer vs our `distill method=gkd` (batch 8, lmbda 0.5, beta 0.5,
      32 new tokens, temperature 1);
  (b) RL, teacher as policy: TRL GRPOTrainer vs our `calibrate` with eta = 0, and with eta = 1 (which also
      scores every completion with the proxy = the student), 8 prompts x 4 generations, beta 0.04,
      32 completion tokens, reward = ROUGE-L against a reference (the same function both ways);
  (c) RL with the student as policy, both ways.
Every run is a fresh subprocess (peak RSS is its own ru_maxrss); runs alternate TRL / ours within each
round; a run's figure is the median seconds per step after `--warmup` steps; a round's ratio is TRL's
median / ours; the reported speed-up is the median over rounds. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT_TOKENS = COMPLETION_TOKENS = 32
TEMPLATE = ("Instruction: ", "\nResponse:")  # our `open` task's prompt format; 23 bytes + 9 bytes of instruction


# ----------------------------------------------------------------------------- set-up (models, data)


def build(root: Path, n_rows: int = 512) -> dict:
    from distillability.models import TinyModelSpec, build_tiny_model, num_params, save_model, train_tokenizer

    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyz"
    rows = []
    for _ in range(n_rows):
        ins = "".join(rng.choice(alphabet) for _ in range(PROMPT_TOKENS - len(TEMPLATE[0]) - len(TEMPLATE[1])))
        out = " " + "".join(rng.choice(alphabet + "  ") for _ in range(COMPLETION_TOKENS - 1))
        rows.append({"instruction": ins, "output": out})
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # byte-level BPE with no merges: exactly one token per byte (+ pad, eos)
    tok = train_tokenizer(["x"], 258, "bpe")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    sizes = {"teacher": (256, 4, 1024), "student": (128, 2, 512)}
    info = {}
    for name, (h, layers, mlp) in sizes.items():
        model = build_tiny_model(TinyModelSpec(hidden_size=h, num_layers=layers, num_heads=4, intermediate_size=mlp),
                                 tok, seed=1)
        save_model(model, tok, root / name)
        info[name] = num_params(model)
    # teacher samples for the off-policy half of GKD: the data set's completions (TRL uses the same)
    formatted = [TEMPLATE[0] + r["instruction"] + TEMPLATE[1] for r in rows]
    (root / "samples.jsonl").write_text("".join(json.dumps({"prompt": p, "response": r["output"], "finished": True})
                                                + "\n" for p, r in zip(formatted, rows)))
    enc = tok(formatted[0], add_special_tokens=False)["input_ids"]
    assert len(enc) == PROMPT_TOKENS, len(enc)
    assert len(tok(rows[0]["output"], add_special_tokens=False)["input_ids"]) == COMPLETION_TOKENS
    return {"params": info, "vocab": len(tok)}


# ----------------------------------------------------------------------------- workers (one per subprocess)


def _rouge_reward(completions, reference, **_):
    from distillability.tasks.verifiers import rouge_l

    return [rouge_l(c, r) for c, r in zip(completions, reference)]


class _StepTimer:
    def __init__(self):
        self.times, self.t0, self.on_policy = [], None, {}

    def callback(self):
        from transformers import TrainerCallback

        timer = self

        class CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                timer.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                timer.times.append(time.perf_counter() - timer.t0)

        return CB()


def _trl_common(out: str, steps: int, bf16: bool) -> dict:
    return dict(output_dir=out, max_steps=steps, learning_rate=1e-4, logging_steps=10_000, save_strategy="no",
                report_to=[], bf16=bf16, gradient_checkpointing=False, use_cpu=True, dataloader_num_workers=0,
                disable_tqdm=True, seed=0)


def worker_trl(kind: str, root: Path, steps: int, bf16: bool) -> list[float]:
    from datasets import Dataset

    from distillability.models import load_model

    rows = [json.loads(x) for x in (root / "data.jsonl").read_text().splitlines()]
    timer = _StepTimer()
    out = tempfile.mkdtemp()
    if kind == "gkd":
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        student, tok = load_model(str(root / "student"), device="cpu")
        teacher, _ = load_model(str(root / "teacher"), device="cpu")
        ds = Dataset.from_list([{"messages": [{"role": "user", "content": TEMPLATE[0] + r["instruction"] + TEMPLATE[1]},
                                              {"role": "assistant", "content": r["output"]}]} for r in rows])
        args = GKDConfig(**_trl_common(out, steps, bf16), per_device_train_batch_size=8, lmbda=0.5, beta=0.5,
                         max_new_tokens=COMPLETION_TOKENS, temperature=1.0, max_length=PROMPT_TOKENS + COMPLETION_TOKENS + 1)
        class FlaggedGKD(GKDTrainer):  # records which steps sampled from the student (on-policy)
            @staticmethod
            def generate_on_policy_outputs(model, inputs, generation_config):
                timer.on_policy[len(timer.times)] = True
                return GKDTrainer.generate_on_policy_outputs(model, inputs, generation_config)

        trainer = FlaggedGKD(model=student, teacher_model=teacher, args=args, train_dataset=ds, processing_class=tok,
                             callbacks=[timer.callback()])
    else:
        from trl import GRPOConfig, GRPOTrainer

        policy = "teacher" if kind == "grpo_teacher" else "student"
        _, tok = load_model(str(root / policy), device="cpu")
        ds = Dataset.from_list([{"prompt": TEMPLATE[0] + r["instruction"] + TEMPLATE[1], "reference": r["output"]}
                                for r in rows])
        args = GRPOConfig(**_trl_common(out, steps, bf16), per_device_train_batch_size=32, num_generations=4,
                          max_completion_length=COMPLETION_TOKENS, beta=0.04, temperature=1.0)
        trainer = GRPOTrainer(model=str(root / policy), reward_funcs=_rouge_reward, args=args, train_dataset=ds,
                              processing_class=tok, callbacks=[timer.callback()])
    trainer.train()
    return {"times": timer.times, "on_policy": [bool(timer.on_policy.get(i)) for i in range(len(timer.times))]}


LAST_OUT: list[str] = [""]


def worker_ours(kind: str, root: Path, steps: int, bf16: bool) -> list[float]:
    from distillability.config import from_dict

    out = tempfile.mkdtemp()
    LAST_OUT[0] = out
    task = {"name": "open", "path": str(root / "data.jsonl"), "num_train": 400, "num_eval": 8}
    runtime = {"bf16": bf16, "threads": int(os.environ.get("BENCH_THREADS", "2")), "progress": False, "seed": 0}
    if kind == "gkd":
        from distillability.recipes import distill

        cfg = from_dict(distill.DistillConfig, {
            "teacher": str(root / "teacher"), "student": str(root / "student"), "method": "gkd", "lmbda": 0.5,
            "beta": 0.5, "temperature": 1.0, "max_new_tokens": COMPLETION_TOKENS, "max_steps": steps,
            "per_device_train_batch_size": 8, "learning_rate": 1e-4, "teacher_samples": str(root / "samples.jsonl"),
            "eval_prompts": 1, "save_steps": 0, "output_dir": out, "task": task, "runtime": runtime})
        distill.run(cfg)
    else:
        from distillability.recipes import calibrate

        policy = "teacher" if kind.startswith("grpo_teacher") else "student"
        cfg = from_dict(calibrate.CalibrateConfig, {
            "model": str(root / policy), "proxy": str(root / "student"), "eta": 1.0 if kind.endswith("eta") else 0.0,
            "beta": 0.04, "num_generations": 4, "prompts_per_step": 8, "max_completion_length": COMPLETION_TOKENS,
            "temperature": 1.0, "max_steps": steps, "learning_rate": 1e-4, "eval_prompts": 1, "eval_generations": 1,
            "save_steps": 0, "output_dir": out, "task": task, "runtime": runtime})
        calibrate.run(cfg)
    rows = [json.loads(x) for x in (Path(out) / "log.jsonl").read_text().splitlines()]
    return {"times": [r["s_step"] for r in rows], "on_policy": [bool(r.get("on_policy")) for r in rows]}


def worker_main(args) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    fn = worker_trl if args.side == "trl" else worker_ours
    res = fn(args.kind, Path(args.root), args.steps, args.bf16)
    res["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(res), flush=True)


# ----------------------------------------------------------------------------- driver


def run_one(side: str, kind: str, root: Path, steps: int, bf16: bool) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--side", side, "--kind", kind, "--root", str(root),
           "--steps", str(steps)] + (["--bf16"] if bf16 else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{side} {kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 rounds of 8 steps (under 3 minutes)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--trl-bf16", choices=["on", "off"], default="on", help="TRL's precision (its CPU default: on)")
    ap.add_argument("--ours-bf16", choices=["on", "off"], default="on",
                    help="our runtime.bf16 (bf16 autocast for training; the decoder picks bf16 per matmul size)")
    ap.add_argument("--only", default="", help="comma list of gkd,grpo_teacher,grpo_student")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--side"), ap.add_argument("--kind"), ap.add_argument("--root")
    ap.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker_main(args)
    if args.quick:
        args.rounds, args.steps, args.warmup = 2, 8, 2
    import torch
    import transformers
    import trl

    root = Path(tempfile.mkdtemp(prefix="bench_trl_"))
    info = build(root)
    print(f"models {info['params']}, vocab {info['vocab']}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, trl {trl.__version__}; {args.rounds} rounds x {args.steps} steps "
          f"(median after {args.warmup})", flush=True)
    plan = {  # name: (TRL kind, our kinds)
        "gkd": ("gkd", ["gkd"]),
        "grpo_teacher": ("grpo_teacher", ["grpo_teacher", "grpo_teacher_eta"]),
        "grpo_student": ("grpo_student", ["grpo_student"]),
    }
    if args.only:
        plan = {k: v for k, v in plan.items() if k in args.only.split(",")}
    trl_bf16 = args.trl_bf16 == "on"
    ours_bf16 = {k: args.ours_bf16 == "on" for k in ("gkd", "grpo_teacher", "grpo_teacher_eta", "grpo_student")}
    per_round: dict[str, list[float]] = {}
    rss: dict[str, list[float]] = {}
    def med(res: dict) -> float:
        """Median s/step after warm-up; for GKD the expected step at lmbda = 0.5 from the medians of on- and
        off-policy steps, since each side flips its own coins (equal work, not equal luck)."""
        xs, on = res["times"][args.warmup:], res["on_policy"][args.warmup:]
        if any(on) and not all(on):
            return 0.5 * statistics.median([x for x, o in zip(xs, on) if o]) + 0.5 * statistics.median(
                [x for x, o in zip(xs, on) if not o])
        return statistics.median(xs)
    for r in range(args.rounds):
        for trl_kind, our_kinds in plan.values():
            t = run_one("trl", trl_kind, root, args.steps, trl_bf16)
            t_med = med(t)
            rss.setdefault(f"trl_{trl_kind}", []).append(t["rss_mb"])
            for ours in our_kinds:
                o = run_one("ours", ours, root, args.steps, ours_bf16[ours])
                o_med = med(o)
                rss.setdefault(f"ours_{ours}", []).append(o["rss_mb"])
                key = ours
                per_round.setdefault(key, []).append(t_med / o_med)
                print(f"round {r + 1} {key:17s} TRL {t_med:.3f} s/step ({t['rss_mb']:.0f} MB)  ours {o_med:.3f} s/step "
                      f"({o['rss_mb']:.0f} MB)  speed-up {t_med / o_med:.2f}x", flush=True)
    names = {"gkd": "gkd_speedup", "grpo_teacher": "grpo_speedup", "grpo_teacher_eta": "grpo_eta_speedup",
             "grpo_student": "grpo_student_speedup"}
    result = {names[k]: round(statistics.median(v), 3) for k, v in per_round.items()}
    result["per_round"] = {names[k]: [round(x, 3) for x in v] for k, v in per_round.items()}
    ratios = []
    for ours_kind, trl_kind in (("gkd", "gkd"), ("grpo_teacher", "grpo_teacher"), ("grpo_teacher_eta", "grpo_teacher"),
                                ("grpo_student", "grpo_student")):
        if f"ours_{ours_kind}" in rss:
            ratios.append(max(rss[f"ours_{ours_kind}"]) / max(rss[f"trl_{trl_kind}"]))
    result["rss_ratio"] = round(max(ratios), 3) if ratios else None
    result["peak_rss_mb"] = {k: round(max(v)) for k, v in rss.items()}
    result["settings"] = {"rounds": args.rounds, "steps": args.steps, "warmup": args.warmup, "trl_bf16": trl_bf16,
                          "ours_bf16": ours_bf16, "threads": int(os.environ.get("BENCH_THREADS", "2")),
                          "trl": trl.__version__, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
