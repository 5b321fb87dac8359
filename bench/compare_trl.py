"""Side by side with TRL, same machine, same run: seconds per optimizer step and peak RSS.

    bench/setup_trl_env.sh            # once: bench/.venv with torch 2.13.0 (CPU), trl 1.16.0 and this package
    bench/.venv/bin/python bench/compare_trl.py [--quick] [--rounds R] [--steps N] [--size tiny|real]

Work (issue #7): tiny Llama models built from configs, teacher 4 layers / hidden 256 / MLP 1024
(4.3M parameters), student 2 / 128 / 512 (0.59M); one byte-level tokenizer (256 bytes + pad + eos);
prompts and completions of exactly 32 tokens.
  (a) on-policy distillation: TRL GKDTrainer vs our `distill method=gkd` (batch 8, lmbda 0.5, beta 0.5,
      32 new tokens, temperature 1);
  (b) RL, teacher as policy: TRL GRPOTrainer vs our `calibrate` with eta = 0, and with eta = 1 (which also
      scores every completion with the proxy = the student), 8 prompts x 4 generations, beta 0.04,
      32 completion tokens, reward = ROUGE-L against a reference (the same function both ways);
  (c) RL with the student as policy, both ways.
`--size real` (issue #29) moves the same comparison to the scale users run: SmolLM2-135M-Instruct (the packaged
real model, vocabulary 49k) as the GRPO policy with LoRA r 16 / alpha 32 on every linear layer, 8 prompts x 8
generations, 48 new tokens, beta 0.04, ours with eta = 0 and with eta = 1 against a proxy with another tokenizer
(the tiny byte-level model), TRL with eta = 0; and GKD with SmolLM2-135M-Instruct as the teacher and a
from-scratch Llama student with SmolLM2's tokenizer (hidden 256, 4 layers), lmbda 0.5, batch 8, 48 new tokens.
Each side runs in its best configuration for the CPU: the precision the hardware computes natively (our
`precision.resolve`: bf16 on AMX / AVX512-BF16, else float32, the same choice for TRL), threads = cores.
Prompts are short arithmetic instructions with a worked reference (ROUGE-L reward).
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


def build_real(root: Path, n_rows: int = 256) -> dict:
    """The real-scale set-up: SmolLM2-135M-Instruct (packaged) as the GRPO policy and GKD teacher, the tiny
    byte-level model as the eta = 1 proxy (another tokenizer), a from-scratch Llama with SmolLM2's tokenizer as
    the GKD student; arithmetic instructions with worked references."""
    from distillability.models import (
        TinyModelSpec,
        build_tiny_model,
        load_model,
        load_tokenizer,
        num_params,
        resolve_model_path,
        save_model,
    )

    tiny = build(root)  # the byte-level models: root/student is the proxy
    rng = random.Random(0)
    rows = []
    for _ in range(n_rows):
        xs = [rng.randint(2, 19) for _ in range(rng.randint(2, 4))]
        ops = [rng.choice("+-") for _ in xs[1:]]
        total, steps = xs[0], []
        for op, x in zip(ops, xs[1:]):
            new = total + x if op == "+" else total - x
            steps.append(f"{total} {op} {x} = {new}")
            total = new
        expr = " ".join([str(xs[0])] + [f"{o} {x}" for o, x in zip(ops, xs[1:])])
        rows.append({"instruction": f"Compute {expr} step by step.", "output": " " + ", ".join(steps)
                     + f". The answer is {total}."})
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    formatted = [TEMPLATE[0] + r["instruction"] + TEMPLATE[1] for r in rows]
    (root / "samples.jsonl").write_text("".join(json.dumps({"prompt": p, "response": r["output"], "finished": True})
                                                + "\n" for p, r in zip(formatted, rows)))
    smol = resolve_model_path("packaged:smollm2-135m-instruct")
    tok = load_tokenizer(smol)
    student = build_tiny_model(TinyModelSpec(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024),
                               tok, seed=1)
    save_model(student, tok, root / "smol_student")
    paths = {"policy": smol, "proxy": str(root / "student"), "gkd_teacher": smol,
             "gkd_student": str(root / "smol_student")}
    (root / "paths.json").write_text(json.dumps(paths))
    teacher, _ = load_model(smol, device="cpu")
    return {"params": {"policy/gkd teacher (SmolLM2-135M-Instruct)": num_params(teacher), "gkd student": num_params(student),
                       "proxy (byte-level)": tiny["params"]["student"]}, "vocab": len(tok)}


def paths_of(root: Path) -> dict:
    """Model folders by role; the tiny size's defaults unless build_real wrote paths.json."""
    if (root / "paths.json").exists():
        return json.loads((root / "paths.json").read_text())
    return {"policy": str(root / "teacher"), "proxy": str(root / "student"), "gkd_teacher": str(root / "teacher"),
            "gkd_student": str(root / "student"), "student_policy": str(root / "student")}


def shape_of(root: Path) -> dict:
    """Batch shapes: the issue #7 tiny ones, or the issue #29 real ones."""
    if (root / "paths.json").exists():
        return {"generations": 8, "prompts": 8, "new_tokens": 48, "gkd_batch": 8, "lora": True}
    return {"generations": 4, "prompts": 8, "new_tokens": COMPLETION_TOKENS, "gkd_batch": 8, "lora": False}


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
    paths, shape = paths_of(root), shape_of(root)
    timer = _StepTimer()
    out = tempfile.mkdtemp()
    if kind == "gkd":
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        student, tok = load_model(paths["gkd_student"], device="cpu")
        teacher, _ = load_model(paths["gkd_teacher"], device="cpu")
        tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # our prompt format, no chat wrap
        ds = Dataset.from_list([{"messages": [{"role": "user", "content": TEMPLATE[0] + r["instruction"] + TEMPLATE[1]},
                                              {"role": "assistant", "content": r["output"]}]} for r in rows])
        args = GKDConfig(**_trl_common(out, steps, bf16), per_device_train_batch_size=shape["gkd_batch"], lmbda=0.5,
                         beta=0.5, max_new_tokens=shape["new_tokens"], temperature=1.0,
                         max_length=(128 if shape["lora"] else PROMPT_TOKENS) + shape["new_tokens"] + 1)
        class FlaggedGKD(GKDTrainer):  # records which steps sampled from the student (on-policy)
            @staticmethod
            def generate_on_policy_outputs(model, inputs, generation_config):
                timer.on_policy[len(timer.times)] = True
                return GKDTrainer.generate_on_policy_outputs(model, inputs, generation_config)

        trainer = FlaggedGKD(model=student, teacher_model=teacher, args=args, train_dataset=ds, processing_class=tok,
                             callbacks=[timer.callback()])
    else:
        from trl import GRPOConfig, GRPOTrainer

        policy = paths["policy"] if kind == "grpo_teacher" else paths["student_policy"]
        _, tok = load_model(policy, device="cpu")
        ds = Dataset.from_list([{"prompt": TEMPLATE[0] + r["instruction"] + TEMPLATE[1], "reference": r["output"]}
                                for r in rows])
        args = GRPOConfig(**_trl_common(out, steps, bf16),
                          per_device_train_batch_size=shape["prompts"] * shape["generations"],
                          num_generations=shape["generations"], max_completion_length=shape["new_tokens"], beta=0.04,
                          temperature=1.0)
        peft = None
        if shape["lora"]:
            from peft import LoraConfig

            peft = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
        trainer = GRPOTrainer(model=policy, reward_funcs=_rouge_reward, args=args, train_dataset=ds,
                              processing_class=tok, callbacks=[timer.callback()], peft_config=peft)
    trainer.train()
    return {"times": timer.times, "on_policy": [bool(timer.on_policy.get(i)) for i in range(len(timer.times))]}


LAST_OUT: list[str] = [""]


def worker_ours(kind: str, root: Path, steps: int, bf16: bool) -> list[float]:
    from distillability.config import from_dict

    out = tempfile.mkdtemp()
    LAST_OUT[0] = out
    paths, shape = paths_of(root), shape_of(root)
    task = {"name": "open", "path": str(root / "data.jsonl"), "num_train": 200 if shape["lora"] else 400,
            "num_eval": 8}
    runtime = {"bf16": bf16, "threads": int(os.environ.get("BENCH_THREADS", "2")), "progress": False, "seed": 0}
    if kind == "gkd":
        from distillability.recipes import distill

        cfg = from_dict(distill.DistillConfig, {
            "teacher": paths["gkd_teacher"], "student": paths["gkd_student"], "method": "gkd", "lmbda": 0.5,
            "beta": 0.5, "temperature": 1.0, "max_new_tokens": shape["new_tokens"], "max_steps": steps,
            "per_device_train_batch_size": shape["gkd_batch"], "learning_rate": 1e-4, "teacher_samples": str(root / "samples.jsonl"),
            "eval_prompts": 1, "save_steps": 0, "output_dir": out, "task": task, "runtime": runtime})
        distill.run(cfg)
    else:
        from distillability.recipes import calibrate

        policy = paths["policy"] if kind.startswith("grpo_teacher") else paths["student_policy"]
        lora = {"use_peft": True, "lora_r": 16, "lora_alpha": 32} if shape["lora"] else {}
        cfg = from_dict(calibrate.CalibrateConfig, {
            "model": policy, "proxy": paths["proxy"], "eta": 1.0 if kind.endswith("eta") else 0.0, **lora,
            "beta": 0.04, "num_generations": shape["generations"], "prompts_per_step": shape["prompts"],
            "max_completion_length": shape["new_tokens"],
            "temperature": 1.0, "max_steps": steps, "learning_rate": 1e-4, "eval_prompts": 1, "eval_generations": 1,
            "save_steps": 0, "output_dir": out, "task": task, "runtime": runtime})
        calibrate.run(cfg)
    rows = [json.loads(x) for x in (Path(out) / "log.jsonl").read_text().splitlines()]
    return {"times": [r["s_step"] for r in rows], "on_policy": [bool(r.get("on_policy")) for r in rows],
            "phases": [{k: r[k] for k in ("s_generate", "s_score") if k in r} for r in rows]}


def phase_profile(runs: list[dict], warmup: int) -> dict:
    """Where our steps spent their time, from the recipes' own per-step timers in the timed runs themselves
    (median over every round's steps after warm-up): generation, scoring (policy + reference [+ proxy]
    forwards and rewards), update (the rest: backward + optimizer); GKD split by on-/off-policy steps."""
    rows = [dict(p, s_step=t, on=o) for r in runs
            for t, o, p in list(zip(r["times"], r["on_policy"], r["phases"]))[warmup:]]
    def split(rs: list[dict]) -> dict:
        out = {"s_step": statistics.median(r["s_step"] for r in rs)}
        for k in ("s_generate", "s_score"):
            if any(k in r for r in rs):
                out[k] = statistics.median(r[k] for r in rs if k in r)
        out["s_update"] = statistics.median(r["s_step"] - r.get("s_generate", 0.0) - r.get("s_score", 0.0) for r in rs)
        out["steps"] = len(rs)
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}
    on = [r for r in rows if r["on"]]
    off = [r for r in rows if not r["on"]]
    if on and off:
        return {"on_policy": split(on), "off_policy": split(off)}
    return split(rows)


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
    ap.add_argument("--size", choices=["tiny", "real"], default="tiny",
                    help="tiny: issue #7's 4.3M/0.56M models; real: SmolLM2-135M-Instruct (issue #29)")
    ap.add_argument("--out", default="", help="also write the result JSON here (e.g. bench/results/compare_trl_real.json)")
    ap.add_argument("--trl-bf16", choices=["on", "off", "auto"], default="",
                    help="TRL's precision (default: on for tiny, its CPU default; auto for real = what the CPU "
                         "computes natively)")
    ap.add_argument("--ours-bf16", choices=["on", "off", "auto"], default="",
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

    from distillability.precision import cpu_name, resolve

    native, why = resolve("auto", "cpu")
    def choose(flag: str) -> bool:
        flag = flag or ("auto" if args.size == "real" else "on")
        return native if flag == "auto" else flag == "on"
    root = Path(tempfile.mkdtemp(prefix="bench_trl_"))
    info = build_real(root) if args.size == "real" else build(root)
    print(f"CPU {cpu_name()}; native bf16: {native} ({why})", flush=True)
    print(f"models {info['params']}, vocab {info['vocab']}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, trl {trl.__version__}; {args.rounds} rounds x {args.steps} steps "
          f"(median after {args.warmup})", flush=True)
    plan = {  # name: (TRL kind, our kinds)
        "gkd": ("gkd", ["gkd"]),
        "grpo_teacher": ("grpo_teacher", ["grpo_teacher", "grpo_teacher_eta"]),
        "grpo_student": ("grpo_student", ["grpo_student"]),
    }
    if args.size == "real":
        plan.pop("grpo_student")  # (the student-policy GRPO is the tiny comparison's)
    if args.only:
        plan = {k: v for k, v in plan.items() if k in args.only.split(",")}
    trl_bf16 = choose(args.trl_bf16)
    ours_bf16 = {k: choose(args.ours_bf16) for k in ("gkd", "grpo_teacher", "grpo_teacher_eta", "grpo_student")}
    per_round: dict[str, list[float]] = {}
    rss: dict[str, list[float]] = {}
    ours_runs: dict[str, list[dict]] = {}
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
                ours_runs.setdefault(ours, []).append(o)
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
    result["profile_ours"] = {k: phase_profile(v, args.warmup) for k, v in ours_runs.items()}
    result["size"] = args.size
    result["models"] = info
    result["settings"] = {"cpu": cpu_name(), "native_bf16": why, "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup, "trl_bf16": trl_bf16,
                          "ours_bf16": ours_bf16, "threads": int(os.environ.get("BENCH_THREADS", "2")),
                          "trl": trl.__version__, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    if args.out:
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(args.out)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
