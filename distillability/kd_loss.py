"""Token-level distillation losses between a teacher and a student on (prompt, response) text (docs/method.md §4):
`SameVocabLoss` where both share a vocabulary, `CrossTokenizerLoss` where they do not (positions aligned by
character offsets; next-character distributions, `char`, or sorted-probability distance, `uld`).
`token_loss` picks one, refusing mismatched vocabularies unless a cross-tokenizer loss is asked for.

`settings` is any object with the distill recipe's fields: beta, alpha, temperature, teacher_top_k, chunk_size,
ce_weight, cross_tokenizer, method, task.use_chat_template and runtime.autocast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .crosstok import FirstCharProjector, align_pair, uld_distance
from .distributed import global_mean
from .divergences import (
    divergence_rows,
    fused_target_logprobs,
    fused_token_divergence,
    head_chunk_rows,
    token_divergence,
    topk_bucket_logprobs,
)
from .errors import ModelError
from .models import lm_parts, same_vocabulary
from .scoring import encode_prompt, gather_logprobs, pad_batch, response_positions
from .training import autocast_ctx, encode_generations, encode_sft_batch


def _device(model) -> torch.device:
    return next(model.parameters()).device


class SameVocabLoss:
    """The student's divergence from the teacher per response token, both on the same token ids."""

    def __init__(self, settings, teacher, student, stok, kind: str):
        self.cfg, self.teacher, self.student, self.stok, self.kind = settings, teacher, student, stok, kind

    def __call__(self, prompts: list[str], responses: list[str], finished: list[bool], on_policy: bool,
                 gens: list | None = None) -> torch.Tensor:
        """gens: the sampled Generations behind `responses` (on-policy or seq_kd): the loss then runs on exactly
        the sampled tokens instead of a re-tokenisation of their decoded text."""
        dev, chat = _device(self.student), self.cfg.task.use_chat_template
        if gens is not None:
            ids, attn, lmask = encode_generations(self.stok, [encode_prompt(self.stok, p, chat) for p in prompts],
                                                  gens, dev)
        else:
            ids, attn, lmask = encode_sft_batch(self.stok, prompts, responses, dev, chat)
        s_parts, t_parts = lm_parts(self.student), lm_parts(self.teacher)
        if not self.cfg.teacher_top_k and s_parts and t_parts:
            total = self._fused(ids, attn, lmask, s_parts, t_parts)
        else:
            total = self._from_logits(ids, attn, lmask)
        return global_mean(total, lmask.sum())

    def _fused(self, ids, attn, lmask, s_parts, t_parts) -> torch.Tensor:
        """Hidden states + lm_head, chunked: the [positions, V] logits never exist at once."""
        cfg, dev = self.cfg, ids.device
        t_dev = _device(self.teacher)
        with torch.no_grad(), autocast_ctx(dev, cfg.runtime.autocast):
            t_hidden = t_parts[0](input_ids=ids.to(t_dev), attention_mask=attn.to(t_dev)).last_hidden_state[:, :-1].to(dev)
        with autocast_ctx(dev, cfg.runtime.autocast):
            s_hidden = s_parts[0](input_ids=ids, attention_mask=attn).last_hidden_state[:, :-1]
            s_head, t_head = s_parts[1], t_parts[1]
            chunk = min(cfg.chunk_size, head_chunk_rows(s_head.weight.shape[0]))
            return fused_token_divergence(s_hidden, s_head.weight, t_hidden, t_head.weight.to(dev), self.kind, lmask,
                                          cfg.beta, cfg.alpha, cfg.temperature, chunk, "sum", s_head.bias,
                                          None if t_head.bias is None else t_head.bias.to(dev))

    def _from_logits(self, ids, attn, lmask) -> torch.Tensor:
        cfg, dev = self.cfg, ids.device
        t_dev = _device(self.teacher)
        with torch.no_grad(), autocast_ctx(dev, cfg.runtime.autocast):
            t_logits = self.teacher(input_ids=ids.to(t_dev), attention_mask=attn.to(t_dev)).logits[:, :-1].to(dev)
        with autocast_ctx(dev, cfg.runtime.autocast):
            s_logits = self.student(input_ids=ids, attention_mask=attn).logits[:, :-1]
        if cfg.teacher_top_k:
            s_lp, t_lp = topk_bucket_logprobs(s_logits, t_logits, cfg.teacher_top_k, cfg.temperature)
            return token_divergence(s_lp, t_lp, self.kind, lmask, cfg.beta, cfg.alpha, 1.0, cfg.chunk_size,
                                    reduction="sum")
        return token_divergence(s_logits, t_logits, self.kind, lmask, cfg.beta, cfg.alpha, cfg.temperature,
                                cfg.chunk_size, reduction="sum")


def _rows(x: torch.Tensor, pairs: list, side: int) -> torch.Tensor:
    """The aligned positions of every row of x [B, T, ...] (side 0: teacher's encoding, 1: student's), stacked."""
    return torch.cat([x[i, pair[side].positions] for i, pair in enumerate(pairs)])


TEACHER_CACHE_BYTES = 1 << 30  # the off-policy teacher targets a CrossTokenizerLoss keeps (float32 rows), at most


class CrossTokenizerLoss:
    """Different tokenizers: positions aligned by character offsets, compared as next-character distributions
    (`char`) or by sorted-probability distance (`uld`), plus `ce_weight` x the NLL of the teacher's text off-policy.

    The teacher is frozen, so its next-character distributions on a fixed (prompt, response) are a function of the
    text alone: off-policy (the teacher's own samples, each drawn many times over a run: 120 steps x 32 rows from
    600 samples is each ~6 times) the fused `char` path keeps them per text, up to TEACHER_CACHE_BYTES, and runs the
    teacher only on texts it has not seen (the same numbers up to float rounding of another batch's padding)."""

    def __init__(self, settings, teacher, ttok, student, stok, kind: str):
        self.cfg, self.teacher, self.ttok, self.student, self.stok, self.kind = settings, teacher, ttok, student, stok, kind
        self.projector = FirstCharProjector([ttok, stok]) if settings.cross_tokenizer == "char" else None
        self.targets: dict[tuple[str, str], torch.Tensor] = {}  # (prompt, response) -> [shared positions, C]
        self.target_bytes = 0
        self.teacher_rows = 0  # sequences the teacher ran on (what the cache saves)

    def __call__(self, prompts: list[str], responses: list[str], finished: list[bool], on_policy: bool,
                 gens: list | None = None) -> torch.Tensor:
        cfg, dev = self.cfg, _device(self.student)
        pairs = [align_pair(self.ttok, self.stok, p, r, True, cfg.task.use_chat_template)
                 for p, r in zip(prompts, responses)]
        s_ids, s_attn = pad_batch([b.ids for _, b in pairs], self.stok.pad_token_id, dev)
        s_parts, t_parts = lm_parts(self.student), lm_parts(self.teacher)
        fused = s_parts is not None and t_parts is not None and self.projector is not None
        keys = None if on_policy or gens is not None else list(zip(prompts, responses))  # (the teacher's texts)
        with autocast_ctx(dev, cfg.runtime.autocast):
            if fused:
                per_row, s_h = self._fused(pairs, keys, s_ids, s_attn, s_parts, t_parts)
            else:
                t_ids, t_attn = pad_batch([a.ids for a, _ in pairs], self.ttok.pad_token_id, _device(self.teacher))
                self.teacher_rows += len(pairs)
                per_row, s_logits = self._from_logits(pairs, t_ids, t_attn, s_ids, s_attn)
        loss = global_mean(per_row.sum(), per_row.numel())
        if on_policy or not cfg.ce_weight:
            return loss
        # identity of the tokens comes from the teacher's text itself: NLL of the student's own encoding
        # (align_pair encodes by the same boundary rule as SFT), reusing the forward pass above
        lmask = response_positions([b.prompt_len for _, b in pairs], [len(b.ids) for _, b in pairs], s_ids.shape[1],
                                   dev)
        if fused:
            with autocast_ctx(dev, cfg.runtime.autocast):
                s_head = s_parts[1]
                lp = fused_target_logprobs(s_h[:, :-1], s_head.weight, s_ids[:, 1:], lmask,
                                           head_chunk_rows(s_head.weight.shape[0]), s_head.bias)
        else:
            lp = gather_logprobs(s_logits[:, :-1], s_ids[:, 1:])
        return loss + cfg.ce_weight * global_mean(-(lp * lmask).sum(), lmask.sum())

    def _teacher_char(self, pairs, t_parts, dev) -> torch.Tensor:
        """The teacher's next-character log-probabilities at every pair's shared positions, stacked [N, C]."""
        cfg = self.cfg
        t_ids, t_attn = pad_batch([a.ids for a, _ in pairs], self.ttok.pad_token_id, _device(self.teacher))
        self.teacher_rows += len(pairs)
        with torch.no_grad():
            t_h = t_parts[0](input_ids=t_ids, attention_mask=t_attn).last_hidden_state
            t_head = t_parts[1]
            return self.projector.project_hidden(
                _rows(t_h, pairs, 0).to(dev), t_head.weight.to(dev), 0, cfg.temperature,
                None if t_head.bias is None else t_head.bias.to(dev), head_chunk_rows(t_head.weight.shape[0]))

    def _cached_teacher_char(self, pairs, keys, t_parts, dev) -> torch.Tensor:
        """_teacher_char through the per-text cache: the teacher runs once on the texts not yet kept."""
        fresh: dict[tuple[str, str], torch.Tensor] = {}
        todo = list(dict.fromkeys(k for k in keys if k not in self.targets))
        if todo:
            where = {k: i for i, k in enumerate(keys)}
            rows = self._teacher_char([pairs[where[k]] for k in todo], t_parts, dev)
            for k, part in zip(todo, rows.split([len(pairs[where[k]][0].positions) for k in todo])):
                fresh[k] = part
                if self.target_bytes + part.numel() * part.element_size() <= TEACHER_CACHE_BYTES:
                    self.targets[k] = part
                    self.target_bytes += part.numel() * part.element_size()
        return torch.cat([self.targets[k] if k in self.targets else fresh[k] for k in keys])

    def _fused(self, pairs, keys, s_ids, s_attn, s_parts, t_parts):
        """Hidden states, and the heads only where needed: the teacher's [positions, V] logits are made a chunk
        of aligned rows at a time and reduced to next-character distributions (kept per text off-policy)."""
        cfg, dev = self.cfg, s_ids.device
        t_char = (self._teacher_char(pairs, t_parts, dev) if keys is None
                  else self._cached_teacher_char(pairs, keys, t_parts, dev))
        s_h = s_parts[0](input_ids=s_ids, attention_mask=s_attn).last_hidden_state
        s_head = s_parts[1]
        s_rows = F.linear(_rows(s_h, pairs, 1), s_head.weight, s_head.bias)
        per_row = divergence_rows(self.projector.project(s_rows, 1, cfg.temperature), t_char, self.kind, cfg.beta,
                                  cfg.alpha)
        return per_row, s_h

    def _from_logits(self, pairs, t_ids, t_attn, s_ids, s_attn):
        cfg, dev = self.cfg, s_ids.device
        with torch.no_grad():
            t_logits = self.teacher(input_ids=t_ids, attention_mask=t_attn).logits.to(dev)
        s_logits = self.student(input_ids=s_ids, attention_mask=s_attn).logits
        rows_t, rows_s = _rows(t_logits, pairs, 0), _rows(s_logits, pairs, 1)
        if self.projector is not None:
            per_row = divergence_rows(self.projector.project(rows_s, 1, cfg.temperature),
                                      self.projector.project(rows_t, 0, cfg.temperature), self.kind, cfg.beta, cfg.alpha)
        else:
            per_row = uld_distance(rows_s, rows_t, cfg.temperature)
        return per_row, s_logits


def token_loss(settings, teacher, ttok, student, stok, kind: str) -> SameVocabLoss | CrossTokenizerLoss:
    """The loss for this pair: same vocabulary, or across tokenizers when `settings.cross_tokenizer` allows."""
    if same_vocabulary(ttok, stok):
        return SameVocabLoss(settings, teacher, student, stok, kind)
    if settings.cross_tokenizer == "refuse":
        raise ModelError(
            f"method '{settings.method}' needs a shared vocabulary, but the teacher's tokenizer "
            f"({type(ttok).__name__}, {len(ttok)} tokens) differs from the student's ({type(stok).__name__}, "
            f"{len(stok)} tokens); set cross_tokenizer=char or uld, or use method=sft")
    return CrossTokenizerLoss(settings, teacher, ttok, student, stok, kind)
