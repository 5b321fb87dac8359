"""Sequence-level KL estimators, on- and off-policy (docs/method.md §2).

For y ~ pi_A, the log-ratio d(y) = log pi_A(y|x) - log pi_B(y|x) estimates KL_seq(pi_A || pi_B).
Schulman's estimators with r = pi_B(y)/pi_A(y) (the "reference over sampling policy" ratio):
k1 = -log r, k2 = (log r)^2 / 2, k3 = r - 1 - log r (unbiased and always >= 0).

Off-policy: to estimate KL(pi_S || pi_T) from samples y ~ pi_T, weight each sample by the whole-
sequence importance weight w(y) = pi_S(y)/pi_T(y) and average w(y) * log(pi_S(y)/pi_T(y)); the
self-normalised variant divides by sum w. The effective sample size (sum w)^2 / sum w^2 shows how few
samples actually carry the estimate.
"""

from __future__ import annotations

import math

import torch


def kl_estimators(logp_sampler: torch.Tensor, logp_other: torch.Tensor) -> dict[str, float]:
    """Estimates of KL(sampler || other) from per-sample sequence log-probs of samples y ~ sampler."""
    log_r = (logp_other - logp_sampler).double()
    k1 = -log_r
    k2 = 0.5 * log_r**2
    k3 = torch.expm1(log_r) - log_r
    n = log_r.numel()
    return {
        "k1": k1.mean().item(), "k2": k2.mean().item(), "k3": k3.mean().item(),
        "k1_var": k1.var().item() if n > 1 else 0.0, "k3_var": k3.var().item() if n > 1 else 0.0, "n": n,
    }


def effective_sample_size(log_w: torch.Tensor) -> float:
    """(sum w)^2 / sum w^2, computed stably in log space."""
    log_w = log_w.double()
    return math.exp(2 * torch.logsumexp(log_w, 0).item() - torch.logsumexp(2 * log_w, 0).item())


def off_policy_reverse_kl(logp_student: torch.Tensor, logp_teacher: torch.Tensor) -> dict[str, float]:
    """KL(pi_S || pi_T) estimated from samples y ~ pi_T (teacher samples) by importance weighting."""
    log_w = (logp_student - logp_teacher).double()
    w = log_w.exp()
    terms = w * log_w
    n = log_w.numel()
    snis = (terms.sum() / w.sum()).item() if w.sum() > 0 else float("nan")
    return {
        "estimate": terms.mean().item(), "estimate_self_normalised": snis,
        "variance": terms.var().item() if n > 1 else 0.0, "weight_variance": w.var().item() if n > 1 else 0.0,
        "ess": effective_sample_size(log_w), "n": n, "max_weight_share": (w.max() / w.sum()).item() if n else float("nan"),
    }
