import math

import pytest
import torch
import torch.nn.functional as F

from distillability.divergences import (
    divergence_rows,
    token_divergence,
    topk_accumulated_kl,
    topk_bucket_logprobs,
)


def ref_div(s_logits, t_logits, kind, beta=0.5, alpha=0.1, T=1.0):
    """float64 loop over the vocabulary."""
    out = []
    for s_row, t_row in zip(s_logits.double() / T, t_logits.double() / T):
        ps = torch.softmax(s_row, 0).tolist()
        pt = torch.softmax(t_row, 0).tolist()

        def kl(p, q):
            return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)

        if kind == "fkl" or (kind == "jsd" and beta == 0):
            v = kl(pt, ps)
        elif kind == "rkl" or (kind == "jsd" and beta == 1):
            v = kl(ps, pt)
        elif kind == "jsd":
            m = [beta * a + (1 - beta) * b for a, b in zip(pt, ps)]
            v = beta * kl(pt, m) + (1 - beta) * kl(ps, m)
        elif kind == "tvd":
            v = 0.5 * sum(abs(a - b) for a, b in zip(pt, ps))
        elif kind == "skl":
            v = kl(pt, [alpha * a + (1 - alpha) * b for a, b in zip(pt, ps)])
        else:
            v = kl(ps, [alpha * b + (1 - alpha) * a for a, b in zip(pt, ps)])
        out.append(v)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd", "tvd", "skl", "srkl"])
@pytest.mark.parametrize("V,T", [(7, 1.0), (50, 0.7), (300, 2.0)])
def test_divergences_match_float64_loop(kind, V, T):
    g = torch.Generator().manual_seed(V)
    s, t = torch.randn(9, V, generator=g) * 3, torch.randn(9, V, generator=g) * 3
    got = divergence_rows(s, t, kind, beta=0.3, alpha=0.2, temperature=T).double()
    want = ref_div(s, t, kind, beta=0.3, alpha=0.2, T=T)
    assert torch.allclose(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_jsd_limits_follow_trl_convention(beta):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 20, generator=g), torch.randn(4, 20, generator=g)
    kind = "fkl" if beta == 0 else "rkl"
    assert torch.allclose(divergence_rows(s, t, "jsd", beta=beta), divergence_rows(s, t, kind))


def test_chunked_equals_unchunked_with_mask_and_gradient():
    g = torch.Generator().manual_seed(1)
    s = (torch.randn(3, 11, 40, generator=g) * 2).requires_grad_(True)
    t = torch.randn(3, 11, 40, generator=g) * 2
    mask = torch.rand(3, 11, generator=g) > 0.3
    full = token_divergence(s, t, "jsd", mask, beta=0.4, chunk_size=10_000)
    (g_full,) = torch.autograd.grad(full, s)
    chunked = token_divergence(s, t, "jsd", mask, beta=0.4, chunk_size=4)
    (g_chunk,) = torch.autograd.grad(chunked, s)
    assert abs(full.item() - chunked.item()) < 1e-5
    assert torch.allclose(g_full, g_chunk, atol=1e-6)
    # the mean is over unmasked positions only, and equals the reference
    want = ref_div(s.detach().reshape(-1, 40), t.reshape(-1, 40), "jsd", beta=0.4)[mask.reshape(-1)].mean()
    assert abs(full.item() - want.item()) < 1e-5
    per_pos = token_divergence(s, t, "jsd", mask, beta=0.4, chunk_size=5, reduction="none")
    assert per_pos.shape == (3, 11) and (per_pos[~mask] == 0).all()


def test_gradient_matches_finite_difference():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(2, 6, generator=g, dtype=torch.float64).requires_grad_(True)
    t = torch.randn(2, 6, generator=g, dtype=torch.float64)
    torch.autograd.gradcheck(lambda x: divergence_rows(x, t, "jsd", beta=0.3).double(), (s,), eps=1e-6, atol=1e-3)


def test_topk_accumulated_kl_monotone_and_full():
    g = torch.Generator().manual_seed(3)
    t, s = torch.randn(5, 64, generator=g) * 2, torch.randn(5, 64, generator=g) * 2
    acc = topk_accumulated_kl(t, s, [1, 5, 10, 64, 1000])
    full = divergence_rows(s, t, "fkl")
    assert torch.allclose(acc[:, -1], full, atol=1e-5) and torch.allclose(acc[:, -2], full, atol=1e-5)
    # k=1: the summand of the teacher's most likely token
    lt, ls = torch.log_softmax(t, -1), torch.log_softmax(s, -1)
    top = lt.argmax(-1)
    first = (lt.exp() * (lt - ls)).gather(-1, top[:, None]).squeeze(-1)
    assert torch.allclose(acc[:, 0], first, atol=1e-6)


def test_topk_bucket_sums_to_one_and_equals_full_at_k_eq_V():
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(4, 30, generator=g), torch.randn(4, 30, generator=g)
    s_lp, t_lp = topk_bucket_logprobs(s, t, 8)
    assert torch.allclose(s_lp.exp().sum(-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(t_lp.exp().sum(-1), torch.ones(4), atol=1e-5)
    # bucketing can only lose information: KL over buckets <= full KL (data processing inequality)
    assert (divergence_rows(s_lp, t_lp, "fkl") <= divergence_rows(s, t, "fkl") + 1e-5).all()


@pytest.mark.parametrize("kind,beta,keep", [("fkl", 0.3, True), ("rkl", 0.3, True), ("jsd", 0.3, True),
                                            ("jsd", 0.3, False), ("jsd", 0.0, True), ("jsd", 1.0, False),
                                            ("tvd", 0.3, True)])
def test_fused_token_divergence_equals_logits_path_with_gradients(kind, beta, keep, monkeypatch):
    """Hidden states + lm_head, chunked (logits never materialised at once) == logits then token_divergence,
    values and gradients of the student's hidden states, head and bias (float64, 1e-10): the closed-form
    gradients of fkl / rkl / jsd (kept, or made again in the backward) and the checkpointed path (tvd)."""
    from distillability import divergences
    from distillability.divergences import fused_token_divergence

    monkeypatch.setattr(divergences, "KEEP_GRAD_BYTES", 1 << 30 if keep else 0)
    g = torch.Generator().manual_seed(0)
    B, T, H, V = 3, 7, 16, 50
    sh = torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    th = torch.randn(B, T, H + 4, generator=g, dtype=torch.float64)
    sw = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    sb = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True)
    tw = torch.randn(V, H + 4, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.3
    ref = token_divergence(sh @ sw.T + sb, th @ tw.T, kind, mask, beta=beta, temperature=1.5)
    ref_grads = torch.autograd.grad(2.0 * ref, (sh, sw, sb))
    out = fused_token_divergence(sh, sw, th, tw, kind, mask, beta=beta, temperature=1.5, chunk_size=4,
                                 student_bias=sb)
    grads = torch.autograd.grad(2.0 * out, (sh, sw, sb))  # (an upstream gradient other than 1)
    assert abs(out.item() - ref.item()) < 1e-10
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-10)


def test_fused_token_divergence_closed_form_under_bf16_autocast(monkeypatch):
    """Under CPU bf16 autocast the closed-form path's value and gradients match the checkpointed autograd path
    within bf16 rounding (the backward's recomputation runs under the forward's autocast state)."""
    from distillability import divergences
    from distillability.divergences import fused_token_divergence

    g = torch.Generator().manual_seed(1)
    sh = torch.randn(24, 32, generator=g, requires_grad=True)
    sw = torch.randn(300, 32, generator=g, requires_grad=True)
    th, tw = torch.randn(24, 40, generator=g), torch.randn(300, 40, generator=g)
    def run(closed: bool, keep: bool):
        monkeypatch.setattr(divergences, "KEEP_GRAD_BYTES", (1 << 30) if keep else 0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if closed:
                out = fused_token_divergence(sh, sw, th, tw, "jsd", beta=0.5, chunk_size=8, reduction="sum")
            else:
                out = divergences.token_divergence(F.linear(sh, sw), F.linear(th, tw), "jsd", beta=0.5,
                                                   reduction="sum")
        return (out.detach(), *torch.autograd.grad(out, (sh, sw)))
    ref = run(False, True)
    for keep in (True, False):
        got = run(True, keep)
        for a, b in zip(got, ref):
            assert torch.allclose(a.float(), b.float(), rtol=2e-2, atol=2e-2 * b.abs().max().item())


@pytest.mark.parametrize("frozen_head", [True, False])
def test_fused_target_logprobs_equals_log_softmax_with_gradients(frozen_head):
    """fused_target_logprobs == log_softmax(h W^T + b)[t], values and gradients under a non-uniform upstream
    gradient (float64, 1e-10): the closed-form hidden-state gradient of a frozen head (LoRA's case) and the
    checkpointed path of a trainable one; masked positions are 0 and get no gradient."""
    from distillability.divergences import fused_target_logprobs

    g = torch.Generator().manual_seed(3)
    B, T, H, V = 3, 9, 16, 70
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=not frozen_head)
    b = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=not frozen_head)
    t = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    up = torch.randn(B, T, generator=g, dtype=torch.float64)
    wrt = (h,) if frozen_head else (h, w, b)
    ref = torch.log_softmax(h @ w.T + b, -1).gather(-1, t[..., None]).squeeze(-1) * mask
    ref_grads = torch.autograd.grad((ref * up).sum(), wrt)
    out = fused_target_logprobs(h, w, t, mask, chunk_size=5, bias=b)
    grads = torch.autograd.grad((out * up).sum(), wrt)
    assert (out - ref).abs().max().item() < 1e-10
    for a, r in zip(grads, ref_grads):
        assert (a - r).abs().max().item() < 1e-10


def test_fused_target_logprobs_closed_form_under_bf16_autocast():
    """Under CPU bf16 autocast the closed-form gradient of a frozen head matches autograd through the bf16 logits
    within bf16 rounding, and the values are the same computation."""
    from distillability.divergences import _target_logprobs, fused_target_logprobs

    g = torch.Generator().manual_seed(2)
    h = torch.randn(40, 32, generator=g, requires_grad=True)
    w = torch.randn(500, 32, generator=g) * 0.3
    t = torch.randint(0, 500, (40,), generator=g)
    up = torch.rand(40, generator=g) + 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused_target_logprobs(h, w, t, chunk_size=16)
        ref = _target_logprobs(h, t, w, None)
    g_got, = torch.autograd.grad((got * up).sum(), h)
    g_ref, = torch.autograd.grad((ref * up).sum(), h)
    assert torch.allclose(got, ref, atol=1e-5)
    assert torch.allclose(g_got, g_ref, rtol=2e-2, atol=2e-2 * g_ref.abs().max().item())


@pytest.mark.parametrize("lora", [False, True])
def test_fused_nll_loss_equals_the_logits_path_with_gradients(lora):
    """training.nll_loss from hidden states, chunked over the masked positions only (what SFT on a 262k
    vocabulary uses), equals log_softmax of the full logits, value and gradients, in float64; a LoRA-wrapped
    model takes the same path (its adapters included)."""
    from distillability.models import TinyModelSpec, build_tiny_model, lm_parts, train_tokenizer
    from distillability.training import apply_lora, nll_loss

    tok = train_tokenizer(["Q: 1+2=?\nA: 3 #### 3", "abcdefghij 0123456789"], 0, "char")
    model = build_tiny_model(TinyModelSpec(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), tok, seed=4)
    if lora:
        model = apply_lora(model, 4, 8)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, 0, 0.1)  # (B starts at zero: make the adapters matter)
    model = model.double()
    assert lm_parts(model) is not None
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(tok), (3, 11), generator=g)
    attn = torch.ones_like(ids)
    attn[0, :2] = 0  # left padding
    lmask = torch.rand(3, 10, generator=g) > 0.4
    lmask[0, :2] = False
    trainable = [p for p in model.parameters() if p.requires_grad]
    fused = nll_loss(model, ids, attn, lmask)
    g_fused = torch.autograd.grad(fused, trainable)
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
    lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    ref = -(lp * lmask).sum() / lmask.sum()
    g_ref = torch.autograd.grad(ref, trainable)
    assert fused.item() == pytest.approx(ref.item(), abs=1e-10)
    from distillability.scoring import token_logprobs

    per_token = token_logprobs(model, ids, attn)  # (the scoring path: every position, fused too)
    assert (per_token - lp).abs().max().item() < 1e-10
    assert max((a - b).abs().max().item() for a, b in zip(g_fused, g_ref)) < 1e-10
