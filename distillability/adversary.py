"""The adversarial proxy (docs/method.md §3): r_cal measured against a proxy that *learns* during calibration.

A frozen proxy rewards text that an untrained small model finds unlikely; an attacker trains on the teacher's
samples, so what matters is what a small model still finds unlikely *after* imitating them. With
`proxy_updates: k > 0`, calibration keeps a trainable copy of the proxy (the adversary) and, after each rollout
has been scored against it, takes k SFT steps of it on that rollout's verified-correct responses (what an
attacker with a verifier keeps). The teacher is then rewarded (eta > 0) for responses that stay unlikely for a
proxy which has been distilled on everything the teacher said so far: an online, adversarial proxy. The frozen
original proxy still measures the card's D, so numbers stay comparable across runs.

Scoring happens *before* the adversary learns from the same rollout: a proxy that has just fitted a sample would
find it likely by memory, not by learnability.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError
from .io import atomic_path
from .training import (
    autocast_ctx,
    check_finite,
    encode_sft_batch,
    make_optimizer,
    nll_loss,
    read_weights,
    write_weights,
)


class AdaptiveProxy:
    """A trainable copy of the calibration proxy and its optimizer (AdamW, constant learning rate)."""

    def __init__(self, proxy, tokenizer, learning_rate: float, updates: int, batch_size: int = 32,
                 autocast: bool = False, use_chat_template: bool = False, seed: int = 0):
        self.model = copy.deepcopy(proxy).requires_grad_(True)
        self.model.eval()
        self.tok, self.updates, self.batch_size = tokenizer, updates, batch_size
        self.autocast, self.chat = autocast, use_chat_template
        self.opt = make_optimizer(self.model.parameters(), learning_rate)
        self.rng = np.random.default_rng(seed)
        self.seen = 0

    def learn(self, prompts: Sequence[str], responses: Sequence[str]) -> float | None:
        """`updates` next-token NLL steps on (prompt, response) pairs (a random batch_size of them per step);
        returns the last step's loss (None when there is nothing to learn from)."""
        if not prompts:
            return None
        device = next(self.model.parameters()).device
        self.model.train()
        loss = None
        for u in range(self.updates):
            idx = (np.arange(len(prompts)) if len(prompts) <= self.batch_size
                   else self.rng.choice(len(prompts), self.batch_size, replace=False))
            ids, mask, lmask = encode_sft_batch(self.tok, [prompts[i] for i in idx], [responses[i] for i in idx],
                                                device, use_chat_template=self.chat)
            with autocast_ctx(device, self.autocast):
                loss = nll_loss(self.model, ids, mask, lmask)
            check_finite(loss, u)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
        self.model.eval()
        self.seen += len(prompts)
        return float(loss.item())

    def save(self, folder: Path, step: int) -> None:
        """Weights, optimizer moments and sampling state, atomically, tagged with the calibration step."""
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            write_weights(self.model, tmp / "model.safetensors")
            torch.save({"optimizer": self.opt.state_dict()}, tmp / "optimizer.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step, "seen": self.seen,
                                                        "rng": self.rng.bit_generator.state}))

    def load(self, folder: Path, step: int) -> None:
        """Restore what `save` wrote at `step` (the policy's checkpoint step: they are written together)."""
        if not (folder / "state.json").exists():
            raise ConfigError(f"{folder}: the checkpoint has no adversarial proxy (written with proxy_updates=0?); "
                              f"resume with the settings it was written with")
        state = json.loads((folder / "state.json").read_text())
        if state["step"] != step:
            raise ConfigError(f"{folder}: the adversarial proxy was saved at step {state['step']}, the checkpoint "
                              f"at {step}; delete the checkpoints to start over")
        read_weights(self.model, folder / "model.safetensors")
        self.opt.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True)["optimizer"])
        self.seen, self.rng.bit_generator.state = state["seen"], state["rng"]
