"""Token-level divergences between a teacher and a student next-token distribution.

Conventions (p_T teacher, p_S student, both softmax(logits / temperature) over the vocabulary V):

- ``fkl``  forward KL    KL(p_T || p_S) = sum_v p_T(v) log(p_T(v) / p_S(v))
- ``rkl``  reverse KL    KL(p_S || p_T)
- ``jsd``  generalized JSD_beta with mixture m = beta p_T + (1 - beta) p_S:
           beta KL(p_T || m) + (1 - beta) KL(p_S || m).
           TRL's GKD convention: beta = 0 is *forward* KL and beta = 1 is *reverse* KL (those two
           limits are special-cased exactly as TRL does, since the mixture formula degenerates to 0).
- ``tvd``  total variation 0.5 sum_v |p_T(v) - p_S(v)|
- ``skl``  skew forward KL  KL(p_T || alpha p_T + (1 - alpha) p_S)
- ``srkl`` skew reverse KL  KL(p_S || alpha p_S + (1 - alpha) p_T)

Everything is computed in float32 **chunked over positions**: logits of shape [..., V] are flattened
to [N, V] and processed `chunk_size` rows at a time; with gradients on, each chunk runs under
activation checkpointing so the backward pass also holds only one chunk of [chunk, V] intermediates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

KINDS = ("fkl", "rkl", "jsd", "tvd", "skl", "srkl")


def _kl_from_logprobs(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """sum_v p (log p - log q) per row, with 0 log 0 = 0."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)


def _at_least_f32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def divergence_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "fkl",
                    beta: float = 0.5, alpha: float = 0.1, temperature: float = 1.0) -> torch.Tensor:
    """Per-row divergence for 2-D logits [N, V] (no chunking). See the module docstring."""
    s = F.log_softmax(_at_least_f32(student_logits) / temperature, dim=-1)
    t = F.log_softmax(_at_least_f32(teacher_logits) / temperature, dim=-1)
    if kind == "fkl" or (kind == "jsd" and beta == 0.0):
        return _kl_from_logprobs(t, s)
    if kind == "rkl" or (kind == "jsd" and beta == 1.0):
        return _kl_from_logprobs(s, t)
    if kind == "jsd":
        m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log(1 - beta)]), dim=0)
        return beta * _kl_from_logprobs(t, m) + (1 - beta) * _kl_from_logprobs(s, m)
    if kind == "tvd":
        return 0.5 * (t.exp() - s.exp()).abs().sum(-1)
    if kind == "skl":
        m = torch.logsumexp(torch.stack([t + math.log(alpha), s + math.log(1 - alpha)]), dim=0) if alpha < 1 else t
        return _kl_from_logprobs(t, m)
    if kind == "srkl":
        m = torch.logsumexp(torch.stack([s + math.log(alpha), t + math.log(1 - alpha)]), dim=0) if alpha < 1 else s
        return _kl_from_logprobs(s, m)
    raise ValueError(f"unknown divergence {kind!r}; one of {KINDS}")


def token_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "fkl",
                     mask: torch.Tensor | None = None, beta: float = 0.5, alpha: float = 0.1,
                     temperature: float = 1.0, chunk_size: int = 1024, reduction: str = "mean") -> torch.Tensor:
    """Divergence per position of logits [..., V], chunked over positions.

    mask: bool/0-1 tensor of the leading shape; masked-out positions (padding, prompt) contribute 0
    and are not counted. reduction: "none" (a tensor of the leading shape, 0 where masked), "sum", or
    "mean" (over unmasked positions).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"logit shapes differ: student {tuple(student_logits.shape)} vs teacher {tuple(teacher_logits.shape)}")
    lead = student_logits.shape[:-1]
    V = student_logits.shape[-1]
    s2 = student_logits.reshape(-1, V)
    t2 = teacher_logits.reshape(-1, V)
    m = torch.ones(s2.shape[0], dtype=torch.bool, device=s2.device) if mask is None else mask.reshape(-1).bool()
    fn = lambda s, t: divergence_rows(s, t, kind, beta, alpha, temperature)  # noqa: E731
    needs_grad = torch.is_grad_enabled() and (s2.requires_grad or t2.requires_grad)
    pieces = []
    for start in range(0, s2.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        idx = m[sl].nonzero().squeeze(-1) + start
        if idx.numel() == 0:
            pieces.append(torch.zeros(min(chunk_size, s2.shape[0] - start), device=s2.device))
            continue
        s_c, t_c = s2[idx], t2[idx]
        vals = checkpoint(fn, s_c, t_c, use_reentrant=False) if needs_grad else fn(s_c, t_c)
        row = torch.zeros(min(chunk_size, s2.shape[0] - start), device=s2.device, dtype=vals.dtype)
        pieces.append(row.index_put((idx - start,), vals))
    per_pos = torch.cat(pieces) if pieces else torch.zeros(0, device=s2.device)
    if reduction == "none":
        return per_pos.reshape(lead)
    if reduction == "sum":
        return per_pos.sum()
    return per_pos.sum() / m.sum().clamp(min=1)


def fused_token_divergence(student_hidden: torch.Tensor, student_head: torch.Tensor, teacher_hidden: torch.Tensor,
                           teacher_head: torch.Tensor, kind: str = "fkl", mask: torch.Tensor | None = None,
                           beta: float = 0.5, alpha: float = 0.1, temperature: float = 1.0, chunk_size: int = 256,
                           reduction: str = "mean", student_bias: torch.Tensor | None = None,
                           teacher_bias: torch.Tensor | None = None) -> torch.Tensor:
    """token_divergence computed from hidden states [..., H] and output projections [V, H] (lm_head
    weights), chunked over positions so that the [positions, V] logits never exist at once: each chunk's
    logits are made, reduced to one number and dropped, and made again in the backward pass (activation
    checkpointing). Peak memory is one chunk's logits instead of all of them (for V = 262,144 and 4,096
    positions: ~0.3 GB instead of tens of GB); the result and gradients equal the unfused computation.
    reduction: "sum" or "mean" over unmasked positions."""
    H_s, H_t = student_hidden.shape[-1], teacher_hidden.shape[-1]
    s2, t2 = student_hidden.reshape(-1, H_s), teacher_hidden.reshape(-1, H_t)
    m = torch.ones(s2.shape[0], dtype=torch.bool, device=s2.device) if mask is None else mask.reshape(-1).bool()
    rows = m.nonzero().squeeze(-1)

    def chunk_sum(sh: torch.Tensor, th: torch.Tensor) -> torch.Tensor:
        s_logits = F.linear(sh, student_head, student_bias)
        with torch.no_grad():
            t_logits = F.linear(th, teacher_head, teacher_bias)
        return divergence_rows(s_logits, t_logits, kind, beta, alpha, temperature).sum()

    needs_grad = torch.is_grad_enabled() and (s2.requires_grad or student_head.requires_grad)
    total = s2.new_zeros(())
    for idx in rows.split(chunk_size):
        sh, th = s2[idx], t2[idx]
        total = total + (checkpoint(chunk_sum, sh, th, use_reentrant=False) if needs_grad else chunk_sum(sh, th))
    if reduction == "sum":
        return total
    return total / m.sum().clamp(min=1)


def _target_logprobs(h: torch.Tensor, t: torch.Tensor, head: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    logits = _at_least_f32(F.linear(h, head, bias))
    return logits.gather(-1, t.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)


def fused_target_logprobs(hidden: torch.Tensor, head: torch.Tensor, targets: torch.Tensor,
                          mask: torch.Tensor | None = None, chunk_size: int = 1024,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """log softmax(hidden @ head^T + bias)[target] for every position ([..., H] -> [...]; 0 where `mask`
    is false, and those positions get no logits at all), chunked with activation checkpointing like
    fused_token_divergence: one chunk's [chunk, V] logits exist at a time (float32 log-sum-exp, like
    scoring.gather_logprobs), and the backward pass makes them again."""
    H = hidden.shape[-1]
    h2, t2 = hidden.reshape(-1, H), targets.reshape(-1)
    rows = (torch.arange(h2.shape[0], device=h2.device) if mask is None
            else mask.reshape(-1).bool().nonzero().squeeze(-1))
    needs_grad = torch.is_grad_enabled() and (h2.requires_grad or head.requires_grad)
    parts = []
    for idx in rows.split(chunk_size):
        h, t = h2[idx], t2[idx]
        parts.append(checkpoint(_target_logprobs, h, t, head, bias, use_reentrant=False) if needs_grad
                     else _target_logprobs(h, t, head, bias))
    dtype = torch.promote_types(h2.dtype, torch.float32)
    values = torch.cat(parts) if parts else h2.new_zeros(0, dtype=dtype)
    out = h2.new_zeros(h2.shape[0], dtype=dtype).index_put((rows,), values)
    return out.view(targets.shape)


def head_chunk_rows(vocab_size: int) -> int:
    """Positions per chunk of a fused head loss: at most 64M logits per chunk."""
    return max(16, (1 << 26) // vocab_size)


def topk_accumulated_kl(ref_logits: torch.Tensor, other_logits: torch.Tensor, ks: Sequence[int],
                        temperature: float = 1.0, chunk_size: int = 512) -> torch.Tensor:
    """Top-k accumulated KL(p_ref || p_other) for each k in `ks`.

    The summands p_ref(v) log(p_ref(v)/p_other(v)) are sorted by p_ref(v), descending, and the first k
    are summed (k >= |V| gives the full KL). For forward KL pass (teacher, student); for reverse KL pass
    (student, teacher). Returns [N, len(ks)] for logits [N, V] (leading dims are flattened).
    """
    V = ref_logits.shape[-1]
    r2 = ref_logits.reshape(-1, V)
    o2 = other_logits.reshape(-1, V)
    kk = torch.tensor([min(k, V) for k in ks], device=r2.device) - 1
    out = []
    with torch.no_grad():
        for start in range(0, r2.shape[0], chunk_size):
            lr = F.log_softmax(_at_least_f32(r2[start:start + chunk_size]) / temperature, -1)
            lo = F.log_softmax(_at_least_f32(o2[start:start + chunk_size]) / temperature, -1)
            p = lr.exp()
            summand = torch.where(p > 0, p * (lr - lo), torch.zeros_like(p))
            order = p.argsort(dim=-1, descending=True)
            cum = summand.gather(-1, order).cumsum(-1)
            out.append(cum[:, kk])
    return torch.cat(out) if out else torch.zeros(0, len(ks))


def topk_bucket_logprobs(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int,
                         temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduce both distributions to the teacher's top-k tokens plus one tail bucket (the rest of the
    mass): returns log-probabilities [..., k+1] for (student, teacher). Feed them to
    `token_divergence` with temperature 1 (log_softmax of normalised log-probs is the identity)."""
    t_lp = F.log_softmax(teacher_logits.float() / temperature, -1)
    s_lp = F.log_softmax(student_logits.float() / temperature, -1)
    top = t_lp.topk(min(k, t_lp.shape[-1]), dim=-1).indices
    t_top, s_top = t_lp.gather(-1, top), s_lp.gather(-1, top)

    def with_tail(lp_top):
        tail = torch.log1p(-lp_top.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-7))
        return torch.cat([lp_top, tail], -1)

    return with_tail(s_top), with_tail(t_top)
