"""GRPO with the calibration reward (docs/method.md §3), as components: the per-group standardisation of each
reward, the correctness/well-formedness gate on r_cal, the combined advantage A = A_task + eta * A_cal, the k3
KL estimator and the clipped surrogate loss with TRL's aggregations (grpo, dr_grpo, dapo).

`grpo`'s per-sequence mean is biased toward short responses (Liu et al. 2025, "Understanding R1-Zero-Like
Training"), which in a world whose short modes are the un-imitable ones makes the eta = 0 control itself
partly undistillable; `dr_grpo` (the recipe's default) has no length bias.
"""

from __future__ import annotations

import torch

from .distributed import global_mean
from .scoring import normalise, shared_prompt_token_logprobs, token_logprobs
from .training import autocast_ctx


def group_normalise(r: torch.Tensor, G: int, ema: dict, key: str, decay: float) -> torch.Tensor:
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
    a_task = group_normalise(r_task.double(), G, ema, "task", decay)
    if eta == 0:
        return a_task
    return a_task + eta * group_normalise(r_cal.double(), G, ema, "cal", decay)


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


def per_token_logprobs(model, ids, attn, autocast: bool, positions: torch.Tensor | None = None,
                       groups: tuple | None = None):
    """[B, T-1] log-probs of the next tokens; with `positions` (the response mask) only those get head logits
    (the others are 0): a step needs no log-prob of a prompt or padding token. `groups` = (prompt lengths,
    prompt index per row) of rows that share prompts: each prompt runs once (scoring.shared_prompt_token_logprobs)
    where the model allows."""
    with autocast_ctx(ids.device, autocast):
        if groups is not None and len(set(groups[1])) < len(groups[1]):
            lp = shared_prompt_token_logprobs(model, ids, attn, groups[0], groups[1], positions)
            if lp is not None:
                return lp
        return token_logprobs(model, ids, attn, positions)


def calibration_reward(policy_seq_logprob: torch.Tensor, proxy_seq_logprob: torch.Tensor, texts: list[str],
                       num_tokens: torch.Tensor, how: str, clip: float) -> torch.Tensor:
    """r_cal = (log pi_theta(y|x) - log pi_C(y|x)) normalised by `how` and clipped to [-clip, clip]."""
    r = normalise((policy_seq_logprob - proxy_seq_logprob).double(), texts, num_tokens, how)
    return r.clamp(-clip, clip) if clip > 0 else r
