"""Token-level distillation signals between models with *different* tokenizers.

Both models encode the same prompt+response text (the boundary rule of `scoring`). A response
position is *shared* when both tokenizations start a token at the same character offset c; there
both models hold a next-token distribution "what comes at character c". Two losses compare them:

- ``char`` [our definition, the default]: each distribution is projected onto the *first character*
  of its tokens (p_char(a) = sum of p(v) over tokens v whose text starts with a; special tokens such
  as EOS share one end-of-text bucket). Both projections live on one support, so any divergence of
  `divergences` applies (forward KL, JSD_beta, ...), and the loss keeps token identity.
- ``uld``: Universal Logit Distillation (Boizard et al., 2024): the L1 distance between the two
  probability vectors sorted in decreasing order (the shorter one zero-padded). It ignores identity,
  so it is combined with the cross-entropy on the teacher's text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .divergences import _at_least_f32
from .scoring import encode_prompt


def token_start_offsets(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """(character offset where each token of `text` starts, the token ids); needs a fast tokenizer."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError):
        from .errors import ModelError

        raise ModelError(f"cross-tokenizer losses need a fast tokenizer ({type(tokenizer).__name__} has no offsets)") from None
    return [s for s, _ in enc["offset_mapping"]], enc["input_ids"]


@dataclass
class Aligned:
    ids: list[int]  # prompt + response (+ eos) ids of one model
    prompt_len: int
    positions: list[int]  # indices t whose logits predict the token starting at each shared offset


def align_pair(tok_a, tok_b, prompt: str, response: str, add_eos: bool = True,
               use_chat_template: bool = False) -> tuple[Aligned, Aligned]:
    """Encode prompt+response with both tokenizers; positions whose next token starts at the same
    character in both (the response's first character and the final EOS are always shared)."""
    out = []
    starts = []
    for tok in (tok_a, tok_b):
        p_ids = encode_prompt(tok, prompt, use_chat_template)
        offs, r_ids = token_start_offsets(tok, response)
        if add_eos:
            r_ids = r_ids + [tok.eos_token_id]
            offs = offs + [len(response)]
        out.append((p_ids + r_ids, len(p_ids), offs))
        starts.append({c: i for i, c in enumerate(offs)})
    shared = sorted(set(starts[0]) & set(starts[1]))
    return tuple(Aligned(ids, plen, [plen - 1 + st[c] for c in shared]) for (ids, plen, _), st in zip(out, starts))


class FirstCharProjector:
    """Maps a tokenizer's vocabulary onto a shared character alphabet (plus an 'end/special' bucket)."""

    def __init__(self, tokenizers: list, device=None):
        alphabet: dict[str, int] = {"<end>": 0}
        self.index = []
        for tok in tokenizers:
            sp = set(tok.all_special_ids)
            texts = _decode_each(tok)
            ids = [alphabet.setdefault(s[0], len(alphabet)) if s and v not in sp else 0 for v, s in enumerate(texts)]
            self.index.append(torch.tensor(ids, dtype=torch.long, device=device))
        self.size = len(alphabet)

    def project(self, logits: torch.Tensor, which: int, temperature: float = 1.0) -> torch.Tensor:
        """[N, V] logits -> [N, C] log-probabilities of the next character."""
        p = F.softmax(_at_least_f32(logits) / temperature, dim=-1)
        idx = self.index[which].to(logits.device)[: logits.shape[-1]]
        pc = torch.zeros(p.shape[0], self.size, device=p.device, dtype=p.dtype).index_add_(1, idx, p[:, : idx.numel()])
        return torch.log(pc.clamp(min=1e-30))

    def project_hidden(self, hidden: torch.Tensor, head: torch.Tensor, which: int, temperature: float = 1.0,
                       bias: torch.Tensor | None = None, chunk_size: int = 256) -> torch.Tensor:
        """project() of hidden @ head^T + bias ([N, H] -> [N, C]), chunked over rows: only one chunk's
        [chunk, V] logits exist at a time (for a frozen teacher with a 262k vocabulary, a batch's logits
        would be gigabytes). No gradient; use project() on logits where one is needed."""
        with torch.no_grad():
            out = [self.project(F.linear(hidden[i:i + chunk_size], head.to(hidden.dtype),
                                         None if bias is None else bias.to(hidden.dtype)), which, temperature)
                   for i in range(0, hidden.shape[0], chunk_size)]
        return torch.cat(out) if out else hidden.new_zeros(0, self.size).float()


def _decode_each(tok) -> list[str]:
    """The text of every token id on its own (special tokens too), in one batched call where the
    tokenizer has a Rust backend (a 262k vocabulary decodes in ~1 s instead of ~5 s)."""
    backend = getattr(tok, "backend_tokenizer", None)
    singles = [[v] for v in range(len(tok))]
    if backend is not None:
        return backend.decode_batch(singles, skip_special_tokens=True)
    return [tok.decode(v, skip_special_tokens=True, clean_up_tokenization_spaces=False) for v in singles]


def uld_distance(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-row L1 distance between sorted probability vectors (ULD)."""
    ps = F.softmax(student_logits.float() / temperature, -1).sort(-1, descending=True).values
    pt = F.softmax(teacher_logits.float() / temperature, -1).sort(-1, descending=True).values
    V = max(ps.shape[-1], pt.shape[-1])
    ps = F.pad(ps, (0, V - ps.shape[-1]))
    pt = F.pad(pt, (0, V - pt.shape[-1]))
    return (ps - pt).abs().sum(-1)
