"""Shared pieces of the training recipes: NLL on (prompt, response) text, optimisers, atomic
checkpoints with everything needed for a bit-exact resume, per-step seeds, logs, a NaN guard."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .distributed import get_dist
from .errors import TrainingDiverged
from .io import append_jsonl, atomic_path, write_text
from .scoring import encode_pair, pad_batch, response_positions, token_logprobs


def set_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)


def step_seed(seed: int, step: int, salt: int = 0) -> int:
    """A seed for one step: the data order and sampling of step s depend only on (seed, s), so a run
    resumed at step s draws exactly what the uninterrupted run drew."""
    return (seed * 1_000_003 + step * 7_919 + salt * 104_729) % (2**31 - 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def autocast_ctx(device: torch.device | str, enabled: bool):
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def encode_sft_batch(tokenizer, prompts: Sequence[str], responses: Sequence[str], device=None,
                     use_chat_template: bool = False, max_length: int | None = None):
    """(input_ids, attention_mask, loss_mask) for next-token NLL on the response (+ EOS) only."""
    pairs = [encode_pair(tokenizer, p, r, True, use_chat_template) for p, r in zip(prompts, responses)]
    if max_length:
        pairs = [(ids[:max_length], min(pl, max_length)) for ids, pl in pairs]
    ids, mask = pad_batch([p[0] for p in pairs], tokenizer.pad_token_id, device)
    return ids, mask, response_positions([p[1] for p in pairs], [len(p[0]) for p in pairs], ids.shape[1], ids.device)


def encode_generations(tokenizer, prompt_ids: list[list[int]], gens, device=None):
    """(input_ids, attention_mask, loss_mask) of sampled responses exactly as sampled: right-padded prompt ids +
    the generated ids (+ EOS where the model emitted it), the mask covering response positions in the shifted
    frame (like encode_sft_batch, without re-tokenising the decoded text)."""
    seqs, plens = [], []
    for g in gens:
        p = prompt_ids[g.prompt_index]
        r = g.token_ids + ([tokenizer.eos_token_id] if g.finished else [])
        seqs.append(p + r)
        plens.append(len(p))
    ids, attn = pad_batch(seqs, tokenizer.pad_token_id, device)
    return ids, attn, response_positions(plens, [len(s) for s in seqs], ids.shape[1], device)


def nll_loss(model, ids: torch.Tensor, mask: torch.Tensor, loss_mask: torch.Tensor, normalise=None) -> torch.Tensor:
    """Mean negative log-likelihood of the masked next-token targets (`normalise(sum, count)` replaces
    the plain mean, e.g. distributed.global_mean). Where the model allows (models.lm_parts), the loss is
    computed from hidden states in chunks over the masked positions only (scoring.token_logprobs): same
    value, no [B, T, V] logits (for a 262k vocabulary, gigabytes per batch)."""
    lp = token_logprobs(model, ids, mask, positions=loss_mask.bool())
    total = -(lp * loss_mask).sum()
    if normalise is not None:
        return normalise(total, loss_mask.sum())
    return total / loss_mask.sum().clamp(min=1)


def apply_lora(model, r: int, alpha: int):
    """Wrap `model` with LoRA adapters on every linear layer (peft); only the adapters train, and
    `models.save_model` merges them into a plain model."""
    import warnings

    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():  # (peft asks transformers 5 a deprecated question; nothing for the user to do)
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear",
                                                task_type="CAUSAL_LM"))


def make_optimizer(params, lr: float, weight_decay: float = 0.0):
    """AdamW; the fused kernel (one pass over all parameters, faster than the per-tensor loop on CPU)
    where torch has it for these parameters (plain float32 tensors on CPU or CUDA; sharded DTensors keep
    the default implementation)."""
    params = [p for p in params if p.requires_grad]
    fused = bool(params) and all(type(p) is torch.nn.Parameter and p.device.type in ("cpu", "cuda")
                                 and p.dtype == torch.float32 for p in params)
    kwargs = dict(lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    if fused:
        try:
            return torch.optim.AdamW(params, fused=True, **kwargs)
        except (RuntimeError, TypeError, ValueError):  # an older torch without the CPU kernel
            pass
    return torch.optim.AdamW(params, **kwargs)


def make_scheduler(optimizer, total_steps: int, warmup_steps: int = 0, kind: str = "constant"):
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "cosine":
            progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
            return 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(1.0, progress)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def check_finite(loss: torch.Tensor, step: int, ckpt_dir: Path | None = None) -> None:
    if not torch.isfinite(loss).all():
        where = f"; last good checkpoint kept in {ckpt_dir}" if ckpt_dir and ckpt_dir.exists() else ""
        raise TrainingDiverged(f"loss is {loss.item()} at step {step}: training stopped{where}")


def optimizer_step(model, optimizer, loss: torch.Tensor, max_grad_norm: float, step: int,
                   ckpt_dir: Path | None = None) -> None:
    """One update: refuse a non-finite loss (naming the step), backward, average gradients over processes, clip
    to `max_grad_norm` (0 = no clipping), step."""
    check_finite(loss, step, ckpt_dir)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    get_dist().sync_gradients(list(model.parameters()))
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()


class StepLog:
    """Append-only JSONL log of training steps; on resume, rows after the checkpoint are dropped."""

    def __init__(self, path: Path, enabled: bool = True, report_to: list[str] | None = None,
                 config: dict | None = None):
        self.path = path
        self.enabled = enabled  # False on non-main processes: they read the log, never write it
        self.trackers = None
        if enabled and report_to and set(report_to) - {"none"}:
            from .tracking import Trackers

            self.trackers = Trackers(report_to, path.parent, path.parent.name, config or {})

    def truncate_after(self, step: int) -> None:
        if not self.path.exists() or not self.enabled:
            return
        keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
        write_text(self.path, "".join(k + "\n" for k in keep))

    def write(self, row: dict) -> None:
        if self.enabled:
            append_jsonl(self.path, row)
            if self.trackers is not None:
                self.trackers.log(row)

    def close(self) -> None:
        if self.trackers is not None:
            self.trackers.close()

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]


# ----------------------------------------------------------------------------- checkpoints


def _write_state(state: dict[str, torch.Tensor], path: Path) -> None:
    seen, dedup = set(), {}
    for k, v in state.items():  # tied weights share storage; safetensors wants each tensor once
        v = v.detach().contiguous()
        key = (v.data_ptr(), tuple(v.shape))
        if key not in seen:
            seen.add(key)
            dedup[k] = v.clone()
    with atomic_path(Path(path)) as tmp:
        save_file(dedup, str(tmp))


def write_weights(model, path: Path) -> None:
    """The model's state as one safetensors file (tied tensors once), written to a temporary name and renamed.
    Every rank calls; rank 0 writes (a sharded model's full state is gathered first)."""
    dist = get_dist()
    if not dist.sharded(model) and not dist.is_main:
        return
    state = dist.full_state(model)
    if dist.is_main:
        _write_state(state, path)


def read_weights(model, path: Path) -> None:
    """Load a write_weights file into `model` (strict up to tied weights); every rank calls."""
    state = load_file(str(path))
    dist = get_dist()
    if dist.sharded(model):
        keys = set(model.state_dict())  # (names only: nothing is gathered)
        missing, unexpected = [k for k in keys if k not in state], [k for k in state if k not in keys]
        dist.load_full_state(model, state)
    else:
        missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    really_missing = [m for m in missing if m not in tied and "lm_head" not in m]
    if really_missing or unexpected:
        raise RuntimeError(f"weights {path} do not match the model: missing {really_missing[:3]}, unexpected {unexpected[:3]}")
    if hasattr(model, "tie_weights") and not dist.sharded(model):
        model.tie_weights()


def save_checkpoint(ckpt_root: Path, step: int, model, optimizer, scheduler, extra: dict | None = None) -> Path:
    """Write `ckpt_root/last` atomically: weights (safetensors), optimizer + scheduler state, RNG states,
    the step and any recipe state in `extra`. A kill during the write leaves the previous one intact.
    Every rank calls; rank 0 writes (a sharded model's full state is gathered first)."""
    target = ckpt_root / "last"
    dist = get_dist()
    sharded = dist.sharded(model)
    if sharded:
        weights, opt_state = dist.full_state(model), dist.full_optimizer_state(model, optimizer)
    if not dist.is_main:
        return target
    if not sharded:
        weights, opt_state = model.state_dict(), optimizer.state_dict()
    with atomic_path(target) as tmp:
        tmp.mkdir()
        _write_state(weights, tmp / "model.safetensors")
        torch.save({
            "optimizer": opt_state, "sharded": sharded,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
        }, tmp / "trainer_state.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **(extra or {})}))
    return target


def load_checkpoint(ckpt_root: Path, model, optimizer, scheduler) -> dict | None:
    """Restore the last checkpoint into model/optimizer/scheduler; returns its state dict or None.
    Every rank calls (each reads the same files)."""
    from .errors import ConfigError

    target = ckpt_root / "last"
    if not (target / "state.json").exists():
        return None
    read_weights(model, target / "model.safetensors")
    trainer = torch.load(target / "trainer_state.pt", weights_only=False)  # our own file, written above
    dist = get_dist()
    if bool(trainer.get("sharded", False)) != dist.sharded(model):
        raise ConfigError(f"{target}: the checkpoint was written {'with' if trainer.get('sharded') else 'without'} "
                          f"FSDP sharding; resume it the same way")
    if dist.sharded(model):
        dist.load_full_optimizer_state(model, optimizer, trainer["optimizer"])
    else:
        optimizer.load_state_dict(trainer["optimizer"])
    if scheduler is not None and trainer["scheduler"] is not None:
        scheduler.load_state_dict(trainer["scheduler"])
    torch.set_rng_state(trainer["rng"]["torch"])
    random.setstate(trainer["rng"]["python"])
    np.random.set_state(trainer["rng"]["numpy"])
    return json.loads((target / "state.json").read_text())


def fit_lm(model, tokenizer, prompts: Sequence[str], responses: Sequence[str], steps: int, batch_size: int = 32,
           lr: float = 1e-3, seed: int = 0, autocast: bool = False, warmup_steps: int = 20, desc: str = "sft",
           progress: bool = True) -> list[float]:
    """Plain next-token NLL training on (prompt, response) pairs with a cosine schedule; returns losses.
    Used to build the tiny world's models; the distill recipe has its own resumable loop."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    model.train()
    opt = make_optimizer(model.parameters(), lr, weight_decay=0.01)
    sched = make_scheduler(opt, steps, warmup_steps, "cosine")
    rng = np.random.default_rng(seed)
    losses = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        idx = rng.integers(0, len(prompts), size=batch_size)
        ids, mask, lmask = encode_sft_batch(tokenizer, [prompts[i] for i in idx], [responses[i] for i in idx], device)
        with autocast_ctx(device, autocast):
            loss = nll_loss(model, ids, mask, lmask)
        check_finite(loss, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses
