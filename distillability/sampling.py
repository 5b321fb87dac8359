"""Batched generation with a KV cache (Hugging Face `generate`), returning text and token ids."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .scoring import encode_prompt


@dataclass
class Generation:
    prompt_index: int
    text: str  # decoded response, without special tokens
    token_ids: list[int]  # response ids, without padding and without the final EOS
    finished: bool  # the model emitted EOS before the length limit


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 64, temperature: float = 1.0,
             num_return_sequences: int = 1, top_p: float = 1.0, top_k: int = 0, greedy: bool = False,
             batch_size: int = 64, use_chat_template: bool = False, autocast: bool = False,
             seed: int | None = None) -> list[Generation]:
    """`num_return_sequences` responses per prompt, in prompt order (prompt 0's samples first).

    greedy=True (or temperature == 0) decodes greedily. Sampling uses the global torch RNG, seeded
    by `seed` when given, so a run is reproducible.
    """
    if seed is not None:
        torch.manual_seed(seed)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    greedy = greedy or temperature == 0
    out: list[Generation] = []
    pad_id = tokenizer.pad_token_id
    eos_id = tokenizer.eos_token_id
    encoded = [encode_prompt(tokenizer, p, use_chat_template) for p in prompts]
    per_batch = max(1, batch_size // max(1, num_return_sequences))
    for start in range(0, len(prompts), per_batch):
        chunk = encoded[start:start + per_batch]
        T = max(len(c) for c in chunk)
        ids = torch.full((len(chunk), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for i, c in enumerate(chunk):  # left padding for generation
            ids[i, T - len(c):] = torch.tensor(c)
            mask[i, T - len(c):] = 1
        kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_id, use_cache=True)
        if greedy:
            kwargs.update(do_sample=False, num_return_sequences=1)
        else:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k,
                          num_return_sequences=num_return_sequences)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            seqs = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        new = seqs[:, T:].cpu()
        reps = 1 if greedy else num_return_sequences
        for row in range(new.shape[0]):
            toks = new[row].tolist()
            finished = eos_id in toks
            if finished:
                toks = toks[: toks.index(eos_id)]
            toks = [t for t in toks if t != pad_id]
            text = tokenizer.decode(toks, skip_special_tokens=True)
            prompt_index = start + row // reps
            for _ in range(num_return_sequences if greedy else 1):
                out.append(Generation(prompt_index, text, toks, finished))
    model.train(was_training)
    return out
