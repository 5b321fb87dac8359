"""Calibrate a teacher's distillability with reinforcement fine-tuning (docs/method.md §3).

For each batch of prompts, sample G responses from the current teacher pi_theta and score
  r_task = the task's verifier (in [0, 1]),
  r_cal  = log pi_theta(y|x) - log pi_C(y|x)   (a single-sample estimate of D(pi_theta || pi_C),
           each model scoring the response *text* with its own tokenizer; normalised per character
           by default, clipped, optionally gated on well-formedness).
The two rewards are standardised separately within each group (running EMA statistics stand in when
a group has no spread) and combined as A = A_task + eta * A_cal:
  eta < 0 pulls the teacher toward what the proxy finds likely (distillable),
  eta > 0 pushes it away (undistillable), eta = 0 is plain GRPO on the task.
Loss: GRPO clipped surrogate with ratio pi_theta/pi_old, plus beta * k3 KL to the frozen original
teacher pi_0, k3 = exp(log pi_0 - log pi_theta) - (log pi_0 - log pi_theta) - 1 per token.
Loss types (TRL's names): `dr_grpo` (default: sum over tokens / (num sequences * max_completion_length)),
`grpo` (mean over each sequence's tokens, then over sequences), `dapo` (mean over all tokens; TRL's default,
the same as dr_grpo up to a per-batch constant). `grpo`'s per-sequence mean is biased toward short
responses (a short correct answer gets a larger per-token push than a long one, a long wrong one a smaller
penalty; Liu et al. 2025, "Understanding R1-Zero-Like Training"): with eta = 0 it drifts the teacher toward
its short modes, which in the tiny world are the ones a small student cannot imitate, so the eta = 0
control itself became partly undistillable (bench/README.md, knob).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..adversary import AdaptiveProxy
from ..config import RuntimeConfig, TaskConfig, opt, save_config, sub, to_dict
from ..distributed import get_dist
from ..errors import ConfigError
from ..evaluation import greedy_accuracy, mean_calibration_divergence
from ..grpo import (
    calibration_reward,
    compute_advantages,
    gate_calibration_reward,
    grpo_loss,
    per_token_logprobs,
)
from ..io import check_output_dir, versions, write_json
from ..models import pick_device, save_model
from ..sampling import generate
from ..scoring import check_context, encode_prompt, sequence_logprobs
from ..training import (
    StepLog,
    apply_lora,
    encode_generations,
    load_checkpoint,
    make_optimizer,
    make_scheduler,
    optimizer_step,
    read_weights,
    save_checkpoint,
    step_seed,
    write_weights,
)


@dataclasses.dataclass
class CalibrateConfig:
    ALIASES = {"eval_samples": "eval_generations"}  # deprecated key -> its name now (one release)

    model: str = opt("", "The teacher to calibrate (folder, packaged:NAME or hub id); also the frozen pi_0.")
    proxy: str = opt("", "The calibration proxy pi_C (any tokenizer).")
    output_dir: str = opt("runs/calibrate", "Where the calibrated model, card, logs and checkpoints go.")
    eta: float = opt(0.0, "The knob: < 0 distillable, > 0 undistillable, 0 plain GRPO.")
    beta: float = opt(0.04, "Weight of the k3 KL anchor to the original teacher.", min=0)
    num_generations: int = opt(8, "G: responses per prompt (group size).", min=2)
    prompts_per_step: int = opt(8, "Prompts per optimizer step (batch = prompts_per_step * G).", min=1)
    max_steps: int = opt(50, "Optimizer steps (one generation round each).", min=1)
    num_iterations: int = opt(1, "Optimisation passes over each generation round (TRL's num_iterations).", min=1)
    learning_rate: float = opt(1e-4, "AdamW learning rate.", min=0, min_exclusive=True)
    warmup_steps: int = opt(0, "Linear warm-up steps.", min=0)
    temperature: float = opt(1.0, "Sampling temperature of the teacher's responses.", min=0, min_exclusive=True)
    max_completion_length: int = opt(64, "Max new tokens per response.", min=1)
    epsilon: float = opt(0.2, "PPO/GRPO clip range of the ratio.", min=0)
    loss_type: str = opt("dr_grpo", "Loss aggregation: dr_grpo (no length bias), grpo (per-sequence mean, "
                         "favours short responses) or dapo (per-token mean over the batch).",
                         choices=("grpo", "dr_grpo", "dapo"))
    cal_normalization: str = opt("char", "Length normalisation of r_cal: none (summed), token, char.",
                                 choices=("none", "token", "char"))
    cal_clip: float = opt(5.0, "Clip r_cal to [-cal_clip, cal_clip] (0 = no clipping).", min=0)
    wellformed_gate: str = opt("worst", "r_cal of a gated response (gate_on: malformed or wrong): off, zero, or worst (the "
                               "group's least favourable value for this eta).",
                               choices=("off", "zero", "worst"))
    gate_on: str = opt("malformed", "Which responses the gate applies to: malformed (the task cannot parse them) or "
                       "wrong (every response the verifier does not score 1, malformed ones included: r_cal then "
                       "only ranks correct responses, so eta never trades accuracy for divergence).",
                       choices=("malformed", "wrong"))
    extra_proxies: list[str] = opt([], "More calibration proxies (any tokenizers: an ensemble): r_cal is "
                                   "computed against each proxy and the one least favourable to eta's goal is kept "
                                   "per response (eta > 0: the smallest divergence, i.e. the proxy that finds the "
                                   "response likeliest; eta < 0: the largest). The card's D is against `proxy`.")
    proxy_updates: int = opt(0, "Adversarial proxy: SFT steps of a trainable copy of the proxy on each "
                             "rollout's correct responses, after r_cal has scored them against it; r_cal then rewards "
                             "text a proxy distilled on the teacher's samples so far still finds unlikely. 0 = the "
                             "frozen proxy. The card's D is always against the original proxy. One process only.", min=0)
    proxy_learning_rate: float = opt(5e-4, "Adversarial proxy: its AdamW learning rate.", min=0, min_exclusive=True)
    proxy_batch_size: int = opt(32, "Adversarial proxy: correct responses per SFT step (a random subset).", min=1)
    ema_decay: float = opt(0.9, "Decay of the running reward statistics used when a group has no spread.", min=0, max=1)
    max_grad_norm: float = opt(1.0, "Gradient clipping norm.", min=0)
    use_peft: bool = opt(False, "Train LoRA adapters (peft) instead of all weights.")
    lora_r: int = opt(16, "LoRA rank.", min=1)
    lora_alpha: int = opt(32, "LoRA alpha.", min=1)
    eval_prompts: int = opt(64, "Held-out prompts for the before/after accuracy and D in the card.", min=1)
    min_accuracy_ratio: float = opt(0.0, "Utility guard: every guard_steps, greedy accuracy on guard_prompts validation "
                                    "prompts (never the card's held-out ones); the result is the last checked step "
                                    "whose accuracy is >= this x the start's (no step: the start). 0 = off: the final "
                                    "weights.", min=0, max=1)
    guard_steps: int = opt(5, "Utility guard: steps between accuracy checks.", min=1)
    guard_prompts: int = opt(64, "Utility guard: number of validation prompts.", min=1)
    guard_split: str = opt("held_out", "Utility guard: where the validation prompts come from: held_out (the task's "
                           "held-out split's last guard_prompts, disjoint from the card's eval_prompts; needs "
                           "task.num_eval >= eval_prompts + guard_prompts; the pipeline keeps its evaluations off "
                           "them too) or train (the end of the training split, then not used for RL; only "
                           "meaningful when the model has not memorised its training prompts).",
                           choices=("held_out", "train"))
    eval_generations: int = opt(2, "Samples per held-out prompt for the mean D.", min=1)
    save_steps: int = opt(10, "Checkpoint every N steps (0 = only at the end).", min=0)
    resume: bool = opt(False, "Continue from the last checkpoint in output_dir.")
    task: TaskConfig = sub(TaskConfig, "The task (prompts and verifier).")
    runtime: RuntimeConfig = sub(RuntimeConfig, "Devices, precision, threads, seed.")

    def validate(self) -> None:
        if self.num_generations < 2:
            raise ConfigError("config key 'num_generations': must be >= 2 (a group needs spread)")
        if self.gate_on == "wrong" and self.wellformed_gate == "off":
            raise ConfigError("config key 'gate_on': 'wrong' gates nothing while wellformed_gate is 'off' (use worst)")


@dataclasses.dataclass
class Run:
    """What one calibration works with: the config, the models and the prompts."""
    cfg: CalibrateConfig
    policy: Any
    tok: Any
    proxy: Any
    ptok: Any
    reference: Any  # a frozen copy of pi_0, or None with LoRA (pi_0 = the adapter disabled)
    task: Any
    held_out: list
    pool: list  # the RL prompts
    dist: Any
    device: torch.device
    adversary: AdaptiveProxy | None = None  # proxy_updates > 0: r_cal's trainable proxy
    extras: list = dataclasses.field(default_factory=list)  # (model, tokenizer) of extra_proxies

    @property
    def rt(self) -> RuntimeConfig:
        return self.cfg.runtime


def guard_prompts(cfg: CalibrateConfig, task, held_out: list) -> tuple[list, list, str]:
    """(RL prompts, the utility guard's validation prompts, where those come from)."""
    if cfg.min_accuracy_ratio <= 0:
        return task.train, [], ""
    if cfg.guard_split == "train":
        if len(task.train) <= cfg.guard_prompts:
            raise ConfigError(f"config key 'guard_prompts': {cfg.guard_prompts} validation prompts leave none of the "
                              f"{len(task.train)} training prompts for RL")
        lo = len(task.train) - cfg.guard_prompts
        return task.train[:lo], task.train[lo:], f"train[{lo}:{len(task.train)}]"
    # the held-out split's *last* prompts: every evaluation that takes a prefix of the split shorter than
    # num_eval - guard_prompts never scores the prompts that selected the checkpoint
    if len(task.eval) < len(held_out) + cfg.guard_prompts:
        raise ConfigError(f"config key 'guard_prompts': the guard needs {cfg.guard_prompts} held-out prompts after "
                          f"the {len(held_out)} eval_prompts, but task.num_eval gives {len(task.eval)}; raise "
                          f"task.num_eval or set guard_split=train")
    lo = len(task.eval) - cfg.guard_prompts
    return task.train, task.eval[lo:], f"eval[{lo}:{len(task.eval)}]"


def setup(cfg: CalibrateConfig) -> tuple[Run, list, str]:
    """Load the policy, its frozen reference and the proxy, the task and its prompt pools."""
    if not cfg.model or not cfg.proxy:
        raise ConfigError("config keys 'model' and 'proxy' are required")
    rt = cfg.runtime
    check_output_dir(cfg.output_dir)
    rt.start()
    policy, tok = rt.load(cfg.model)
    proxy, ptok = rt.load(cfg.proxy, frozen=True)
    dist = get_dist()
    dist.start(next(policy.parameters()).device)
    if cfg.use_peft:
        policy = apply_lora(policy, cfg.lora_r, cfg.lora_alpha)
        reference = None  # pi_0 = the base weights, reached by disabling the adapter
    else:
        reference = copy.deepcopy(policy).to(pick_device(rt.frozen_device)).requires_grad_(False).eval()
    policy = dist.wrap(policy)  # FSDP: shard the policy (a no-op for data-parallel or one process)
    task = cfg.task.load()
    held_out = task.eval[: cfg.eval_prompts]
    pool, val, val_where = guard_prompts(cfg, task, held_out)
    check_context(policy, tok, task.train + held_out, cfg.max_completion_length, cfg.task.use_chat_template, cfg.model)
    run_ = Run(cfg, policy, tok, proxy, ptok, reference, task, held_out, pool, dist, next(policy.parameters()).device)
    run_.extras = [rt.load(p, frozen=True) for p in cfg.extra_proxies] if cfg.eta != 0 else []
    if cfg.proxy_updates and cfg.eta != 0:  # (eta = 0 computes no r_cal: nothing to adapt)
        if dist.world > 1:
            raise ConfigError("config key 'proxy_updates': the adversarial proxy runs in one process only "
                              "(set proxy_updates=0 under several processes)")
        run_.adversary = AdaptiveProxy(proxy, ptok, cfg.proxy_learning_rate, cfg.proxy_updates, cfg.proxy_batch_size,
                                       rt.autocast, cfg.task.use_chat_template, seed=rt.seed)
    return run_, val, val_where


def card_metrics(r: Run, tag: str) -> dict:
    """Greedy accuracy and mean D(pi_theta || pi_C) on the held-out prompts (rank 0)."""
    cfg, rt, chat = r.cfg, r.rt, r.cfg.task.use_chat_template
    acc, _ = greedy_accuracy(r.policy, r.tok, r.task, r.held_out, cfg.max_completion_length, rt.autocast, chat)
    d = mean_calibration_divergence(r.policy, r.tok, r.proxy, r.ptok, r.held_out, cfg.max_completion_length,
                                    cfg.temperature, cfg.eval_generations, seed=rt.seed + 99, autocast=rt.autocast,
                                    use_chat_template=chat)
    return {f"{tag}_accuracy": acc, f"{tag}_D_per_char": d["per_char"], f"{tag}_D_summed": d["summed"],
            f"{tag}_mean_chars": d["mean_chars"]}


class UtilityGuard:
    """Every guard_steps, greedy accuracy on validation prompts; the run's result is the last checked step whose
    accuracy is >= ratio x the start's (its weights kept in `file`)."""

    def __init__(self, r: Run, val: list, where: str, file: Path, state: dict | None):
        self.r, self.val, self.file, self.state = r, val, file, state
        if state is None:
            start = self.accuracy()
            self.state = {"ratio": r.cfg.min_accuracy_ratio, "start_accuracy": start, "prompts": where,
                          "threshold": r.cfg.min_accuracy_ratio * start, "checks": {}, "selected_step": 0}
            write_weights(r.policy, file)

    def accuracy(self) -> float:
        """Greedy accuracy on the guard's prompts, on rank 0 (0.0 elsewhere); every rank calls."""
        r = self.r
        with r.dist.full_weights(r.policy):
            if not r.dist.is_main:
                return 0.0
            return greedy_accuracy(r.policy, r.tok, r.task, self.val, r.cfg.max_completion_length, r.rt.autocast,
                                   r.cfg.task.use_chat_template)[0]

    def check(self, step: int) -> float:
        acc = self.accuracy()
        self.state["checks"][str(step)] = acc
        if float(self.r.dist.sum(float(self.r.dist.is_main and acc >= self.state["threshold"]))) > 0:  # rank 0 decides
            self.state["selected_step"] = step
            write_weights(self.r.policy, self.file)
        return acc

    def restore(self) -> None:
        if self.state["selected_step"] != self.r.cfg.max_steps:
            read_weights(self.r.policy, self.file)  # the last step that kept the teacher's accuracy


def reference_logprobs(r: Run, ids: torch.Tensor, attn: torch.Tensor, mask: torch.Tensor,
                       groups: tuple) -> torch.Tensor:
    """Per-token log pi_0 of the sampled sequences (frozen copy, or the LoRA policy with its adapter off), at the
    response positions `mask` (0 elsewhere); `groups` as per_token_logprobs."""
    with torch.no_grad():
        if r.reference is not None:
            dev = next(r.reference.parameters()).device
            return per_token_logprobs(r.reference, ids.to(dev), attn.to(dev), r.rt.autocast,
                                      mask.to(dev), groups).to(r.device)
        with r.policy.disable_adapter():
            return per_token_logprobs(r.policy, ids, attn, r.rt.autocast, mask, groups)


@dataclasses.dataclass
class Rollout:
    """One generation round: the samples, their encodings, rewards, advantages and log-probs."""
    texts: list[str]
    ids: torch.Tensor
    attn: torch.Tensor
    mask: torch.Tensor
    r_task: torch.Tensor
    r_cal: torch.Tensor
    adv: torch.Tensor
    logp_old: torch.Tensor
    logp_first: torch.Tensor | None  # the graph of the single update when num_iterations == 1
    logp_ref: torch.Tensor | None
    s_generate: float
    s_score: float
    prompts: list[str]  # each sample's prompt
    groups: tuple  # (prompt length, prompt index) of each row: rows of one prompt share its forward


def teach_adversary(r: Run, ro: Rollout) -> float | None:
    """The adversarial proxy's SFT steps on this rollout's correct responses (after they were scored)."""
    keep = [i for i in range(len(ro.texts)) if ro.r_task[i] >= 1]
    return r.adversary.learn([ro.prompts[i] for i in keep], [ro.texts[i] for i in keep])


def rollout(r: Run, step: int, ema: dict, mine: slice, rows_mine: slice) -> Rollout:
    """Sample G responses per prompt from the current policy, score r_task and r_cal, and the advantages."""
    cfg, rt, dist, chat, G = r.cfg, r.rt, r.dist, r.cfg.task.use_chat_template, r.cfg.num_generations
    t0 = time.time()
    rng = np.random.default_rng(step_seed(rt.seed, step))
    pick = rng.choice(len(r.pool), size=min(cfg.prompts_per_step * dist.world, len(r.pool)), replace=False)
    batch = [r.pool[i] for i in pick][mine]
    prompts = [e.prompt for e in batch]
    with dist.full_weights(r.policy):  # KV-cached batched generation
        gens = generate(r.policy, r.tok, prompts, cfg.max_completion_length, cfg.temperature, num_return_sequences=G,
                        seed=step_seed(rt.seed, step, 1), autocast=rt.autocast, use_chat_template=chat,
                        index_offset=mine.start)
    texts = [g.text for g in gens]
    prompt_ids = [encode_prompt(r.tok, p, chat) for p in prompts]
    ids, attn, mask = encode_generations(r.tok, prompt_ids, gens, r.device)
    groups = ([len(prompt_ids[g.prompt_index]) for g in gens], [g.prompt_index for g in gens])
    t_gen = time.time() - t0
    r_task = torch.tensor([r.task.score(batch[g.prompt_index], g.text) for g in gens], dtype=torch.float64)
    # the frozen models first, so their activations are gone before the policy's graph is built
    logp_ref = reference_logprobs(r, ids, attn, mask, groups) if cfg.beta else None
    sample_prompts = [prompts[g.prompt_index] for g in gens]
    proxies = []  # each proxy's sum log pi_C(y|x), the main (or adversarial) proxy first
    if cfg.eta != 0:
        scorer = r.adversary.model if r.adversary is not None else r.proxy
        finished = [g.finished for g in gens]
        for model, ptok in [(scorer, r.ptok), *r.extras]:
            proxies.append(sequence_logprobs(model, ptok, sample_prompts, texts, finished, chat,
                                             autocast=rt.autocast)["logprob"])
    logp_first = None
    if cfg.num_iterations == 1:
        # one forward serves as pi_old (detached), as the policy's own log-prob for r_cal, and as the graph of
        # the single update: ratio = 1, the same gradient as a second forward, one forward less
        r.policy.train()
        logp_first = per_token_logprobs(r.policy, ids, attn, rt.autocast, mask, groups)
        logp_old = logp_first.detach()
    else:
        r.policy.eval()
        with torch.no_grad():
            logp_old = per_token_logprobs(r.policy, ids, attn, rt.autocast, mask, groups)
    r_cal = torch.zeros(len(gens), dtype=torch.float64)
    if cfg.eta != 0:
        own = (logp_old.double() * mask).sum(1).cpu()
        each = torch.stack([calibration_reward(own, p, texts, mask.sum(1).cpu(), cfg.cal_normalization, cfg.cal_clip)
                            for p in proxies])
        r_cal = each.min(0).values if cfg.eta > 0 else each.max(0).values  # the least favourable proxy
        if cfg.wellformed_gate != "off":
            bad = r_task < 1 if cfg.gate_on == "wrong" else torch.tensor(
                [not r.task.well_formed(batch[g.prompt_index], g.text) for g in gens])
            r_cal = gate_calibration_reward(r_cal, bad, G, cfg.eta, cfg.wellformed_gate)
    # advantages from the global batch's rewards (the EMA statistics are global too), then this share
    r_task, r_cal = dist.gather(r_task), dist.gather(r_cal)
    adv = compute_advantages(r_task, r_cal, cfg.eta, G, ema, cfg.ema_decay)[rows_mine].to(r.device)
    return Rollout(texts, ids, attn, mask, r_task, r_cal, adv, logp_old, logp_first, logp_ref, t_gen,
                   time.time() - t0 - t_gen, sample_prompts, groups)


def update(r: Run, ro: Rollout, optimizer, step: int, ckpt: Path) -> tuple[torch.Tensor, float, float]:
    """num_iterations policy-gradient steps on one rollout: (last loss, clip fraction, KL to pi_0)."""
    cfg = r.cfg
    r.policy.train()
    for it in range(cfg.num_iterations):
        logp = ro.logp_first if it == 0 and ro.logp_first is not None else per_token_logprobs(
            r.policy, ro.ids, ro.attn, r.rt.autocast, ro.mask, ro.groups)
        loss, clip_frac, kl = grpo_loss(logp, ro.logp_old, ro.logp_ref, ro.adv, ro.mask, cfg.epsilon, cfg.beta,
                                        cfg.loss_type, cfg.max_completion_length)
        optimizer_step(r.policy, optimizer, loss, cfg.max_grad_norm, step + 1, ckpt)
    return loss, clip_frac, kl


def step_row(r: Run, ro: Rollout, step: int, loss, clip_frac: float, kl: float, dt: float) -> dict:
    """One line of log.jsonl."""
    cfg, dist = r.cfg, r.dist
    at_clip = float((ro.r_cal.abs() >= cfg.cal_clip).double().mean()) if cfg.cal_clip > 0 and cfg.eta else 0.0
    return {"step": step + 1, "loss": float(dist.sum(loss.detach())), "task_reward": ro.r_task.mean().item(),
            "r_cal": ro.r_cal.mean().item(), "r_cal_at_clip": at_clip, "kl_ref": float(dist.sum(kl)) / dist.world,
            "response_chars": float(dist.sum(float(np.mean([len(t) for t in ro.texts])))) / dist.world,
            "response_tokens": ro.mask.sum(1).float().mean().item(), "adv_std": ro.adv.std().item(),
            "clip_frac": clip_frac, "tokens_per_s": int(ro.attn.sum()) / dt, "s_generate": ro.s_generate,
            "s_score": ro.s_score, "s_step": dt}


def write_card(r: Run, out: Path, before: dict, guard: UtilityGuard | None, t_start: float) -> dict:
    """Restore the guard's choice, measure the result, save the model and the calibration card."""
    cfg, rt, dist = r.cfg, r.rt, r.dist
    r.policy.eval()
    dist.barrier()
    if guard is not None:
        guard.restore()
    final_state = dist.full_state(r.policy) if dist.sharded(r.policy) else None  # (collective)
    with dist.full_weights(r.policy):
        after = card_metrics(r, "after") if dist.is_main else None
    if not dist.is_main:
        return {}
    card = {"eta": cfg.eta, "beta": cfg.beta, "model": cfg.model, "proxy": cfg.proxy, "task": to_dict(cfg.task),
            "steps": cfg.max_steps, "seed": rt.seed, "loss_type": cfg.loss_type,
            "cal_normalization": cfg.cal_normalization, "num_generations": cfg.num_generations,
            "learning_rate": cfg.learning_rate, **before, **after, "guard": guard.state if guard else None,
            "extra_proxies": cfg.extra_proxies,
            "adversary": None if r.adversary is None else {
                "proxy_updates": cfg.proxy_updates, "proxy_learning_rate": cfg.proxy_learning_rate,
                "responses_learned": r.adversary.seen},
            "wall_seconds": time.time() - t_start, "versions": versions(), "precision": rt.precision()}
    from ..model_card import calibrated_card

    save_model(r.policy, r.tok, out / "model", state_dict=final_state, extra_files={"README.md": calibrated_card(card)})
    write_json(out / "calibration_card.json", card)
    return card


def run(cfg: CalibrateConfig) -> dict:
    """Calibrate `cfg.model` against `cfg.proxy`; returns the calibration card."""
    t_start = time.time()
    r, val, val_where = setup(cfg)
    out, dist = Path(cfg.output_dir), r.dist
    ckpt_root = out / "checkpoints"
    optimizer = make_optimizer(r.policy.parameters(), cfg.learning_rate)
    scheduler = make_scheduler(optimizer, cfg.max_steps, cfg.warmup_steps)
    log = StepLog(out / "log.jsonl", enabled=dist.is_main, report_to=cfg.runtime.report_to, config=to_dict(cfg))
    ema, start_step, before, guard_state = {}, 0, None, None
    if cfg.resume and (state := load_checkpoint(ckpt_root, r.policy, optimizer, scheduler)) is not None:
        start_step, ema, before, guard_state = state["step"], state["ema"], state["before"], state.get("guard")
        log.truncate_after(start_step)
        if r.adversary is not None:
            r.adversary.load(ckpt_root / "adversary", start_step)
    elif not cfg.resume and dist.is_main:
        log.path.unlink(missing_ok=True)
    with dist.full_weights(r.policy):
        if before is None and dist.is_main:
            before = card_metrics(r, "before")
    guard = UtilityGuard(r, val, val_where, ckpt_root / "guard_selected.safetensors", guard_state) if val else None
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    dist.barrier()
    mine, rows_mine = dist.share(cfg.prompts_per_step), dist.share(cfg.prompts_per_step * cfg.num_generations)
    bar = tqdm(range(start_step, cfg.max_steps), desc=f"calibrate eta={cfg.eta:+g}",
               disable=not r.rt.progress or not dist.is_main, initial=start_step, total=cfg.max_steps)
    for step in bar:
        t0 = time.time()
        ro = rollout(r, step, ema, mine, rows_mine)
        loss, clip_frac, kl = update(r, ro, optimizer, step, ckpt_root / "last")
        scheduler.step()
        proxy_loss = teach_adversary(r, ro) if r.adversary is not None else None
        row = step_row(r, ro, step, loss, clip_frac, kl, time.time() - t0)
        if r.adversary is not None:
            row["proxy_loss"] = proxy_loss
        if guard is not None and ((step + 1) % cfg.guard_steps == 0 or step + 1 == cfg.max_steps):
            row["guard_val_accuracy"] = guard.check(step + 1)
        log.write(row)
        bar.set_postfix(reward=f"{row['task_reward']:.2f}", r_cal=f"{row['r_cal']:.3f}", kl=f"{kl:.3f}")
        if cfg.save_steps and ((step + 1) % cfg.save_steps == 0 or step + 1 == cfg.max_steps):
            save_checkpoint(ckpt_root, step + 1, r.policy, optimizer, scheduler,  # (rank 0 writes)
                            {"ema": ema, "before": before, "guard": guard.state if guard else None})
            if r.adversary is not None:
                r.adversary.save(ckpt_root / "adversary", step + 1)
    log.close()
    return write_card(r, out, before, guard, t_start)
