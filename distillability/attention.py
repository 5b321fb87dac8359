"""Attention for Hugging Face models that is fast on CPUs for the short sequences of distillation and RL.

torch's CPU `scaled_dot_product_attention` kernel is slower in bfloat16 than the plain math (two bf16 matmuls
and a float32 softmax, what transformers' `eager` attention does) at short lengths, and faster past ~128 keys
(measurements: bench/README.md, "Measurements behind code choices"). So models loaded by this package use
the implementation registered here: the math for bf16 on CPU with at most `SHORT_KEYS` keys, torch's kernel
(transformers' `sdpa` path, unchanged) for everything else. Masks are transformers' sdpa masks (bool, True
= attend, or None for plain causal); fully masked rows (left padding) get uniform weights instead of NaN.
"""

from __future__ import annotations

import torch

NAME = "distillability_sdpa"
SHORT_KEYS = 128
_registered = [False]


def attention_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs):
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    bf16 = query.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cpu")
                                             and torch.get_autocast_dtype("cpu") == torch.bfloat16)
    if (query.device.type != "cpu" or not bf16 or key.shape[2] > SHORT_KEYS
            or any(kwargs.get(k) is not None for k in ("softcap", "s_aux", "position_bias"))
            or kwargs.get("output_attentions")):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    q_len, k_len = query.shape[2], key.shape[2]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = (torch.matmul(query, key.transpose(2, 3)) * scale).float()
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(torch.float32).min)
        else:
            scores = scores + attention_mask.float()
    elif causal and q_len > 1:  # torch's is_causal: the top-left aligned lower triangle
        allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1).to(value.dtype)  # (under autocast the matmuls run in bf16)
    if dropout and module.training:
        probs = torch.nn.functional.dropout(probs, p=dropout)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def register() -> str:
    """Register the implementation (and transformers' sdpa masks for it) once; returns its name."""
    if not _registered[0]:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(NAME, attention_forward)
        AttentionMaskInterface.register(NAME, sdpa_mask)
        _registered[0] = True
    return NAME


def use_fast_attention(model) -> None:
    """Switch a model that uses transformers' sdpa attention to this module's (same results up to bf16
    rounding; float32 and GPU runs take the sdpa path unchanged)."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "_attn_implementation", None) != "sdpa":
        return
    try:
        model.set_attn_implementation(register())
    except Exception:  # noqa: BLE001 (an architecture that refuses custom attention keeps sdpa)
        pass
