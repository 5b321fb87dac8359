"""Evaluate a model on a task (docs/method.md §5): greedy accuracy, pass@k from n samples per prompt,
failure-mode rates with example responses, and, when a proxy/student is given, the causal metrics
(mean D(pi || pi_C) of the model's samples and the wrong-trace preference rate of both models)."""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from pathlib import Path

import numpy as np

from ..config import RuntimeConfig, TaskConfig, opt, sub, to_dict
from ..errors import ConfigError
from ..evaluation import divergence_of_samples
from ..failure_modes import MODES, FailureThresholds, classify
from ..io import check_output_dir, versions, write_json, write_text
from ..metrics import accuracy_by_key, group_by_prompt, mean_pass_at_k, wrong_trace_preference
from ..sampling import generate
from ..scoring import check_context, sequence_logprobs


@dataclasses.dataclass
class EvaluateConfig:
    ALIASES = {"num_prompts": "eval_prompts", "n_samples": "num_generations"}  # deprecated (one release)

    model: str = opt("", "The model to evaluate.")
    proxy: str | None = opt(None, "Optional proxy/student for the causal metrics (D and wrong-trace preference).")
    output_dir: str = opt("runs/evaluate", "Where eval.json and eval.md go.")
    eval_prompts: int = opt(100, "Held-out prompts to evaluate (at most task.num_eval).", min=1)
    eval_offset: int = opt(0, "The first held-out prompt evaluated: e.g. 300 with eval_prompts=200 scores prompts "
                           "300-499, a validation slice to choose eta or steps on, disjoint from the test slice 0-299 "
                           "that the pipeline reports.", min=0)
    num_generations: int = opt(4, "Samples per prompt for pass@k and failure modes.", min=1)
    k: list[int] = opt([1, 2, 4], "k values of pass@k (each <= num_generations).")
    temperature: float = opt(1.0, "Sampling temperature for pass@k.", min=0, min_exclusive=True)
    max_new_tokens: int = opt(64, "Max new tokens per response.", min=1)
    ngram: int = opt(3, "Failure modes: n-gram size for repetition.", min=2)
    repeats: int = opt(4, "Failure modes: back-to-back repeats that count as degradation.", min=2)
    min_distinct3: float = opt(0.3, "Failure modes: distinct-3 ratio below which text is degenerate.", min=0, max=1)
    restatements: int = opt(3, "Failure modes: a step restated this often is self-correction collapse.", min=2)
    confident_prob: float = opt(0.8, "Failure modes: mean answer-token probability of an overconfident wrong answer.",
                                min=0, max=1)
    task: TaskConfig = sub(TaskConfig, "The task.")
    runtime: RuntimeConfig = sub(RuntimeConfig, "Devices, precision, threads, seed.")

    def validate(self) -> None:
        for k in self.k:
            if not 1 <= k <= self.num_generations:
                raise ConfigError(f"config key 'k': pass@{k} needs 1 <= k <= num_generations ({self.num_generations})")


def _answer_probs(model, tok, task, items, chat: bool) -> list[float | None]:
    """Mean token probability of each (example, response)'s final-answer span given everything before it
    (None where there is no answer), in one batched scoring pass."""
    spans = []
    for ex, response in items:
        answer = task.extract(ex, response)
        cut = response.rfind(answer) if answer else -1
        spans.append((ex.prompt + response[:cut], answer) if cut >= 0 else None)
    todo = [s for s in spans if s is not None]
    if not todo:
        return [None] * len(items)
    lps = iter(sequence_logprobs(model, tok, [p for p, _ in todo], [a for _, a in todo], False, chat)["token_logprobs"])
    out = []
    for s in spans:
        r = next(lps) if s is not None else None
        out.append(float(r.exp().mean()) if r is not None and r.numel() else None)
    return out


def evaluate_model(model, tok, task, examples, cfg: EvaluateConfig, proxy=None, ptok=None) -> dict:
    """All metrics of one model on `examples` (no files written)."""
    rt, chat = cfg.runtime, cfg.task.use_chat_template
    th = FailureThresholds(cfg.ngram, cfg.repeats, cfg.min_distinct3, cfg.restatements, cfg.confident_prob)
    prompts = [e.prompt for e in examples]
    greedy = generate(model, tok, prompts, cfg.max_new_tokens, greedy=True, autocast=rt.autocast, use_chat_template=chat)
    greedy_scores = [task.score(examples[g.prompt_index], g.text) for g in greedy]
    samples = generate(model, tok, prompts, cfg.max_new_tokens, cfg.temperature, num_return_sequences=cfg.num_generations,
                       seed=rt.seed + 17, autocast=rt.autocast, use_chat_template=chat)
    correct = np.zeros(len(examples), dtype=int)
    modes, examples_by_mode = Counter(), {m: [] for m in MODES}
    oks = [task.score(examples[g.prompt_index], g.text) >= 1.0 for g in samples]  # per sample, `samples` order
    answered = [task.extract(examples[g.prompt_index], g.text) is not None for g in samples]
    wrong = [i for i, g in enumerate(samples) if answered[i] and not oks[i]]  # their answer's confidence
    probs = dict(zip(wrong, _answer_probs(model, tok, task, [(examples[samples[i].prompt_index], samples[i].text)
                                                              for i in wrong], chat)))
    for i, g in enumerate(samples):
        ex = examples[g.prompt_index]
        correct[g.prompt_index] += oks[i]
        mode = classify(g.text, correct=oks[i], has_answer=answered[i], finished=g.finished,
                        well_formed=task.well_formed(ex, g.text) or not answered[i], answer_prob=probs.get(i),
                        thresholds=th)
        modes[mode] += 1
        if len(examples_by_mode[mode]) < 2:
            examples_by_mode[mode].append({"prompt": ex.prompt, "response": g.text})
    n = len(samples)
    result = {
        "greedy_accuracy": float(np.mean(greedy_scores)),
        "sample_accuracy": float(correct.sum() / max(1, n)),
        "pass_at_k": {str(k): mean_pass_at_k(correct.tolist(), cfg.num_generations, k) for k in cfg.k},
        "failure_modes": {m: modes[m] / max(1, n) for m in MODES},
        "failure_examples": examples_by_mode,
        "mean_response_chars": float(np.mean([len(g.text) for g in samples])) if samples else 0.0,
        "num_prompts": len(examples), "num_generations": cfg.num_generations,
    }
    families = [examples[g.prompt_index].family for g in greedy]
    if len({f for f in families if f}) > 1:
        # several families (e.g. math chains and multiple choice): a teacher can protect (or teach) one and not the other
        result["by_family"] = accuracy_by_key(*zip(*[(f, sc) for f, sc in zip(families, greedy_scores) if f]))
    if proxy is not None:
        # D and the wrong-trace preference score the evaluation's own samples (no second sampling pass)
        d = divergence_of_samples(model, tok, proxy, ptok, prompts, samples, chat)
        result["D_to_proxy_per_char"], result["D_to_proxy_summed"] = d["per_char"], d["summed"]
        result["wrong_trace_preference"] = {}
        chars = d["logprob"].new_tensor([max(1, len(g.text)) for g in samples])
        for name, lp in {"model": d["logprob"], "proxy": d["proxy_logprob"]}.items():
            groups = group_by_prompt(len(examples), [g.prompt_index for g in samples], oks, (lp / chars).tolist())
            result["wrong_trace_preference"][name] = wrong_trace_preference(groups)
    return result


def markdown(result: dict, title: str) -> str:
    lines = [f"# {title}", "", "| metric | value |", "|---|---|",
             f"| greedy accuracy | {result['greedy_accuracy']:.3f} |",
             f"| sample accuracy (T>0) | {result['sample_accuracy']:.3f} |"]
    lines += [f"| greedy accuracy, {f} ({v['num_prompts']} prompts) | {v['greedy_accuracy']:.3f} |"
              for f, v in result.get("by_family", {}).items()]
    lines += [f"| pass@{k} | {v:.3f} |" for k, v in result["pass_at_k"].items()]
    lines += [f"| failure: {m} | {v:.3f} |" for m, v in result["failure_modes"].items()]
    if "D_to_proxy_per_char" in result:
        lines.append(f"| D(model‖proxy) per char | {result['D_to_proxy_per_char']:.4f} |")
        for who, w in result["wrong_trace_preference"].items():
            lines.append(f"| wrong-trace preference ({who}) | {w['rate']:.3f} ({w['pairs']} pairs) |")
    lines += ["", "## Example responses per failure mode", ""]
    for m, exs in result["failure_examples"].items():
        for e in exs:
            lines.append(f"- **{m}**: `{e['prompt'].strip()[:80]}` → `{e['response'].strip()[:120]}`")
    return "\n".join(lines) + "\n"


def run(cfg: EvaluateConfig) -> dict:
    if not cfg.model:
        raise ConfigError("config key 'model' is required")
    rt = cfg.runtime
    check_output_dir(cfg.output_dir)
    rt.start()
    t0 = time.time()
    model, tok = rt.load(cfg.model, frozen=True)
    proxy, ptok = rt.load(cfg.proxy, frozen=True) if cfg.proxy else (None, None)
    task = cfg.task.load()
    items = task.eval[cfg.eval_offset: cfg.eval_offset + cfg.eval_prompts]
    if cfg.eval_offset and len(items) < cfg.eval_prompts:
        raise ConfigError(f"config key 'eval_offset': prompts {cfg.eval_offset}-{cfg.eval_offset + cfg.eval_prompts - 1} "
                          f"reach past the task's {len(task.eval)} held-out prompts (task.num_eval)")
    check_context(model, tok, items, cfg.max_new_tokens, cfg.task.use_chat_template, cfg.model)
    result = evaluate_model(model, tok, task, items, cfg, proxy, ptok)
    result.update({"model": cfg.model, "proxy": cfg.proxy, "task": to_dict(cfg.task), "eval_offset": cfg.eval_offset,
                   "wall_seconds": time.time() - t0, "versions": versions(), "precision": rt.precision()})
    out = Path(cfg.output_dir)
    write_json(out / "eval.json", result)
    write_text(out / "eval.md", markdown(result, f"Evaluation of {cfg.model}"))
    if Path(cfg.model).is_dir():
        from ..model_card import add_evaluation

        add_evaluation(cfg.model, {**result, "num_prompts": len(items)})
    return result
