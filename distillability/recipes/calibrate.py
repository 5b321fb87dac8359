"""Calibrate a teacher's distillability with reinforcement fine-tuning (method.md §3).

For each batch of prompts, sample G responses from the current teacher pi_theta and score
  r_task = the task's verifier (in [0, 1]),
  r_cal  = log pi_theta(y|x) - log pi_C(y|x)   (a single-sample estimate of D(pi_theta || pi_C),
           each model scoring the response *text* with its own tokenizer; normalised per character
           by default, clipped, optionally gated on well-formedness).
The two rewards are standardised separately within each group (running EMA statistics stand in when
a group has no spread) and combined as A = A_task + eta * A_cal:
  eta < 0 pulls the teacher toward what the proxy finds likely (distillable),
  eta > 0 pushes it away (undistillable), eta = 0 is plain GRPO on the task.
Loss: GRPO clipped surrogate with ratio pi_theta/pi_old, plus beta * k3 KL to the frozen original
teacher pi_0, k3 = exp(log pi_0 - log pi_theta) - (log pi_0 - log pi_theta) - 1 per token.
Loss types (TRL's names): `dr_grpo` (default: sum over tokens / (num sequences * max_completion_length)),
`grpo` (mean over each sequence's tokens, then over sequences), `dapo` (mean over all tokens; TRL's default,
the same as dr_grpo up to a per-batch constant). `grpo`'s per-sequence mean is biased toward short
responses (a short correct answer gets a larger per-token push than a long one, a long wrong one a smaller
penalty; Liu et al. 2025, "Understanding R1-Zero-Like Training"): with eta = 0 it drifts the teacher toward
its short modes, which in the tiny world are the ones a small student cannot imitate, so the eta = 0
control itself became partly undistillable (bench/README.md, knob).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import RuntimeConfig, TaskConfig, opt, save_config, sub, to_dict
from ..distributed import get_dist, global_mean
from ..errors import ConfigError
from ..evaluation import greedy_accuracy, mean_calibration_divergence
from ..io import check_output_dir, versions, write_json
from ..models import check_context, pick_device, save_model
from ..sampling import generate
from ..scoring import encode_prompt, sequence_logprobs, token_logprobs
from ..training import (
    StepLog,
    apply_lora,
    autocast_ctx,
    check_finite,
    encode_generations,
    load_checkpoint,
    make_optimizer,
    make_scheduler,
    read_weights,
    save_checkpoint,
    step_seed,
    write_weights,
)


@dataclasses.dataclass
class CalibrateConfig:
    model: str = opt("", "The teacher to calibrate (folder, packaged:NAME or hub id); also the frozen pi_0.")
    proxy: str = opt("", "The calibration proxy pi_C (any tokenizer).")
    output_dir: str = opt("runs/calibrate", "Where the calibrated model, card, logs and checkpoints go.")
    eta: float = opt(0.0, "The knob: < 0 distillable, > 0 undistillable, 0 plain GRPO.")
    beta: float = opt(0.04, "Weight of the k3 KL anchor to the original teacher.", min=0)
    num_generations: int = opt(8, "G: responses per prompt (group size).", min=2)
    prompts_per_step: int = opt(8, "Prompts per optimizer step (batch = prompts_per_step * G).", min=1)
    max_steps: int = opt(50, "Optimizer steps (one generation round each).", min=1)
    num_iterations: int = opt(1, "Optimisation passes over each generation round (TRL's num_iterations).", min=1)
    learning_rate: float = opt(1e-4, "AdamW learning rate.", min=0, min_exclusive=True)
    warmup_steps: int = opt(0, "Linear warm-up steps.", min=0)
    temperature: float = opt(1.0, "Sampling temperature of the teacher's responses.", min=0, min_exclusive=True)
    max_completion_length: int = opt(64, "Max new tokens per response.", min=1)
    epsilon: float = opt(0.2, "PPO/GRPO clip range of the ratio.", min=0)
    loss_type: str = opt("dr_grpo", "Loss aggregation: dr_grpo (no length bias), grpo (per-sequence mean, "
                         "favours short responses) or dapo (per-token mean over the batch).",
                         choices=("grpo", "dr_grpo", "dapo"))
    cal_normalization: str = opt("char", "Length normalisation of r_cal: none (summed), token, char.",
                                 choices=("none", "token", "char"))
    cal_clip: float = opt(5.0, "Clip r_cal to [-cal_clip, cal_clip] (0 = no clipping).", min=0)
    wellformed_gate: str = opt("worst", "r_cal of a gated response (gate_on: malformed or wrong): off, zero, or worst (the "
                               "group's least favourable value for this eta).",
                               choices=("off", "zero", "worst"))
    gate_on: str = opt("malformed", "Which responses the gate applies to: malformed (the task cannot parse them) or "
                       "wrong (every response the verifier does not score 1, malformed ones included: r_cal then "
                       "only ranks correct responses, so eta never trades accuracy for divergence).",
                       choices=("malformed", "wrong"))
    ema_decay: float = opt(0.9, "Decay of the running reward statistics used when a group has no spread.", min=0, max=1)
    max_grad_norm: float = opt(1.0, "Gradient clipping norm.", min=0)
    use_peft: bool = opt(False, "Train LoRA adapters (peft) instead of all weights.")
    lora_r: int = opt(16, "LoRA rank.", min=1)
    lora_alpha: int = opt(32, "LoRA alpha.", min=1)
    eval_prompts: int = opt(64, "Held-out prompts for the before/after accuracy and D in the card.", min=1)
    min_accuracy_ratio: float = opt(0.0, "Utility guard: every guard_steps, greedy accuracy on guard_prompts validation "
                                    "prompts (never the card's held-out ones); the result is the last checked step "
                                    "whose accuracy is >= this x the start's (no step: the start). 0 = off: the final "
                                    "weights.", min=0, max=1)
    guard_steps: int = opt(5, "Utility guard: steps between accuracy checks.", min=1)
    guard_prompts: int = opt(64, "Utility guard: number of validation prompts.", min=1)
    guard_split: str = opt("held_out", "Utility guard: where the validation prompts come from: held_out (the task's "
                           "held-out split's last guard_prompts, disjoint from the card's eval_prompts; needs "
                           "task.num_eval >= eval_prompts + guard_prompts; the pipeline keeps its evaluations off "
                           "them too) or train (the end of the training split, then not used for RL; only "
                           "meaningful when the model has not memorised its training prompts).",
                           choices=("held_out", "train"))
    eval_samples: int = opt(2, "Samples per held-out prompt for the mean D.", min=1)
    save_steps: int = opt(10, "Checkpoint every N steps (0 = only at the end).", min=0)
    resume: bool = opt(False, "Continue from the last checkpoint in output_dir.")
    task: TaskConfig = sub(TaskConfig, "The task (prompts and verifier).")
    runtime: RuntimeConfig = sub(RuntimeConfig, "Devices, precision, threads, seed.")

    def validate(self) -> None:
        if self.num_generations < 2:
            raise ConfigError("config key 'num_generations': must be >= 2 (a group needs spread)")
        if self.gate_on == "wrong" and self.wellformed_gate == "off":
            raise ConfigError("config key 'gate_on': 'wrong' gates nothing while wellformed_gate is 'off' (use worst)")


def _group_normalise(r: torch.Tensor, G: int, ema: dict, key: str, decay: float) -> torch.Tensor:
    """(r - mean_group) / (std_group + eps); groups with zero spread use the running EMA statistics."""
    groups = r.view(-1, G)
    mean, std = groups.mean(1, keepdim=True), groups.std(1, keepdim=True)
    m_b, s_b = r.mean().item(), r.std().item() if r.numel() > 1 else 0.0
    if key in ema:
        ema[key] = [decay * ema[key][0] + (1 - decay) * m_b, decay * ema[key][1] + (1 - decay) * s_b]
    else:
        ema[key] = [m_b, s_b]
    flat = std < 1e-6
    run_mean = torch.full_like(mean, ema[key][0])
    run_std = torch.full_like(std, max(ema[key][1], 1e-6))
    out_mean = torch.where(flat, run_mean, mean)
    out_std = torch.where(flat, run_std, std)
    adv = (groups - out_mean) / (out_std + 1e-4)
    # a flat group whose running spread is ~0 carries no signal at all
    adv = torch.where(flat & (run_std <= 1e-6), torch.zeros_like(adv), adv)
    return adv.view(-1)


def compute_advantages(r_task: torch.Tensor, r_cal: torch.Tensor, eta: float, G: int, ema: dict,
                       decay: float = 0.9) -> torch.Tensor:
    """A_i = Ahat_task,i + eta * Ahat_cal,i with the two rewards standardised separately per group."""
    a_task = _group_normalise(r_task.double(), G, ema, "task", decay)
    if eta == 0:
        return a_task
    return a_task + eta * _group_normalise(r_cal.double(), G, ema, "cal", decay)


def gate_calibration_reward(r_cal: torch.Tensor, bad: torch.Tensor, G: int, eta: float, how: str) -> torch.Tensor:
    """r_cal with the gated responses (`bad`) replaced: "zero", or "worst", the value their group would least like
    under this eta (eta > 0 rewards a high r_cal, eta < 0 a low one), so a gated response never gains from r_cal."""
    if how == "off" or not bool(bad.any()):
        return r_cal
    if how == "zero":
        return torch.where(bad, torch.zeros_like(r_cal), r_cal)
    grp = r_cal.view(-1, G)
    worst = grp.min(1, keepdim=True).values if eta > 0 else grp.max(1, keepdim=True).values
    return torch.where(bad, worst.expand(-1, G).reshape(-1), r_cal)


def k3(logp_ref: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """k3 = exp(log pi_0 - log pi) - (log pi_0 - log pi) - 1 (per token, >= 0)."""
    d = logp_ref - logp
    return torch.exp(d) - d - 1


def grpo_loss(logp: torch.Tensor, logp_old: torch.Tensor, logp_ref: torch.Tensor | None, adv: torch.Tensor,
              mask: torch.Tensor, epsilon: float, beta: float, loss_type: str, max_len: int):
    """Clipped surrogate + beta * k3 per token, aggregated by `loss_type`. Returns (loss, clip_fraction, kl)."""
    ratio = torch.exp(logp - logp_old)
    a = adv.unsqueeze(1).to(logp.dtype)
    per_token = -torch.min(ratio * a, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * a)
    kl = k3(logp_ref, logp) if logp_ref is not None else torch.zeros_like(logp)
    if beta:
        per_token = per_token + beta * kl
    m = mask.to(logp.dtype)
    # normalised by global counts (sequences / tokens over all processes; with one process the plain means)
    if loss_type == "grpo":
        loss = global_mean(((per_token * m).sum(1) / m.sum(1).clamp(min=1)).sum(), logp.shape[0])
    elif loss_type == "dr_grpo":
        loss = global_mean((per_token * m).sum(), logp.shape[0] * max_len)
    else:  # dapo
        loss = global_mean((per_token * m).sum(), m.sum())
    clipped = ((ratio - 1).abs() > epsilon).to(logp.dtype)
    return loss, ((clipped * m).sum() / m.sum().clamp(min=1)).item(), ((kl * m).sum() / m.sum().clamp(min=1)).item()


def _per_token_logprobs(model, ids, attn, autocast: bool):
    with autocast_ctx(ids.device, autocast):
        return token_logprobs(model, ids, attn)


def calibration_reward(policy_seq_logprob: torch.Tensor, proxy_seq_logprob: torch.Tensor, texts: list[str],
                       num_tokens: torch.Tensor, how: str, clip: float) -> torch.Tensor:
    """r_cal = (log pi_theta(y|x) - log pi_C(y|x)) normalised by `how` and clipped to [-clip, clip]."""
    from ..scoring import normalise

    r = normalise((policy_seq_logprob - proxy_seq_logprob).double(), texts, num_tokens, how)
    return r.clamp(-clip, clip) if clip > 0 else r


def run(cfg: CalibrateConfig) -> dict:
    """Calibrate `cfg.model` against `cfg.proxy`; returns the calibration card."""
    if not cfg.model or not cfg.proxy:
        raise ConfigError("config keys 'model' and 'proxy' are required")
    rt = cfg.runtime
    check_output_dir(cfg.output_dir)
    rt.start()
    out = Path(cfg.output_dir)
    ckpt_root = out / "checkpoints"
    t_start = time.time()

    policy, tok = rt.load(cfg.model)
    proxy, ptok = rt.load(cfg.proxy, frozen=True)
    dist = get_dist()
    dist.start(next(policy.parameters()).device)
    if cfg.use_peft:
        policy = apply_lora(policy, cfg.lora_r, cfg.lora_alpha)
        reference = None  # pi_0 = the base weights, reached by disabling the adapter
    else:
        reference = copy.deepcopy(policy).to(pick_device(rt.frozen_device)).requires_grad_(False).eval()
    policy = dist.wrap(policy)  # FSDP: shard the policy (a no-op for data-parallel or one process)
    task = cfg.task.load()
    held_out = task.eval[: cfg.eval_prompts]
    pool, val = task.train, []  # RL prompts; the utility guard's validation prompts
    if cfg.min_accuracy_ratio > 0 and cfg.guard_split == "train":
        if len(task.train) <= cfg.guard_prompts:
            raise ConfigError(f"config key 'guard_prompts': {cfg.guard_prompts} validation prompts leave none of the "
                              f"{len(task.train)} training prompts for RL")
        lo = len(task.train) - cfg.guard_prompts
        pool, val, val_where = task.train[:lo], task.train[lo:], f"train[{lo}:{len(task.train)}]"
    elif cfg.min_accuracy_ratio > 0:
        # the held-out split's *last* prompts: every evaluation that takes a prefix of the split shorter than
        # num_eval - guard_prompts never scores the prompts that selected the checkpoint
        if len(task.eval) < len(held_out) + cfg.guard_prompts:
            raise ConfigError(f"config key 'guard_prompts': the guard needs {cfg.guard_prompts} held-out prompts after "
                              f"the {len(held_out)} eval_prompts, but task.num_eval gives {len(task.eval)}; raise "
                              f"task.num_eval or set guard_split=train")
        lo = len(task.eval) - cfg.guard_prompts
        val, val_where = task.eval[lo:], f"eval[{lo}:{len(task.eval)}]"
    check_context(policy, tok, task.train + held_out, cfg.max_completion_length, cfg.task.use_chat_template, cfg.model)
    device = next(policy.parameters()).device
    G, B = cfg.num_generations, cfg.prompts_per_step
    chat = cfg.task.use_chat_template

    def card_metrics(model, tag: str) -> dict:
        acc, _ = greedy_accuracy(model, tok, task, held_out, cfg.max_completion_length, rt.autocast, chat)
        d = mean_calibration_divergence(model, tok, proxy, ptok, held_out, cfg.max_completion_length,
                                        cfg.temperature, cfg.eval_samples, seed=rt.seed + 99, autocast=rt.autocast,
                                        use_chat_template=chat)
        return {f"{tag}_accuracy": acc, f"{tag}_D_per_char": d["per_char"], f"{tag}_D_summed": d["summed"],
                f"{tag}_mean_chars": d["mean_chars"]}

    optimizer = make_optimizer(policy.parameters(), cfg.learning_rate)
    scheduler = make_scheduler(optimizer, cfg.max_steps, cfg.warmup_steps)
    log = StepLog(out / "log.jsonl", enabled=dist.is_main)
    ema: dict = {}
    start_step, before, guard = 0, None, None
    if cfg.resume:
        state = load_checkpoint(ckpt_root, policy, optimizer, scheduler)
        if state is not None:
            start_step, ema, before, guard = state["step"], state["ema"], state["before"], state.get("guard")
            log.truncate_after(start_step)
    elif dist.is_main:
        log.path.unlink(missing_ok=True)
    with dist.full_weights(policy):
        if before is None and dist.is_main:
            before = card_metrics(policy, "before")
    guard_file = ckpt_root / "guard_selected.safetensors"

    def val_accuracy() -> float:
        """Greedy accuracy on the guard's prompts, on rank 0 (0.0 elsewhere); every rank calls."""
        with dist.full_weights(policy):
            return greedy_accuracy(policy, tok, task, val, cfg.max_completion_length, rt.autocast, chat)[0] if dist.is_main else 0.0

    if val and guard is None:
        start_acc = val_accuracy()
        guard = {"ratio": cfg.min_accuracy_ratio, "start_accuracy": start_acc, "prompts": val_where,
                 "threshold": cfg.min_accuracy_ratio * start_acc, "checks": {}, "selected_step": 0}
        write_weights(policy, guard_file)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    dist.barrier()

    def ref_logprobs(ids, attn):
        with torch.no_grad():
            if reference is not None:
                return _per_token_logprobs(reference, ids.to(next(reference.parameters()).device),
                                           attn.to(next(reference.parameters()).device), rt.autocast).to(device)
            with policy.disable_adapter():
                return _per_token_logprobs(policy, ids, attn, rt.autocast)

    mine = dist.share(B)  # this process's prompts of the global B * world
    rows_mine = dist.share(B * G)
    bar = tqdm(range(start_step, cfg.max_steps), desc=f"calibrate eta={cfg.eta:+g}", disable=not rt.progress or not dist.is_main,
               initial=start_step, total=cfg.max_steps)
    for step in bar:
        t0 = time.time()
        rng = np.random.default_rng(step_seed(rt.seed, step))
        batch = [pool[i] for i in rng.choice(len(pool), size=min(B * dist.world, len(pool)), replace=False)][mine]
        prompts = [e.prompt for e in batch]
        prompt_ids = [encode_prompt(tok, p, chat) for p in prompts]

        # 1. sample G responses per prompt from the current policy (KV-cached batched generation)
        with dist.full_weights(policy):
            gens = generate(policy, tok, prompts, cfg.max_completion_length, cfg.temperature, num_return_sequences=G,
                            seed=step_seed(rt.seed, step, 1), autocast=rt.autocast, use_chat_template=chat,
                            index_offset=mine.start)
        texts = [g.text for g in gens]
        gen_prompts = [prompts[g.prompt_index] for g in gens]
        ids, attn, mask = encode_generations(tok, prompt_ids, gens, device)
        t_gen = time.time() - t0

        # 2. rewards: task verifier, and r_cal from the policy's own log-probs minus the proxy's (text level)
        r_task = torch.tensor([task.score(batch[g.prompt_index], g.text) for g in gens], dtype=torch.float64)
        # the frozen models first, so their activations are gone before the policy's graph is built
        logp_ref = ref_logprobs(ids, attn) if cfg.beta else None
        prox = None
        if cfg.eta != 0:
            prox = sequence_logprobs(proxy, ptok, gen_prompts, texts, [g.finished for g in gens], chat,
                                     autocast=rt.autocast)["logprob"]
        logp_first = None
        if cfg.num_iterations == 1:
            # one forward serves as pi_old (detached), as the policy's own log-prob for r_cal, and as the
            # graph of the single update: ratio = 1, the same gradient as a second forward, one forward less
            policy.train()
            logp_first = _per_token_logprobs(policy, ids, attn, rt.autocast)
            logp_old = logp_first.detach()
        else:
            policy.eval()
            with torch.no_grad():
                logp_old = _per_token_logprobs(policy, ids, attn, rt.autocast)
        r_cal = torch.zeros(len(gens), dtype=torch.float64)
        if cfg.eta != 0:
            own = (logp_old.double() * mask).sum(1).cpu()
            r_cal = calibration_reward(own, prox, texts, mask.sum(1).cpu(), cfg.cal_normalization, cfg.cal_clip)
            if cfg.wellformed_gate != "off":
                if cfg.gate_on == "wrong":
                    bad = r_task < 1
                else:
                    bad = torch.tensor([not task.well_formed(batch[g.prompt_index], g.text) for g in gens])
                r_cal = gate_calibration_reward(r_cal, bad, G, cfg.eta, cfg.wellformed_gate)
        # advantages from the global batch's rewards (the EMA statistics are global too), then this share
        r_task, r_cal = dist.gather(r_task), dist.gather(r_cal)
        adv = compute_advantages(r_task, r_cal, cfg.eta, G, ema, cfg.ema_decay)[rows_mine].to(device)
        t_score = time.time() - t0 - t_gen

        # 3. policy-gradient update(s)
        policy.train()
        for it in range(cfg.num_iterations):
            logp = logp_first if it == 0 and logp_first is not None else _per_token_logprobs(policy, ids, attn, rt.autocast)
            loss, clip_frac, kl = grpo_loss(logp, logp_old, logp_ref, adv, mask, cfg.epsilon, cfg.beta,
                                            cfg.loss_type, cfg.max_completion_length)
            check_finite(loss, step + 1, ckpt_root / "last")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            dist.sync_gradients(list(policy.parameters()))
            torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
            optimizer.step()
        scheduler.step()
        dt = time.time() - t0
        n_tokens = int(attn.sum())
        at_clip = float((r_cal.abs() >= cfg.cal_clip).double().mean()) if cfg.cal_clip > 0 and cfg.eta else 0.0
        row = {"step": step + 1, "loss": float(dist.sum(loss.detach())), "task_reward": r_task.mean().item(),
               "r_cal": r_cal.mean().item(), "r_cal_at_clip": at_clip, "kl_ref": float(dist.sum(kl)) / dist.world,
               "response_chars": float(dist.sum(float(np.mean([len(t) for t in texts])))) / dist.world,
               "response_tokens": mask.sum(1).float().mean().item(), "adv_std": adv.std().item(),
               "clip_frac": clip_frac, "tokens_per_s": n_tokens / dt, "s_generate": t_gen, "s_score": t_score,
               "s_step": dt}
        if guard is not None and ((step + 1) % cfg.guard_steps == 0 or step + 1 == cfg.max_steps):
            acc = val_accuracy()
            guard["checks"][str(step + 1)] = acc
            row["guard_val_accuracy"] = acc
            keep = float(dist.sum(float(dist.is_main and acc >= guard["threshold"]))) > 0  # rank 0 decides
            if keep:
                guard["selected_step"] = step + 1
                write_weights(policy, guard_file)
        log.write(row)
        bar.set_postfix(reward=f"{row['task_reward']:.2f}", r_cal=f"{row['r_cal']:.3f}", kl=f"{kl:.3f}")
        if cfg.save_steps and ((step + 1) % cfg.save_steps == 0 or step + 1 == cfg.max_steps):
            save_checkpoint(ckpt_root, step + 1, policy, optimizer, scheduler,  # (rank 0 writes)
                            {"ema": ema, "before": before, "guard": guard})

    policy.eval()
    dist.barrier()
    if guard is not None and guard["selected_step"] != cfg.max_steps:
        read_weights(policy, guard_file)  # the last step that kept the teacher's accuracy
    final_state = dist.full_state(policy) if dist.sharded(policy) else None  # (collective)
    with dist.full_weights(policy):
        after = card_metrics(policy, "after") if dist.is_main else None
    if not dist.is_main:
        return {}
    card = {"eta": cfg.eta, "beta": cfg.beta, "model": cfg.model, "proxy": cfg.proxy, "task": to_dict(cfg.task),
            "steps": cfg.max_steps, "seed": rt.seed, "loss_type": cfg.loss_type,
            "cal_normalization": cfg.cal_normalization, "num_generations": G, "learning_rate": cfg.learning_rate,
            **before, **after, "guard": guard, "wall_seconds": time.time() - t_start, "versions": versions(), "precision": rt.precision()}
    save_model(policy, tok, out / "model", state_dict=final_state)
    write_json(out / "calibration_card.json", card)
    return card
