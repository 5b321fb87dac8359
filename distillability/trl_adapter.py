"""The calibration reward as a TRL `GRPOTrainer` reward function, so TRL users can turn the knob
inside their own runs:

    from distillability.trl_adapter import CalibrationReward
    cal = CalibrationReward(policy=model, policy_tokenizer=tok, proxy=proxy, proxy_tokenizer=ptok)
    trainer = GRPOTrainer(model=model, reward_funcs=[accuracy_reward, cal], args=GRPOConfig(reward_weights=[1.0, eta]))

Each call scores r_cal = log pi_theta(y|x) - log pi_C(y|x) on the completion *text*, each model with its
own tokenizer (scoring.py's boundary rule), normalised per character by default and clipped.
Difference from our `calibrate` recipe: TRL standardises the *weighted sum* of rewards within a group,
whereas docs/method.md §3 standardises task and calibration rewards separately before combining them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .grpo import calibration_reward
from .scoring import sequence_logprobs


def _text(x) -> str:
    """TRL passes plain strings, or conversations (lists of {"role", "content"})."""
    if isinstance(x, str):
        return x
    if isinstance(x, list) and x and isinstance(x[-1], dict):
        return x[-1].get("content", "") if len(x) == 1 else "".join(m.get("content", "") for m in x)
    return str(x)


class CalibrationReward:
    """A TRL reward function: list of floats, one per completion, r_cal for each."""

    __name__ = "calibration_reward"

    def __init__(self, policy, policy_tokenizer, proxy, proxy_tokenizer, normalization: str = "char",
                 clip: float = 5.0, use_chat_template: bool = False):
        self.policy, self.policy_tokenizer = policy, policy_tokenizer
        self.proxy, self.proxy_tokenizer = proxy.requires_grad_(False).eval(), proxy_tokenizer
        self.normalization, self.clip, self.use_chat_template = normalization, clip, use_chat_template

    @torch.no_grad()
    def __call__(self, prompts: Sequence, completions: Sequence, **kwargs) -> list[float]:
        p = [_text(x) for x in prompts]
        c = [_text(x) for x in completions]
        was_training = self.policy.training
        self.policy.eval()
        own = sequence_logprobs(self.policy, self.policy_tokenizer, p, c, True, self.use_chat_template)
        self.policy.train(was_training)
        prox = sequence_logprobs(self.proxy, self.proxy_tokenizer, p, c, True, self.use_chat_template)
        return calibration_reward(own["logprob"], prox["logprob"], c, own["num_tokens"], self.normalization,
                                  self.clip).tolist()
