"""Sequence log-probabilities of responses, within one tokenizer or across tokenizers.

**The boundary rule** [our definition]: a prompt and its response are tokenized *separately* (the
prompt with the tokenizer's special tokens and chat template where asked, the response without) and
the ids are concatenated. The prompt/response boundary therefore always falls between two tokens, for
every tokenizer, and log pi(y | x) is the sum of the log-probabilities of exactly the response's
tokens given the prompt's. A token can never straddle the boundary, so no model is credited with
probability for characters of the prompt. When the response ended (the model emitted EOS) the EOS
token's log-probability is included (`add_eos`), since stopping is part of the sequence.

Across tokenizers: the response is decoded to text once; each model re-encodes prompt and response
text with its own tokenizer by the rule above. Both numbers are then log-probabilities of the same
string, so no token alignment is needed (docs/method.md §3).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

from .errors import DataError


def format_prompt(tokenizer, prompt: str, use_chat_template: bool = False) -> str:
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt


def encode_prompt(tokenizer, prompt: str, use_chat_template: bool = False) -> list[int]:
    text = format_prompt(tokenizer, prompt, use_chat_template)
    # a chat template already holds the special tokens it wants
    return tokenizer(text, add_special_tokens=not (use_chat_template and tokenizer.chat_template))["input_ids"]


def encode_pair(tokenizer, prompt: str, response: str, add_eos: bool = False,
                use_chat_template: bool = False) -> tuple[list[int], int]:
    """(ids, prompt_length): prompt ids + response ids (+ eos) by the boundary rule above."""
    p_ids = encode_prompt(tokenizer, prompt, use_chat_template)
    r_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if add_eos:
        r_ids = r_ids + [tokenizer.eos_token_id]
    return p_ids + r_ids, len(p_ids)


def pad_batch(seqs: Sequence[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists into (input_ids, attention_mask)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def response_positions(prompt_lengths: Sequence[int], lengths: Sequence[int], T: int, device=None) -> torch.Tensor:
    """Bool mask [B, T - 1] of the positions, in the shifted frame (position t predicts token t + 1), whose
    next token is a response token of a right-padded sequence: t in [prompt_len - 1, len - 2]."""
    pos = torch.arange(T - 1, device=device).expand(len(lengths), T - 1)
    pl = torch.tensor(list(prompt_lengths), device=device).unsqueeze(1)
    ln = torch.tensor(list(lengths), device=device).unsqueeze(1)
    return (pos >= pl - 1) & (pos < ln - 1)


def gather_logprobs(logits: torch.Tensor, targets: torch.Tensor, chunk_rows: int | None = None) -> torch.Tensor:
    """log softmax(logits)[target] in float32 (float64 stays float64), [B, T] -> [B, T], a few rows at a time so a large
    vocabulary never materialises a full float32 [B, T, V] copy."""
    if chunk_rows is None:
        chunk_rows = max(1, int(6e7 // max(1, logits.shape[1] * logits.shape[2])))
    out = []
    for start in range(0, logits.shape[0], chunk_rows):
        lg = logits[start:start + chunk_rows]
        lg = lg if lg.dtype == torch.float64 else lg.float()
        tgt = targets[start:start + chunk_rows]
        out.append(lg.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(lg, dim=-1))
    return torch.cat(out)


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   positions: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T-1]: log-prob of token t+1 given tokens <= t (right-padded input). Where the model allows
    (models.lm_parts) it is computed from hidden states a chunk of positions at a time, so the [B, T, V]
    logits never exist (gigabytes for a 262k vocabulary); same values, and gradients where enabled.
    `positions` ([B, T-1] bool): only those are needed (the fused path skips the others, leaving 0)."""
    from .divergences import fused_target_logprobs, head_chunk_rows
    from .models import lm_parts

    parts = lm_parts(model)
    if parts is not None:
        body, head = parts
        hidden = body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, :-1]
        return fused_target_logprobs(hidden, head.weight, input_ids[:, 1:], positions,
                                     head_chunk_rows(head.weight.shape[0]), head.bias)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    return gather_logprobs(logits, input_ids[:, 1:])


def shared_prompt_token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                                 prompt_lengths: Sequence[int], prompt_index: Sequence[int],
                                 positions: torch.Tensor | None = None) -> torch.Tensor | None:
    """token_logprobs for rows that share prompts (GRPO's G samples of one prompt), the prompt run once: each
    distinct prompt goes through the body once (left-padded, one batch), its keys/values are repeated to its
    rows, and only the response tokens run per row; the gradient reaches the prompt's activations summed over
    its rows. Right-padded `input_ids` = prompt ids + response ids as in training.encode_generations, rows of
    one `prompt_index` holding the same prompt ids. Returns the [B, T-1] frame of token_logprobs with the
    response positions filled (the others 0, as are positions outside `positions`); the values are
    token_logprobs' up to float rounding. None where it does not apply (no separable head, models.lm_parts;
    gradient checkpointing on; a sequence longer than a sliding window; an empty prompt): call token_logprobs."""
    from .divergences import fused_target_logprobs, head_chunk_rows
    from .models import lm_parts

    parts = lm_parts(model)
    if parts is None or min(prompt_lengths) < 1:
        return None
    body, head = parts
    cfg = getattr(model, "config", None)
    window = getattr(cfg, "sliding_window", None)
    B, T = input_ids.shape
    if (window and T > window) or (torch.is_grad_enabled() and getattr(body, "gradient_checkpointing", False)):
        return None
    dev = input_ids.device
    first: dict[int, int] = {}
    for b, u in enumerate(prompt_index):
        first.setdefault(u, b)
    order = {u: i for i, u in enumerate(first)}  # prompt index -> its row in the prompt batch
    row_u = torch.tensor([order[u] for u in prompt_index], device=dev)
    P = max(prompt_lengths)
    p_ids = input_ids.new_zeros((len(order), P))
    p_attn = attention_mask.new_zeros((len(order), P))
    for i, u in enumerate(order):  # left-padded, so each prompt's last token is the last column
        b, n = first[u], prompt_lengths[first[u]]
        p_ids[i, P - n:] = input_ids[b, :n]
        p_attn[i, P - n:] = 1
    out = body(input_ids=p_ids, attention_mask=p_attn, position_ids=(p_attn.cumsum(1) - 1).clamp(min=0),
               use_cache=True)
    cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
    if cache is None:
        return None
    cache.reorder_cache(row_u)  # [U, ...] -> [B, ...]: each row gets its prompt's keys and values
    pl = torch.tensor(list(prompt_lengths), device=dev).unsqueeze(1)
    lens = attention_mask.sum(1, keepdim=True)
    R = int((lens - pl).max().clamp(min=1))
    idx = pl + torch.arange(R, device=dev)  # [B, R]: the response tokens' columns in input_ids
    valid = idx < lens
    r_ids = torch.where(valid, input_ids.gather(1, idx.clamp(max=T - 1)), 0)
    # transformers >= 5.25 names the argument `cache` (`past_key_values` goes in 5.40)
    kw = "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"
    h = body(input_ids=r_ids, attention_mask=torch.cat([p_attn[row_u], valid.long()], 1), position_ids=idx,
             use_cache=True, **{kw: cache}).last_hidden_state
    # the hidden state that predicts response token j: the prompt's last one for j = 0, the row's j - 1 after
    pred = torch.cat([out.last_hidden_state[:, -1][row_u].unsqueeze(1), h[:, :-1]], 1)
    frame = (idx - 1).clamp(max=T - 2)  # token j's position in token_logprobs' shifted frame
    want = valid if positions is None else valid & positions.gather(1, frame)
    lp = fused_target_logprobs(pred, head.weight, r_ids, want, head_chunk_rows(head.weight.shape[0]), head.bias)
    rows, cols = want.nonzero(as_tuple=True)
    return lp.new_zeros((B, T - 1)).index_put((rows, frame[rows, cols]), lp[rows, cols])


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def sequence_logprobs(model, tokenizer, prompts: Sequence[str], responses: Sequence[str],
                      add_eos: bool | Sequence[bool] = False, use_chat_template: bool = False,
                      batch_size: int = 32, autocast: bool = False) -> dict[str, torch.Tensor]:
    """Sum (and count) of the response tokens' log-probs for each (prompt, response) pair, each
    re-encoded with this model's own tokenizer (the boundary rule of this module).

    Returns {"logprob": [N] float64, "num_tokens": [N] long, "token_logprobs": list of [n_i] tensors}.
    """
    if isinstance(add_eos, bool):
        add_eos = [add_eos] * len(prompts)
    device = _device_of(model)
    sums, counts, per_token = [], [], []
    for start in range(0, len(prompts), batch_size):
        pairs = [encode_pair(tokenizer, p, r, e, use_chat_template)
                 for p, r, e in zip(prompts[start:start + batch_size], responses[start:start + batch_size],
                                    add_eos[start:start + batch_size])]
        ids, mask = pad_batch([p[0] for p in pairs], tokenizer.pad_token_id, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            lp = token_logprobs(model, ids, mask)
        for i, (seq, plen) in enumerate(pairs):
            resp = lp[i, plen - 1: len(seq) - 1].double().cpu()
            per_token.append(resp)
            sums.append(resp.sum())
            counts.append(resp.numel())
    return {"logprob": torch.stack(sums) if sums else torch.zeros(0, dtype=torch.float64),
            "num_tokens": torch.tensor(counts, dtype=torch.long), "token_logprobs": per_token}


@torch.no_grad()
def sequence_logprobs_from_ids(model, prompt_ids: Sequence[list[int]], response_ids: Sequence[list[int]],
                               pad_id: int, batch_size: int = 32, autocast: bool = False) -> torch.Tensor:
    """The same-tokenizer path: sum of response-token log-probs for given token ids."""
    device = _device_of(model)
    out = []
    for start in range(0, len(prompt_ids), batch_size):
        seqs = [p + r for p, r in zip(prompt_ids[start:start + batch_size], response_ids[start:start + batch_size])]
        plens = [len(p) for p in prompt_ids[start:start + batch_size]]
        ids, mask = pad_batch(seqs, pad_id, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            lp = token_logprobs(model, ids, mask)
        for i, (seq, plen) in enumerate(zip(seqs, plens)):
            out.append(lp[i, plen - 1: len(seq) - 1].double().sum().cpu())
    return torch.stack(out)


def normalise(logprob_diff: torch.Tensor, responses: Sequence[str], num_tokens: torch.Tensor, how: str) -> torch.Tensor:
    """Length normalisation of a summed log-ratio: 'none', 'token' (per policy token) or 'char'
    (per character of the response text) [our definition]."""
    if how == "none":
        return logprob_diff
    if how == "token":
        return logprob_diff / num_tokens.clamp(min=1).to(logprob_diff.dtype)
    if how == "char":
        chars = torch.tensor([max(len(r), 1) for r in responses], dtype=logprob_diff.dtype)
        return logprob_diff / chars
    raise ValueError(f"unknown normalisation {how!r}")


def check_context(model, tokenizer, examples, max_new_tokens: int, use_chat_template: bool, who: str) -> None:
    """Refuse (one line, naming the example) a prompt that with `max_new_tokens` exceeds the model's context."""
    from .models import context_length

    ctx = context_length(model)
    if ctx is None or not examples:
        return
    # the 64 longest prompts in characters (token counts follow them closely)
    for e in sorted(examples, key=lambda e: len(e.prompt), reverse=True)[:64]:
        n = len(encode_prompt(tokenizer, e.prompt, use_chat_template))
        if n + max_new_tokens > ctx:
            where = e.source or repr(e.prompt[:40] + "...")
            raise DataError(f"{where}: prompt has {n} tokens; with max_new_tokens={max_new_tokens} it exceeds the "
                            f"context of {who} ({ctx} positions); shorten the prompt or lower max_new_tokens")
