"""Shared evaluation helpers used by several recipes: greedy accuracy of a model on held-out
examples, and the mean calibration divergence D(pi || pi_C) of its samples."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .sampling import generate
from .scoring import normalise, sequence_logprobs
from .tasks import Example, Task


def greedy_accuracy(model, tokenizer, task: Task, examples: Sequence[Example], max_new_tokens: int,
                    autocast: bool = False, use_chat_template: bool = False) -> tuple[float, list]:
    gens = generate(model, tokenizer, [e.prompt for e in examples], max_new_tokens=max_new_tokens, greedy=True,
                    autocast=autocast, use_chat_template=use_chat_template)
    scores = [task.score(examples[g.prompt_index], g.text) for g in gens]
    return sum(scores) / max(1, len(scores)), gens


def mean_calibration_divergence(model, tokenizer, proxy, proxy_tokenizer, examples: Sequence[Example],
                                max_new_tokens: int, temperature: float = 1.0, samples: int = 1,
                                seed: int = 0, autocast: bool = False, use_chat_template: bool = False) -> dict:
    """Mean of log pi(y|x) - log pi_C(y|x) over y ~ pi (T=`temperature`), summed and per character."""
    prompts = [e.prompt for e in examples]
    gens = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                    num_return_sequences=samples, seed=seed, autocast=autocast, use_chat_template=use_chat_template)
    return divergence_of_samples(model, tokenizer, proxy, proxy_tokenizer, prompts, gens, use_chat_template)


def divergence_of_samples(model, tokenizer, proxy, proxy_tokenizer, prompts: Sequence[str], gens,
                          use_chat_template: bool = False) -> dict:
    """D(pi || pi_C) of given samples of pi (`generate` results indexing `prompts`): the means summed and per
    character, and every sample's log-probability under both models (a truncated sample ends without EOS)."""
    ps = [prompts[g.prompt_index] for g in gens]
    texts = [g.text for g in gens]
    eos = [g.finished for g in gens]
    own = sequence_logprobs(model, tokenizer, ps, texts, eos, use_chat_template)
    prox = sequence_logprobs(proxy, proxy_tokenizer, ps, texts, eos, use_chat_template)
    d = own["logprob"] - prox["logprob"]
    return {"summed": d.mean().item(), "per_char": normalise(d, texts, own["num_tokens"], "char").mean().item(),
            "mean_chars": float(torch.tensor([len(t) for t in texts], dtype=torch.float).mean()),
            "logprob": own["logprob"], "proxy_logprob": prox["logprob"]}
