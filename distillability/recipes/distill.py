"""Distill a student from any teacher (method.md §4): SFT on teacher samples, token-level KD, or
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

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..config import RuntimeConfig, TaskConfig, opt, save_config, sub, to_dict
from ..crosstok import FirstCharProjector, align_pair, uld_distance
from ..distributed import get_dist, global_mean
from ..divergences import (
    divergence_rows,
    fused_target_logprobs,
    fused_token_divergence,
    head_chunk_rows,
    token_divergence,
    topk_bucket_logprobs,
)
from ..errors import ConfigError, DataError, ModelError
from ..evaluation import greedy_accuracy
from ..io import check_output_dir, load_records, require_field, versions, write_json, write_jsonl
from ..models import check_context, lm_parts, same_vocabulary, save_model
from ..sampling import generate
from ..scoring import encode_prompt, gather_logprobs, pad_batch
from ..training import (
    StepLog,
    apply_lora,
    autocast_ctx,
    check_finite,
    encode_generations,
    encode_sft_batch,
    load_checkpoint,
    make_optimizer,
    make_scheduler,
    nll_loss,
    save_checkpoint,
    step_seed,
)


@dataclasses.dataclass
class DistillConfig:
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
    samples_per_prompt: int = opt(1, "Teacher samples per prompt.", min=1)
    sample_temperature: float = opt(1.0, "Temperature of the teacher's samples (0 = greedy).", min=0)
    keep_correct_only: bool = opt(False, "Keep only teacher samples the verifier marks correct.")
    max_new_tokens: int = opt(64, "Max tokens per sampled response (TRL: max_new_tokens).", min=1)
    max_steps: int = opt(100, "Optimizer steps.", min=1)
    per_device_train_batch_size: int = opt(16, "Sequences per step.", min=1)
    learning_rate: float = opt(1e-3, "AdamW learning rate.", min=0, min_exclusive=True)
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


def sample_teacher(teacher, ttok, task, cfg: DistillConfig, path: Path) -> list[dict]:
    """The teacher's responses to the training prompts, saved as JSONL (prompt, response, ...)."""
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
    # each process samples its share of the prompts; per-row seeds make the union equal a 1-process run's
    per = -(-len(prompts) // dist.world)
    mine = dist.share(per)
    gens = generate(teacher, ttok, [e.prompt for e in prompts[mine]], cfg.max_new_tokens, cfg.sample_temperature or 1.0,
                    num_return_sequences=1 if greedy else cfg.samples_per_prompt, greedy=greedy,
                    seed=step_seed(cfg.runtime.seed, 0, 7), autocast=cfg.runtime.autocast,
                    use_chat_template=cfg.task.use_chat_template, index_offset=mine.start)
    part = prompts[mine]
    rows = [{"prompt": part[g.prompt_index].prompt, "response": g.text, "finished": g.finished,
             "correct": task.score(part[g.prompt_index], g.text)} for g in gens]
    rows = dist.gather_objects(rows)
    if cfg.keep_correct_only:
        rows = [r for r in rows if r["correct"] >= 1.0]
    if not rows:
        raise DataError("distill: no teacher samples left after keep_correct_only (the teacher solved none)")
    if dist.is_main:
        write_jsonl(path, rows)
    return rows


def _rows(x: torch.Tensor, pairs: list, side: int) -> torch.Tensor:
    """The aligned positions of every row of x [B, T, ...] (side 0: teacher's encoding, 1: student's), stacked."""
    return torch.cat([x[i, pair[side].positions] for i, pair in enumerate(pairs)])


class TokenLoss:
    """Teacher-student token loss on (prompt, response) text, same vocabulary or across tokenizers."""

    def __init__(self, cfg: DistillConfig, teacher, ttok, student, stok, kind: str):
        self.cfg, self.teacher, self.ttok, self.student, self.stok, self.kind = cfg, teacher, ttok, student, stok, kind
        self.same_vocab = same_vocabulary(ttok, stok)
        if not self.same_vocab and cfg.cross_tokenizer == "refuse":
            raise ModelError(
                f"method '{cfg.method}' needs a shared vocabulary, but the teacher's tokenizer "
                f"({type(ttok).__name__}, {len(ttok)} tokens) differs from the student's ({type(stok).__name__}, "
                f"{len(stok)} tokens); set cross_tokenizer=char or uld, or use method=sft")
        self.projector = FirstCharProjector([ttok, stok]) if not self.same_vocab and cfg.cross_tokenizer == "char" else None

    def __call__(self, prompts: list[str], responses: list[str], finished: list[bool], on_policy: bool,
                 gens: list | None = None) -> torch.Tensor:
        """gens: the sampled Generations behind `responses` (on-policy or seq_kd): with a shared vocabulary the
        loss runs on exactly the sampled tokens instead of a re-tokenisation of their decoded text."""
        cfg, dev = self.cfg, next(self.student.parameters()).device
        chat = cfg.task.use_chat_template
        if self.same_vocab:
            if gens is not None:
                ids, attn, lmask = encode_generations(self.stok, [encode_prompt(self.stok, p, chat) for p in prompts],
                                                      gens, dev)
            else:
                ids, attn, lmask = encode_sft_batch(self.stok, prompts, responses, dev, chat)
            s_parts, t_parts = lm_parts(self.student), lm_parts(self.teacher)
            if not cfg.teacher_top_k and s_parts and t_parts:
                # hidden states + lm_head, chunked: the [positions, V] logits never exist at once
                t_dev = next(self.teacher.parameters()).device
                with torch.no_grad(), autocast_ctx(dev, cfg.runtime.autocast):
                    t_hidden = t_parts[0](input_ids=ids.to(t_dev), attention_mask=attn.to(t_dev)
                                          ).last_hidden_state[:, :-1].to(dev)
                with autocast_ctx(dev, cfg.runtime.autocast):
                    s_hidden = s_parts[0](input_ids=ids, attention_mask=attn).last_hidden_state[:, :-1]
                    s_head, t_head = s_parts[1], t_parts[1]
                    chunk = min(cfg.chunk_size, head_chunk_rows(s_head.weight.shape[0]))
                    total = fused_token_divergence(s_hidden, s_head.weight, t_hidden, t_head.weight.to(dev), self.kind,
                                                   lmask, cfg.beta, cfg.alpha, cfg.temperature, chunk, "sum",
                                                   s_head.bias, None if t_head.bias is None else t_head.bias.to(dev))
                return global_mean(total, lmask.sum())
            with torch.no_grad(), autocast_ctx(dev, cfg.runtime.autocast):
                t_logits = self.teacher(input_ids=ids.to(next(self.teacher.parameters()).device),
                                        attention_mask=attn.to(next(self.teacher.parameters()).device)).logits[:, :-1].to(dev)
            with autocast_ctx(dev, cfg.runtime.autocast):
                s_logits = self.student(input_ids=ids, attention_mask=attn).logits[:, :-1]
            if cfg.teacher_top_k:
                s_lp, t_lp = topk_bucket_logprobs(s_logits, t_logits, cfg.teacher_top_k, cfg.temperature)
                total = token_divergence(s_lp, t_lp, self.kind, lmask, cfg.beta, cfg.alpha, 1.0, cfg.chunk_size,
                                         reduction="sum")
            else:
                total = token_divergence(s_logits, t_logits, self.kind, lmask, cfg.beta, cfg.alpha, cfg.temperature,
                                         cfg.chunk_size, reduction="sum")
            return global_mean(total, lmask.sum())
        # different tokenizers: align positions by character offsets
        pairs = [align_pair(self.ttok, self.stok, p, r, True, chat) for p, r in zip(prompts, responses)]
        t_dev = next(self.teacher.parameters()).device
        t_ids, t_attn = pad_batch([a.ids for a, _ in pairs], self.ttok.pad_token_id, t_dev)
        s_ids, s_attn = pad_batch([b.ids for _, b in pairs], self.stok.pad_token_id, dev)
        s_parts, t_parts = lm_parts(self.student), lm_parts(self.teacher)
        fused = s_parts is not None and t_parts is not None and self.projector is not None
        with autocast_ctx(dev, cfg.runtime.autocast):
            if fused:
                # hidden states, and the heads only where needed: the teacher's [positions, 262k] logits
                # are made a chunk of aligned rows at a time and reduced to next-character distributions
                with torch.no_grad():
                    t_h = t_parts[0](input_ids=t_ids, attention_mask=t_attn).last_hidden_state
                    t_rows = _rows(t_h, pairs, 0).to(dev)
                    t_head = t_parts[1]
                    t_char = self.projector.project_hidden(
                        t_rows, t_head.weight.to(dev), 0, cfg.temperature,
                        None if t_head.bias is None else t_head.bias.to(dev), head_chunk_rows(t_head.weight.shape[0]))
                s_h = s_parts[0](input_ids=s_ids, attention_mask=s_attn).last_hidden_state
                s_head = s_parts[1]
                s_rows = F.linear(_rows(s_h, pairs, 1),
                                  s_head.weight, s_head.bias)
                per_row = divergence_rows(self.projector.project(s_rows, 1, cfg.temperature), t_char, self.kind,
                                          cfg.beta, cfg.alpha)
            else:
                with torch.no_grad():
                    t_logits = self.teacher(input_ids=t_ids, attention_mask=t_attn).logits.to(dev)
                s_logits = self.student(input_ids=s_ids, attention_mask=s_attn).logits
                rows_t = _rows(t_logits, pairs, 0)
                rows_s = _rows(s_logits, pairs, 1)
                if self.projector is not None:
                    per_row = divergence_rows(self.projector.project(rows_s, 1, cfg.temperature),
                                              self.projector.project(rows_t, 0, cfg.temperature), self.kind,
                                              cfg.beta, cfg.alpha)
                else:
                    per_row = uld_distance(rows_s, rows_t, cfg.temperature)
        loss = global_mean(per_row.sum(), per_row.numel())
        if not on_policy and cfg.ce_weight:
            # identity of the tokens comes from the teacher's text itself: NLL of the student's own encoding
            # (align_pair encodes by the same boundary rule as SFT), reusing the forward pass above
            T = s_ids.shape[1]
            pos = torch.arange(T - 1, device=dev).expand(len(pairs), T - 1)
            plen = torch.tensor([b.prompt_len for _, b in pairs], device=dev).unsqueeze(1)
            lens = torch.tensor([len(b.ids) for _, b in pairs], device=dev).unsqueeze(1)
            lmask = (pos >= plen - 1) & (pos < lens - 1)
            if fused:
                with autocast_ctx(dev, cfg.runtime.autocast):
                    lp = fused_target_logprobs(s_h[:, :-1], s_head.weight, s_ids[:, 1:], lmask,
                                               head_chunk_rows(s_head.weight.shape[0]), s_head.bias)
            else:
                lp = gather_logprobs(s_logits[:, :-1], s_ids[:, 1:])
            loss = loss + cfg.ce_weight * global_mean(-(lp * lmask).sum(), lmask.sum())
        return loss


def run(cfg: DistillConfig) -> dict:
    """Distill `cfg.student` from `cfg.teacher`; returns the distill card."""
    if not cfg.teacher or not cfg.student:
        raise ConfigError("config keys 'teacher' and 'student' are required")
    rt = cfg.runtime
    check_output_dir(cfg.output_dir)
    rt.start()
    out = Path(cfg.output_dir)
    ckpt_root = out / "checkpoints"
    t_start = time.time()
    from_data = cfg.teacher == "dataset"
    if from_data and (cfg.method != "sft" or cfg.teacher_samples):
        raise ConfigError("config key 'teacher': 'dataset' works with method=sft and no teacher_samples")
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
    token_loss = None
    if cfg.method in ("kd", "gkd"):
        token_loss = TokenLoss(cfg, teacher, ttok, student, stok, "jsd" if cfg.method == "gkd" else cfg.loss)

    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    dist.barrier()
    with dist.full_weights(student):
        before_acc = greedy_accuracy(student, stok, task, held_out, cfg.max_new_tokens, rt.autocast, chat)[0] if dist.is_main else None
    samples = sample_teacher(teacher, ttok, task, cfg, out / "teacher_samples.jsonl")
    marked = [float(r["correct"]) for r in samples if isinstance(r.get("correct"), (int, float))]
    teacher_sample_acc = float(np.mean(marked)) if marked else None  # user-given samples may not say

    optimizer = make_optimizer(student.parameters(), cfg.learning_rate, weight_decay=0.0)
    scheduler = make_scheduler(optimizer, cfg.max_steps, cfg.warmup_steps)
    log = StepLog(out / "log.jsonl", enabled=dist.is_main)
    start_step = 0
    if cfg.resume and (state := load_checkpoint(ckpt_root, student, optimizer, scheduler)) is not None:
        start_step = state["step"]
        log.truncate_after(start_step)
    elif log.path.exists() and dist.is_main:
        log.path.unlink()
    dist.barrier()
    b = cfg.per_device_train_batch_size
    mine = dist.share(b)  # this process's rows of the global batch of b * world sequences

    bar = tqdm(range(start_step, cfg.max_steps), desc=f"distill {cfg.method}", disable=not rt.progress or not dist.is_main,
               initial=start_step, total=cfg.max_steps)
    device = next(student.parameters()).device
    for step in bar:
        t0 = time.time()
        rng = np.random.default_rng(step_seed(rt.seed, step))
        on_policy = cfg.method == "gkd" and rng.random() < cfg.lmbda
        pick = rng.integers(0, len(samples), size=b * dist.world)[mine]
        prompts = [samples[i]["prompt"] for i in pick]
        if on_policy or (cfg.method == "gkd" and cfg.seq_kd):
            model, mtok = (student, stok) if on_policy else (teacher, ttok)
            with dist.full_weights(model):
                gens = generate(model, mtok, prompts, cfg.max_new_tokens, cfg.temperature,
                                seed=step_seed(rt.seed, step, 1), autocast=rt.autocast, use_chat_template=chat,
                                index_offset=mine.start)
            responses, finished = [g.text for g in gens], [g.finished for g in gens]
        else:
            gens = None
            responses = [samples[i]["response"] for i in pick]
            finished = [bool(samples[i].get("finished", True)) for i in pick]
        t_gen = time.time() - t0
        student.train()
        if cfg.method == "sft":
            ids, attn, lmask = encode_sft_batch(stok, prompts, responses, device, chat)
            with autocast_ctx(device, rt.autocast):
                loss = nll_loss(student, ids, attn, lmask, normalise=global_mean)
        else:
            loss = token_loss(prompts, responses, finished, on_policy, gens)
        check_finite(loss, step + 1, ckpt_root / "last")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        dist.sync_gradients(list(student.parameters()))
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        loss_value = float(dist.sum(loss.detach()))  # the global-batch loss
        log.write({"step": step + 1, "loss": loss_value, "on_policy": on_policy, "s_generate": t_gen,
                   "s_step": time.time() - t0})
        bar.set_postfix(loss=f"{loss_value:.3f}")
        if cfg.save_steps and ((step + 1) % cfg.save_steps == 0 or step + 1 == cfg.max_steps):
            save_checkpoint(ckpt_root, step + 1, student, optimizer, scheduler)  # (rank 0 writes)

    student.eval()
    dist.barrier()
    final_state = dist.full_state(student) if dist.sharded(student) else None  # (collective)
    with dist.full_weights(student):
        after_acc = greedy_accuracy(student, stok, task, held_out, cfg.max_new_tokens, rt.autocast, chat)[0] if dist.is_main else None
    if not dist.is_main:
        return {}
    losses = [r["loss"] for r in log.rows()]
    card = {"teacher": cfg.teacher, "student": cfg.student, "method": cfg.method,
            "loss": "jsd" if cfg.method == "gkd" else (cfg.loss if cfg.method == "kd" else "nll"),
            "settings": {k: v for k, v in to_dict(cfg).items() if k not in ("task", "runtime")},
            "task": to_dict(cfg.task), "seed": rt.seed, "num_teacher_samples": len(samples),
            "teacher_sample_accuracy": teacher_sample_acc, "student_accuracy_before": before_acc,
            "student_accuracy": after_acc, "first_loss": losses[0] if losses else None,
            "final_loss": float(np.mean(losses[-5:])) if losses else None,
            "cross_tokenizer": None if token_loss is None or token_loss.same_vocab else cfg.cross_tokenizer,
            "wall_seconds": time.time() - t_start, "versions": versions(), "precision": rt.precision()}
    save_model(student, stok, out / "model", state_dict=final_state)
    write_json(out / "distill_card.json", card)
    return card
