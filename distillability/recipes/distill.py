"""Distill a student from any teacher (docs/method.md §4): SFT on teacher samples, token-level KD, or
on-policy GKD.

- `sft`: sample responses from the teacher (greedy, or n per prompt at a temperature; optionally only
  verified-correct ones) and train the student by next-token NLL. Text level, so any tokenizers.
- `kd`: off-policy token-level KD on the teacher's samples: minimise `loss` (fkl default, rkl, jsd,
  tvd, skl, srkl) between teacher and student next-token distributions, full vocabulary or teacher
  top-k with a tail bucket.
- `gkd`: on-policy (Agarwal et al.; TRL's GKDTrainer): with probability `lmbda` a batch's responses are
  sampled from the current student, else taken from the teacher's samples (or freshly sampled from
  the teacher when `seq_kd`); loss JSD_beta per token (beta=0 forward KL, beta=1 reverse KL).

Token-level losses need a shared vocabulary. With different tokenizers the run refuses, naming both
vocabularies, unless `cross_tokenizer` picks a cross-tokenizer loss (`char` or `uld`, see crosstok.py).
All token losses are chunked over positions (divergences.token_divergence).
"""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import RuntimeConfig, TaskConfig, opt, save_config, sub, to_dict
from ..distributed import get_dist, global_mean
from ..errors import ConfigError, DataError, UserError
from ..evaluation import greedy_accuracy
from ..io import check_output_dir, load_records, require_field, versions, write_json, write_jsonl
from ..kd_loss import CrossTokenizerLoss, SameVocabLoss, token_loss
from ..models import save_model
from ..sample_filters import answer_only, likelihood_per_char, pick_per_prompt
from ..sampling import generate
from ..scoring import check_context
from ..training import (
    StepLog,
    apply_lora,
    autocast_ctx,
    encode_sft_batch,
    load_checkpoint,
    make_optimizer,
    make_scheduler,
    nll_loss,
    optimizer_step,
    save_checkpoint,
    step_seed,
)


@dataclasses.dataclass
class DistillConfig:
    ALIASES = {"samples_per_prompt": "num_generations"}  # deprecated key -> its name now (one release)

    teacher: str = opt("", "The teacher (folder, packaged:NAME or hub id), or `dataset`: SFT on the task's own "
                       "reference solutions (e.g. GSM8K's worked answers) instead of a model's samples.")
    student: str = opt("", "The student to train (its starting weights).")
    output_dir: str = opt("runs/distill", "Where the student, card, samples, logs and checkpoints go.")
    method: str = opt("sft", "How to distill.", choices=("sft", "kd", "gkd"))
    loss: str = opt("fkl", "Token divergence for kd (gkd always uses jsd with beta).",
                    choices=("fkl", "rkl", "jsd", "tvd", "skl", "srkl"))
    beta: float = opt(0.5, "JSD beta (TRL convention: 0 = forward KL, 1 = reverse KL).", min=0, max=1)
    alpha: float = opt(0.1, "Skew of skl/srkl.", min=0, max=1)
    lmbda: float = opt(0.5, "GKD: probability that a batch is sampled from the student (on-policy).", min=0, max=1)
    seq_kd: bool = opt(False, "GKD: off-policy batches are sampled fresh from the teacher (sequence-level KD).")
    temperature: float = opt(1.0, "Temperature of the distillation distributions and of student sampling.",
                             min=0, min_exclusive=True)
    teacher_top_k: int = opt(0, "kd/gkd: keep the teacher's top-k tokens plus one tail bucket (0 = full vocabulary).", min=0)
    cross_tokenizer: str = opt("refuse", "kd/gkd with different tokenizers: refuse, char (next-character "
                               "distributions) or uld (sorted-probability distance).", choices=("refuse", "char", "uld"))
    ce_weight: float = opt(1.0, "Cross-tokenizer losses: weight of the NLL on teacher text added to them.", min=0)
    teacher_samples: str | None = opt(None, "A JSONL of teacher samples (prompt, response[, finished, correct]) to "
                                      "train on instead of sampling the teacher (e.g. another run's teacher_samples.jsonl).")
    reference_styles: list[str] = opt([], "teacher=dataset: the reference-solution styles to train on, one drawn "
                                      "at random per prompt (tiny-world: worked, running, direct; the mix the tiny "
                                      "world's teacher learns); empty = each example's first solution.")
    num_prompts: int = opt(512, "Training prompts the teacher answers.", min=1)
    num_generations: int = opt(1, "Teacher samples per prompt.", min=1)
    sample_temperature: float = opt(1.0, "Temperature of the teacher's samples (0 = greedy).", min=0)
    keep_correct_only: bool = opt(False, "Keep only teacher samples the verifier marks correct.")
    keep_most_likely: bool = opt(False, "Best-of-n (n = num_generations): of each prompt's samples keep the one the "
                                 "student, before training, finds most likely per character, a verified-correct one "
                                 "first (the adaptive attacker of a teacher whose samples are unlikely for small models).")
    teacher_defense: str = opt("none", "An output-level defense of the teacher (text only, so method=sft): "
                               "answer_only (chain of thought removed: ' #### ANSWER'); least_likely (each prompt "
                               "answered, always the same way, with the correct sample of defense_generations that "
                               "defense_model finds least likely per character).",
                               choices=("none", "answer_only", "least_likely"))
    defense_model: str = opt("", "teacher_defense=least_likely: the defender's small model that scores imitability "
                             "(e.g. the calibration proxy).")
    defense_generations: int = opt(4, "teacher_defense=least_likely: samples the defender draws per prompt.", min=1)
    max_new_tokens: int = opt(64, "Max tokens per sampled response (TRL: max_new_tokens).", min=1)
    max_steps: int = opt(100, "Optimizer steps.", min=1)
    per_device_train_batch_size: int = opt(16, "Sequences per step.", min=1)
    learning_rate: float = opt(1e-3, "AdamW learning rate.", min=0, min_exclusive=True)
    max_grad_norm: float = opt(1.0, "Gradient clipping norm (0 = no clipping).", min=0)
    warmup_steps: int = opt(10, "Linear warm-up steps.", min=0)
    use_peft: bool = opt(False, "Train LoRA adapters (peft) on the student instead of all weights (merged on save).")
    lora_r: int = opt(16, "LoRA rank.", min=1)
    lora_alpha: int = opt(32, "LoRA alpha.", min=1)
    chunk_size: int = opt(1024, "Positions per chunk of the token losses.", min=1)
    eval_prompts: int = opt(100, "Held-out prompts for the student's before/after accuracy.", min=1)
    save_steps: int = opt(25, "Checkpoint every N steps (0 = never).", min=0)
    resume: bool = opt(False, "Continue from the last checkpoint in output_dir.")
    task: TaskConfig = sub(TaskConfig, "The task (prompts and verifier).")
    runtime: RuntimeConfig = sub(RuntimeConfig, "Devices, precision, threads, seed.")


def sample_teacher(teacher, ttok, task, cfg: DistillConfig, path: Path, student=None, stok=None) -> list[dict]:
    """The teacher's responses to the training prompts (through its defense, if any; then the attacker's
    filters), saved as JSONL (prompt, response, ...)."""
    if cfg.teacher_samples:
        rows = load_records(cfg.teacher_samples)
        for r in rows:
            require_field(r, "prompt", cfg.teacher_samples)
            require_field(r, "response", cfg.teacher_samples)
            r.pop("__line__", None)
        if cfg.keep_correct_only:
            rows = [r for r in rows if float(r.get("correct", 0)) >= 1.0]
        if not rows:
            raise DataError(f"{cfg.teacher_samples}: no teacher samples left after filtering")
        if get_dist().is_main:
            write_jsonl(path, rows)
        return rows
    dist = get_dist()
    if teacher is None:  # teacher=dataset: the task's reference solutions
        rng = random.Random(cfg.runtime.seed)
        rows = []
        for e in task.train[: cfg.num_prompts]:
            if cfg.reference_styles:
                have = [st for st in cfg.reference_styles if st in e.solutions]
                if not have:
                    raise DataError(f"task '{cfg.task.name}' example {e.source or e.prompt[:40]!r}: none of the "
                                    f"reference_styles {cfg.reference_styles} (it has {sorted(e.solutions)})")
                response = e.solutions[rng.choice(have)]
            else:
                response = e.solution
            if response:
                rows.append({"prompt": e.prompt, "response": response, "finished": True, "correct": 1.0})
        if not rows:
            raise DataError(f"task '{cfg.task.name}': no reference solutions to train on (teacher=dataset)")
        if dist.is_main:
            write_jsonl(path, rows)
        return rows
    if path.exists() and cfg.resume:
        dist.barrier()
        return load_records(path)
    prompts = task.train[: cfg.num_prompts]
    greedy = cfg.sample_temperature == 0
    n = cfg.defense_generations if cfg.teacher_defense == "least_likely" else cfg.num_generations
    # each process samples its share of the prompts; per-row seeds make the union equal a 1-process run's
    per = -(-len(prompts) // dist.world)
    mine = dist.share(per)
    gens = generate(teacher, ttok, [e.prompt for e in prompts[mine]], cfg.max_new_tokens, cfg.sample_temperature or 1.0,
                    num_return_sequences=1 if greedy else n, greedy=greedy,
                    seed=step_seed(cfg.runtime.seed, 0, 7), autocast=cfg.runtime.autocast,
                    use_chat_template=cfg.task.use_chat_template, index_offset=mine.start)
    part = prompts[mine]
    rows = [{"prompt": part[g.prompt_index].prompt, "response": g.text, "finished": g.finished,
             "correct": task.score(part[g.prompt_index], g.text)} for g in gens]
    rows = dist.gather_objects(rows)
    rows = defend(rows, task, prompts, cfg)
    rows = attacker_filters(rows, cfg, student, stok)
    if dist.is_main:
        write_jsonl(path, rows)
    return rows


def defend(rows: list[dict], task, prompts, cfg: DistillConfig) -> list[dict]:
    """The teacher's output-level defense (teacher_defense) applied to its raw samples."""
    if cfg.teacher_defense == "answer_only":
        return answer_only(task, {e.prompt: e for e in prompts}, rows)
    if cfg.teacher_defense == "least_likely":
        model, tok = cfg.runtime.load(cfg.defense_model, frozen=True)
        scores = likelihood_per_char(model, tok, rows, cfg.task.use_chat_template, cfg.runtime.autocast)
        del model
        return pick_per_prompt(rows, scores, highest=False)
    return rows


def attacker_filters(rows: list[dict], cfg: DistillConfig, student, stok) -> list[dict]:
    """keep_correct_only, then keep_most_likely (scored by the student before training)."""
    if cfg.keep_correct_only:
        rows = [r for r in rows if r["correct"] >= 1.0]
        if not rows:
            raise DataError("distill: no teacher samples left after keep_correct_only (the teacher solved none)")
    if cfg.keep_most_likely and student is not None:
        was_training = student.training
        student.eval()
        scores = likelihood_per_char(student, stok, rows, cfg.task.use_chat_template, cfg.runtime.autocast)
        student.train(was_training)
        rows = pick_per_prompt(rows, scores, highest=True)
    return rows


@dataclasses.dataclass
class Run:
    """What one distillation works with."""
    cfg: DistillConfig
    teacher: Any  # None for teacher=dataset
    ttok: Any
    student: Any
    stok: Any
    task: Any
    held_out: list
    loss_fn: SameVocabLoss | CrossTokenizerLoss | None  # kd/gkd
    dist: Any


def setup(cfg: DistillConfig) -> Run:
    """Check the config, load the teacher and the student, the task, and the token loss for kd/gkd."""
    if not cfg.teacher or not cfg.student:
        raise ConfigError("config keys 'teacher' and 'student' are required")
    from_data = cfg.teacher == "dataset"
    if from_data and (cfg.method != "sft" or cfg.teacher_samples):
        raise ConfigError("config key 'teacher': 'dataset' works with method=sft and no teacher_samples")
    if cfg.teacher_defense != "none" and (cfg.method != "sft" or from_data or cfg.teacher_samples):
        raise ConfigError("config key 'teacher_defense': an output-level defense returns text, not logits: it works "
                          "with method=sft on samples of a teacher model (not teacher=dataset or teacher_samples)")
    if cfg.teacher_defense == "least_likely" and not cfg.defense_model:
        raise ConfigError("config key 'defense_model': teacher_defense=least_likely needs the defender's model")
    rt = cfg.runtime
    check_output_dir(cfg.output_dir)
    rt.start()
    teacher, ttok = (None, None) if from_data else rt.load(cfg.teacher, frozen=True)
    student, stok = rt.load(cfg.student)
    if cfg.use_peft:
        student = apply_lora(student, cfg.lora_r, cfg.lora_alpha)
    dist = get_dist()
    dist.start(next(student.parameters()).device)
    student = dist.wrap(student)  # FSDP: shard the student (a no-op for data-parallel or one process)
    task = cfg.task.load()
    held_out = task.eval[: cfg.eval_prompts]
    chat = cfg.task.use_chat_template
    if not cfg.teacher_samples and not from_data:
        check_context(teacher, ttok, task.train[: cfg.num_prompts], cfg.max_new_tokens, chat, "the teacher")
    check_context(student, stok, task.train[: cfg.num_prompts] + held_out, cfg.max_new_tokens, chat, "the student")
    loss_fn = None
    if cfg.method in ("kd", "gkd"):
        loss_fn = token_loss(cfg, teacher, ttok, student, stok, "jsd" if cfg.method == "gkd" else cfg.loss)
    return Run(cfg, teacher, ttok, student, stok, task, held_out, loss_fn, dist)


_BEFORE: dict = {}  # one process's greedy accuracies of unchanged student bases (an attack battery reads each once)


def _before_key(r: Run) -> tuple | None:
    """What a student base's greedy held-out accuracy depends on; None where it cannot be told (no folder)."""
    from ..models import resolve_model_path

    try:
        path = Path(resolve_model_path(r.cfg.student))
        stamp = max(f.stat().st_mtime_ns for f in path.glob("*.safetensors"))
    except (ValueError, OSError, UserError):
        return None
    return (str(path.resolve()), stamp, repr(r.cfg.task), r.cfg.eval_prompts, r.cfg.max_new_tokens,
            repr(r.cfg.runtime.precision()), r.dist.world)


def held_out_accuracy(r: Run, before: bool = False) -> float | None:
    """The student's greedy accuracy on the held-out prompts (rank 0; None elsewhere). `before`: the untrained
    base, read once per process for the same weights, prompts and precision (greedy decoding: the same number)."""
    key = _before_key(r) if before else None
    if key is not None and key in _BEFORE:
        return _BEFORE[key] if r.dist.is_main else None
    with r.dist.full_weights(r.student):
        if not r.dist.is_main:
            return None
        acc = greedy_accuracy(r.student, r.stok, r.task, r.held_out, r.cfg.max_new_tokens, r.cfg.runtime.autocast,
                              r.cfg.task.use_chat_template)[0]
    if key is not None:
        _BEFORE[key] = acc
    return acc


def batch(r: Run, samples: list[dict], step: int, mine: slice):
    """(prompts, responses, finished, on_policy, gens) of one step: teacher samples, or with probability lmbda
    (gkd) the student's own, or fresh teacher samples (seq_kd)."""
    cfg, rt = r.cfg, r.cfg.runtime
    rng = np.random.default_rng(step_seed(rt.seed, step))
    on_policy = cfg.method == "gkd" and rng.random() < cfg.lmbda
    pick = rng.integers(0, len(samples), size=cfg.per_device_train_batch_size * r.dist.world)[mine]
    prompts = [samples[i]["prompt"] for i in pick]
    if not (on_policy or (cfg.method == "gkd" and cfg.seq_kd)):
        return (prompts, [samples[i]["response"] for i in pick],
                [bool(samples[i].get("finished", True)) for i in pick], False, None)
    model, mtok = (r.student, r.stok) if on_policy else (r.teacher, r.ttok)
    with r.dist.full_weights(model):
        gens = generate(model, mtok, prompts, cfg.max_new_tokens, cfg.temperature, seed=step_seed(rt.seed, step, 1),
                        autocast=rt.autocast, use_chat_template=cfg.task.use_chat_template, index_offset=mine.start)
    return prompts, [g.text for g in gens], [g.finished for g in gens], on_policy, gens


def loss_of(r: Run, prompts, responses, finished, on_policy: bool, gens) -> torch.Tensor:
    if r.cfg.method != "sft":
        return r.loss_fn(prompts, responses, finished, on_policy, gens)
    device = next(r.student.parameters()).device
    ids, attn, lmask = encode_sft_batch(r.stok, prompts, responses, device, r.cfg.task.use_chat_template)
    with autocast_ctx(device, r.cfg.runtime.autocast):
        return nll_loss(r.student, ids, attn, lmask, normalise=global_mean)


def write_card(r: Run, out: Path, samples: list[dict], before_acc, log: StepLog, t_start: float) -> dict:
    """Measure the student, save it and the distill card."""
    cfg, dist = r.cfg, r.dist
    r.student.eval()
    dist.barrier()
    final_state = dist.full_state(r.student) if dist.sharded(r.student) else None  # (collective)
    after_acc = held_out_accuracy(r)
    if not dist.is_main:
        return {}
    losses = [row["loss"] for row in log.rows()]
    marked = [float(x["correct"]) for x in samples if isinstance(x.get("correct"), (int, float))]
    card = {"teacher": cfg.teacher, "student": cfg.student, "method": cfg.method,
            "loss": "jsd" if cfg.method == "gkd" else (cfg.loss if cfg.method == "kd" else "nll"),
            "settings": {k: v for k, v in to_dict(cfg).items() if k not in ("task", "runtime")},
            "task": to_dict(cfg.task), "seed": cfg.runtime.seed, "num_teacher_samples": len(samples),
            "teacher_sample_accuracy": float(np.mean(marked)) if marked else None,  # user-given samples may not say
            "student_accuracy_before": before_acc, "student_accuracy": after_acc,
            "first_loss": losses[0] if losses else None,
            "final_loss": float(np.mean(losses[-5:])) if losses else None,
            "cross_tokenizer": cfg.cross_tokenizer if isinstance(r.loss_fn, CrossTokenizerLoss) else None,
            "wall_seconds": time.time() - t_start, "versions": versions(), "precision": cfg.runtime.precision()}
    from ..model_card import distilled_card

    save_model(r.student, r.stok, out / "model", state_dict=final_state, extra_files={"README.md": distilled_card(card)})
    write_json(out / "distill_card.json", card)
    return card


def run(cfg: DistillConfig) -> dict:
    """Distill `cfg.student` from `cfg.teacher`; returns the distill card."""
    t_start = time.time()
    r = setup(cfg)
    out, dist, rt = Path(cfg.output_dir), r.dist, cfg.runtime
    ckpt_root = out / "checkpoints"
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    dist.barrier()
    before_acc = held_out_accuracy(r, before=True)
    samples = sample_teacher(r.teacher, r.ttok, r.task, cfg, out / "teacher_samples.jsonl", r.student, r.stok)
    optimizer = make_optimizer(r.student.parameters(), cfg.learning_rate, weight_decay=0.0)
    scheduler = make_scheduler(optimizer, cfg.max_steps, cfg.warmup_steps)
    log = StepLog(out / "log.jsonl", enabled=dist.is_main, report_to=rt.report_to, config=to_dict(cfg))
    start_step = 0
    if cfg.resume and (state := load_checkpoint(ckpt_root, r.student, optimizer, scheduler)) is not None:
        start_step = state["step"]
        log.truncate_after(start_step)
    elif log.path.exists() and dist.is_main:
        log.path.unlink()
    dist.barrier()
    mine = dist.share(cfg.per_device_train_batch_size)  # this process's rows of the global batch
    bar = tqdm(range(start_step, cfg.max_steps), desc=f"distill {cfg.method}",
               disable=not rt.progress or not dist.is_main, initial=start_step, total=cfg.max_steps)
    for step in bar:
        t0 = time.time()
        prompts, responses, finished, on_policy, gens = batch(r, samples, step, mine)
        t_gen = time.time() - t0
        r.student.train()
        loss = loss_of(r, prompts, responses, finished, on_policy, gens)
        t_score = time.time() - t0 - t_gen  # the loss's forward passes (teacher and student) and divergence
        optimizer_step(r.student, optimizer, loss, cfg.max_grad_norm, step + 1, ckpt_root / "last")
        scheduler.step()
        loss_value = float(dist.sum(loss.detach()))  # the global-batch loss
        log.write({"step": step + 1, "loss": loss_value, "on_policy": on_policy, "s_generate": t_gen,
                   "s_score": t_score, "s_step": time.time() - t0})
        bar.set_postfix(loss=f"{loss_value:.3f}")
        if cfg.save_steps and ((step + 1) % cfg.save_steps == 0 or step + 1 == cfg.max_steps):
            save_checkpoint(ckpt_root, step + 1, r.student, optimizer, scheduler)  # (rank 0 writes)
    log.close()
    return write_card(r, out, samples, before_acc, log, t_start)
