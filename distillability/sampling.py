"""Batched generation with a KV cache (Hugging Face `generate`), returning text and token ids.

Sampling is *batch-invariant*: with a seed, row (prompt i, sample j) draws its own Gumbel noise from a
generator seeded by (seed, index_offset + i, j), and the token is argmax(logits / T + Gumbel), an exact
sample from the (top-k / top-p truncated) softmax. So a prompt's samples do not depend on which other
prompts share its batch, on the generation batch size, or on how many processes split the prompts.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import fastgen
from .scoring import encode_prompt


@dataclass
class Generation:
    prompt_index: int
    text: str  # decoded response, without special tokens
    token_ids: list[int]  # response ids, without padding and without the final EOS
    finished: bool  # the model emitted EOS before the length limit


def row_seed(seed: int, prompt: int, sample: int) -> int:
    return (seed * 1_000_003 + prompt * 8191 + sample * 131 + 17) % (2**63 - 1)


class GumbelSampler:
    """A logits processor that turns greedy decoding into per-row seeded sampling.

    Each row's uniform noise comes from its own generator, drawn a block of tokens at a time (one call per
    row per block instead of one per row per token; the same numbers as token-by-token draws, since a
    generator's stream does not depend on how it is cut)."""

    BLOCK_FLOATS = 1 << 24  # at most 64 MB of pre-drawn noise

    def __init__(self, seeds: Sequence[int], device, temperature: float, top_k: int, top_p: float) -> None:
        self.gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.noise, self.used = None, 0

    def _next_noise(self, V: int, device) -> torch.Tensor:
        if self.noise is None or self.used == self.noise.shape[1]:
            block = max(1, min(64, self.BLOCK_FLOATS // max(1, len(self.gens) * V)))
            u = torch.stack([torch.rand(block, V, generator=g, device=device) for g in self.gens])
            self.noise, self.used = -torch.log(-torch.log(u.clamp(1e-20, 1 - 1e-7))), 0
        self.used += 1
        return self.noise[:, self.used - 1]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float() / self.temperature
        V = scores.shape[-1]
        if self.top_k and self.top_k < V:
            kth = torch.topk(scores, self.top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_s, order = torch.sort(scores, descending=True, dim=-1)
            cum = torch.softmax(sorted_s, -1).cumsum(-1)
            drop = cum - torch.softmax(sorted_s, -1) >= self.top_p  # keep the smallest prefix reaching top_p
            scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        return scores + self._next_noise(V, scores.device)


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 64, temperature: float = 1.0,
             num_return_sequences: int = 1, top_p: float = 1.0, top_k: int = 0, greedy: bool = False,
             batch_size: int = 64, use_chat_template: bool = False, autocast: bool = False,
             seed: int | None = None, index_offset: int = 0, use_fast: bool = True) -> list[Generation]:
    """`num_return_sequences` responses per prompt, in prompt order (prompt 0's samples first).

    greedy=True (or temperature == 0) decodes greedily. Sampling is seeded per row by (seed,
    index_offset + prompt index, sample index) (seed None: drawn from the global torch RNG), so a run
    is reproducible and a prompt's samples do not depend on its batch. Llama-family and Gemma-3 text models
    decode with the lean KV-cached loop of `fastgen` (use_fast=False: Hugging Face `generate`; same tokens).
    """
    from transformers import LogitsProcessorList

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    greedy = greedy or temperature == 0
    if not greedy and seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    out: list[Generation] = []
    pad_id = tokenizer.pad_token_id
    eos_id = tokenizer.eos_token_id
    encoded = [encode_prompt(tokenizer, p, use_chat_template) for p in prompts]
    reps = 1 if greedy else num_return_sequences
    rows = [(i, j) for i in range(len(prompts)) for j in range(reps)]
    gen, lora = model, fastgen.lora_base(model) if use_fast else None
    fast = lora is not None and fastgen.supports(lora, lora=True)
    if fast:
        gen = lora  # the lean decoder reads each layer's base + LoRA weight: no merged copy of the model
    elif hasattr(model, "peft_config") and hasattr(model, "merge_and_unload") and rows:
        gen = copy.deepcopy(model).merge_and_unload().eval()  # LoRA unmerged costs ~3x per token
    fast = fast or (use_fast and fastgen.supports(gen))
    # Hugging Face's loop (architectures fastgen does not cover) decodes in the model's own precision even when
    # bf16 is asked for: autocast would re-cast every weight at every token, and a bf16 copy makes torch's CPU
    # matmul expand a large head once per row; the lean decoder casts its weights once and feeds the head a 2-D
    # input (measurements: bench/README.md, "Measurements behind code choices").
    for start in range(0, len(rows), max(1, batch_size)):
        chunk = rows[start:start + batch_size]
        T = max(len(encoded[i]) for i, _ in chunk)
        ids = torch.full((len(chunk), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for r, (i, _) in enumerate(chunk):  # left padding for generation
            c = encoded[i]
            ids[r, T - len(c):] = torch.tensor(c)
            mask[r, T - len(c):] = 1
        sampler = None if greedy else GumbelSampler([row_seed(seed, index_offset + i, j) for i, j in chunk], device,
                                                    temperature, top_k, top_p)
        if fast:
            pick = (lambda lg: lg.argmax(-1)) if greedy else (lambda lg, fn=sampler: fn(None, lg).argmax(-1))
            new = fastgen.Decoder(gen, bf16=autocast, rows=len(chunk)).decode(
                ids.to(device), mask.to(device), max_new_tokens, eos_id, pad_id, pick).cpu()
        else:  # in the model's own precision (see above)
            kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_id, use_cache=True,
                          do_sample=False, num_return_sequences=1)
            if sampler is not None:
                kwargs["logits_processor"] = LogitsProcessorList([sampler])
            with torch.autocast(device.type, enabled=False):
                seqs = gen.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
            new = seqs[:, T:].cpu()
        for r, (i, _) in enumerate(chunk):
            toks = new[r].tolist()
            finished = eos_id in toks
            if finished:
                toks = toks[: toks.index(eos_id)]
            toks = [t for t in toks if t != pad_id]
            text = tokenizer.decode(toks, skip_special_tokens=True)
            for _ in range(num_return_sequences if greedy else 1):
                out.append(Generation(i, text, toks, finished))
    model.train(was_training)
    return out
