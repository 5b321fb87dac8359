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


def closed_form_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str, beta: float = 0.5,
                     temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """divergence_rows for fkl / rkl / jsd and its gradient w.r.t. the student's logits, in closed form (float32,
    no autograd graph). With p = softmax(z_S / tau), q = softmax(z_T / tau): fkl gives (p - q) / tau; rkl and jsd
    give p * (g - <p, g>) / tau with g = log p - log q (rkl) or (1 - beta) (log p - log m), m = beta q + (1 - beta) p
    (jsd: d/dp of beta KL(q||m) + (1 - beta) KL(p||m) is (1 - beta) log(p / m))."""
    s = F.log_softmax(_at_least_f32(student_logits) / temperature, dim=-1)
    t = F.log_softmax(_at_least_f32(teacher_logits) / temperature, dim=-1)
    p = s.exp()
    if kind == "fkl" or (kind == "jsd" and beta == 0.0):
        q = t.exp()
        return _kl_from_logprobs(t, s), (p - q) / temperature
    if kind == "rkl" or (kind == "jsd" and beta == 1.0):
        loss, g = _kl_from_logprobs(s, t), s - t
    elif kind == "jsd":
        m = torch.logaddexp(t + math.log(beta), s + math.log(1 - beta))
        loss = beta * _kl_from_logprobs(t, m) + (1 - beta) * _kl_from_logprobs(s, m)
        g = (1 - beta) * (s - m)
    else:
        raise ValueError(f"no closed-form gradient for {kind!r}")
    g = torch.where(p > 0, g, torch.zeros_like(g))  # (0 log 0 = 0; -inf - -inf would be nan)
    return loss, p * (g - (p * g).sum(-1, keepdim=True)) / temperature


def _autocast_dtype(dev: str) -> torch.dtype:
    if hasattr(torch, "get_autocast_dtype"):  # (torch >= 2.4)
        return torch.get_autocast_dtype(dev)
    return torch.get_autocast_cpu_dtype() if dev == "cpu" else torch.get_autocast_gpu_dtype()


class _HeadDivergence(torch.autograd.Function):
    """One chunk of a fused head divergence with its gradient in closed form: the forward makes both heads'
    logits, the per-row divergence and d loss / d student logits; the backward is two matmuls. `keep`: hold the
    chunk's logit gradient until the backward (fast), else keep only the hidden states and make it again there
    (one chunk of logits at a time, as activation checkpointing would, minus autograd's elementwise graph)."""

    @staticmethod
    def forward(ctx, sh, s_w, s_b, th, t_w, t_b, kind, beta, temperature, keep):
        dev = sh.device.type
        amp = torch.is_autocast_enabled(dev), _autocast_dtype(dev)

        def logit_grad():  # (the backward's recomputation runs under the forward's autocast state)
            with torch.no_grad(), torch.autocast(dev, dtype=amp[1], enabled=amp[0]):
                z = F.linear(sh, s_w, s_b)
                loss, dz = closed_form_rows(z, F.linear(th, t_w, t_b), kind, beta, temperature)
            return loss, dz.to(z.dtype)  # (the matmuls of the backward run in the forward's precision)
        loss, dz = logit_grad()
        ctx.recompute = logit_grad
        ctx.save_for_backward(sh, s_w, s_b, dz if keep else None)
        return loss.sum()

    @staticmethod
    def backward(ctx, grad_out):
        sh, s_w, s_b, dz = ctx.saved_tensors
        if dz is None:
            dz = ctx.recompute()[1]
        dz = dz * grad_out.to(dz.dtype)
        w = s_w.to(dz.dtype)
        g_h = (dz @ w).to(sh.dtype) if ctx.needs_input_grad[0] else None
        g_w = (dz.t() @ sh.to(dz.dtype)).to(s_w.dtype) if ctx.needs_input_grad[1] else None
        g_b = dz.sum(0).to(s_b.dtype) if s_b is not None and ctx.needs_input_grad[2] else None
        return g_h, g_w, g_b, None, None, None, None, None, None, None


KEEP_GRAD_BYTES = 1 << 30  # hold every chunk's logit gradient until the backward up to this size (else recompute)


def fused_token_divergence(student_hidden: torch.Tensor, student_head: torch.Tensor, teacher_hidden: torch.Tensor,
                           teacher_head: torch.Tensor, kind: str = "fkl", mask: torch.Tensor | None = None,
                           beta: float = 0.5, alpha: float = 0.1, temperature: float = 1.0, chunk_size: int = 256,
                           reduction: str = "mean", student_bias: torch.Tensor | None = None,
                           teacher_bias: torch.Tensor | None = None) -> torch.Tensor:
    """token_divergence computed from hidden states [..., H] and output projections [V, H] (lm_head
    weights), chunked over positions so that the [positions, V] logits never exist at once: each chunk's
    logits are made, reduced to one number and dropped. For fkl / rkl / jsd the gradient w.r.t. the student's
    logits comes in closed form from the forward (`_HeadDivergence`: no autograd graph over [chunk, V]
    intermediates; kept until the backward while all of them fit in KEEP_GRAD_BYTES, else made again there);
    the other kinds run each chunk under activation checkpointing. Peak memory is one chunk's logits (plus the
    kept gradients) instead of all the logits (for V = 262,144 and 4,096 positions: ~0.3 GB instead of tens of
    GB); the result and gradients equal the unfused computation. reduction: "sum" or "mean" over unmasked
    positions."""
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
    closed = needs_grad and kind in ("fkl", "rkl", "jsd")
    keep = rows.numel() * student_head.shape[0] * 4 <= KEEP_GRAD_BYTES  # (4 bytes: float32 at most, bf16 half)
    total = s2.new_zeros(())
    for idx in rows.split(chunk_size):
        sh, th = s2[idx], t2[idx]
        if closed:
            part = _HeadDivergence.apply(sh, student_head, student_bias, th, teacher_head, teacher_bias, kind, beta,
                                         temperature, keep)
        else:
            part = checkpoint(chunk_sum, sh, th, use_reentrant=False) if needs_grad else chunk_sum(sh, th)
        total = total + part
    if reduction == "sum":
        return total
    return total / m.sum().clamp(min=1)


def _target_logprobs(h: torch.Tensor, t: torch.Tensor, head: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    logits = _at_least_f32(F.linear(h, head, bias))
    return logits.gather(-1, t.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)


class _HeadTargetLogprob(torch.autograd.Function):
    """One chunk of fused_target_logprobs for a frozen head (LoRA, a frozen embedding) with the gradient w.r.t. the
    hidden states in closed form: d log p(t) / dz = onehot(t) - softmax(z), so d log p(t) / dh = W[t] - softmax(z) W,
    made in the forward from the chunk's logits (one matmul more there) and kept ([chunk, H], the hidden's size);
    the backward scales it by the upstream gradient, instead of making the [chunk, V] logits again and
    back-propagating through them (two matmuls)."""

    @staticmethod
    def forward(ctx, h, head, bias, t):
        with torch.no_grad():
            z = F.linear(h, head, bias)  # (under the caller's autocast, as the checkpointed path)
            zf = _at_least_f32(z)
            lse = torch.logsumexp(zf, -1, keepdim=True)
            out = zf.gather(-1, t.unsqueeze(-1)).squeeze(-1) - lse.squeeze(-1)
            w = head.to(z.dtype)
            u = w[t] - (zf - lse).exp().to(z.dtype) @ w  # d out / d h, in the forward's precision
        ctx.save_for_backward(u)
        ctx.h_dtype = h.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (u,) = ctx.saved_tensors
        return (grad_out.unsqueeze(-1).to(u.dtype) * u).to(ctx.h_dtype), None, None, None


def fused_target_logprobs(hidden: torch.Tensor, head: torch.Tensor, targets: torch.Tensor,
                          mask: torch.Tensor | None = None, chunk_size: int = 1024,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """log softmax(hidden @ head^T + bias)[target] for every position ([..., H] -> [...]; 0 where `mask`
    is false, and those positions get no logits at all), chunked like fused_token_divergence: one chunk's
    [chunk, V] logits exist at a time (float32 log-sum-exp, like scoring.gather_logprobs). With a frozen head
    (and bias) the gradient w.r.t. the hidden states comes in closed form from the forward
    (`_HeadTargetLogprob`); a trainable head runs each chunk under activation checkpointing (the backward
    makes its logits again)."""
    H = hidden.shape[-1]
    h2, t2 = hidden.reshape(-1, H), targets.reshape(-1)
    rows = (torch.arange(h2.shape[0], device=h2.device) if mask is None
            else mask.reshape(-1).bool().nonzero().squeeze(-1))
    needs_grad = torch.is_grad_enabled() and (h2.requires_grad or head.requires_grad)
    closed = needs_grad and not head.requires_grad and not (bias is not None and bias.requires_grad)
    parts = []
    for idx in rows.split(chunk_size):
        h, t = h2[idx], t2[idx]
        if closed:
            parts.append(_HeadTargetLogprob.apply(h, head, bias, t))
        else:
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
