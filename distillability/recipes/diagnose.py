"""Diagnose the distillation traps between a teacher and a student/proxy (docs/method.md §2).

Writes `diagnose.json` (every figure), PNG plots and `summary.md`:
1. token vs sequence KL, forward vs reverse KL, on-policy (student samples) vs off-policy (teacher samples);
2. tail noise: per token type, count and mean KL contribution at small k and at |V| (top-k accumulated);
3. task-driven sparsity: mean token KL per task family, share of tokens carrying 80% of the KL;
4. off-policy instability: importance-weight variance and ESS of off-policy reverse-KL estimates;
5. wrong-trace preference rate of the teacher and of the student on the same traces.

Token-level distributions: with a shared vocabulary, the full next-token distributions; with different
tokenizers, the next-*character* distributions at positions where both tokenizations start a token
(crosstok.py) [our definition]. Either way a "token type" is the teacher's next token text.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from ..config import RuntimeConfig, TaskConfig, opt, sub, to_dict
from ..crosstok import FirstCharProjector, align_pair
from ..divergences import divergence_rows, topk_accumulated_kl
from ..errors import ConfigError
from ..estimators import kl_estimators, off_policy_reverse_kl
from ..io import check_output_dir, save_figure, versions, write_json, write_text
from ..metrics import group_by_prompt, wrong_trace_preference
from ..models import same_vocabulary
from ..sampling import generate
from ..scoring import check_context, encode_pair, pad_batch, sequence_logprobs


@dataclasses.dataclass
class DiagnoseConfig:
    ALIASES = {"num_prompts": "eval_prompts", "num_samples": "num_generations"}  # deprecated (one release)

    teacher: str = opt("", "The teacher.")
    student: str = opt("", "The student or calibration proxy.")
    output_dir: str = opt("runs/diagnose", "Where diagnose.json, plots and summary.md go.")
    eval_prompts: int = opt(64, "Held-out prompts to analyse.", min=1)
    num_generations: int = opt(4, "Samples per prompt from each model (also the traces for wrong-trace preference).", min=2)
    temperature: float = opt(1.0, "Sampling temperature.", min=0, min_exclusive=True)
    max_new_tokens: int = opt(64, "Max new tokens per sample.", min=1)
    top_k: list[int] = opt([1, 5, 10, 50, 100, 1000], "k values of the top-k accumulated KL (|V| is always added).")
    task: TaskConfig = sub(TaskConfig, "The task.")
    runtime: RuntimeConfig = sub(RuntimeConfig, "Devices, precision, threads, seed.")


def _support_size(teacher, projector) -> int:
    return projector.size if projector is not None else teacher.config.vocab_size


def _token_stats(teacher, ttok, student, stok, prompts, responses, projector, chat, ks):
    """Per response position of each (prompt, response): forward KL, reverse KL and the top-k accumulated
    forward KL, the teacher's next-token text and the sample index. Statistics are computed sequence by
    sequence, so only one sequence's float32 distributions exist at a time (large vocabularies)."""
    fkl, rkl, topk, types, owner = [], [], [], [], []
    dev_t, dev_s = next(teacher.parameters()).device, next(student.parameters()).device
    V = max(teacher.config.vocab_size, student.config.vocab_size)
    step = max(1, min(16, int(2e8 // (V * 256))))  # bound the logits of one forward pass

    def add(t_lp, s_lp, token_ids, tok, i):
        fkl.append(divergence_rows(s_lp, t_lp, "fkl"))
        rkl.append(divergence_rows(s_lp, t_lp, "rkl"))
        topk.append(topk_accumulated_kl(t_lp, s_lp, ks, chunk_size=max(1, 2**24 // t_lp.shape[-1])))
        types.extend(tok.decode([t]) or "<eos>" for t in token_ids)
        owner.extend([i] * len(token_ids))

    for start in range(0, len(prompts), step):
        P, R = prompts[start:start + step], responses[start:start + step]
        if projector is None:
            enc = [encode_pair(ttok, p, r, True, chat) for p, r in zip(P, R)]
            ids, attn = pad_batch([e[0] for e in enc], ttok.pad_token_id)
            with torch.no_grad():
                tl = teacher(input_ids=ids.to(dev_t), attention_mask=attn.to(dev_t)).logits
                sl = student(input_ids=ids.to(dev_s), attention_mask=attn.to(dev_s)).logits
            for i, (seq, plen) in enumerate(enc):
                pos = list(range(plen - 1, len(seq) - 1))
                add(torch.log_softmax(tl[i, pos].float(), -1), torch.log_softmax(sl[i, pos].to(tl.device).float(), -1),
                    [seq[p + 1] for p in pos], ttok, start + i)
        else:
            pairs = [align_pair(ttok, stok, p, r, True, chat) for p, r in zip(P, R)]
            t_ids, t_attn = pad_batch([a.ids for a, _ in pairs], ttok.pad_token_id)
            s_ids, s_attn = pad_batch([b.ids for _, b in pairs], stok.pad_token_id)
            with torch.no_grad():
                tl = teacher(input_ids=t_ids.to(dev_t), attention_mask=t_attn.to(dev_t)).logits
                sl = student(input_ids=s_ids.to(dev_s), attention_mask=s_attn.to(dev_s)).logits
            for i, (a, b) in enumerate(pairs):
                add(projector.project(tl[i, a.positions], 0).cpu(), projector.project(sl[i, b.positions], 1).cpu(),
                    [a.ids[p + 1] for p in a.positions], ttok, start + i)
    cat = lambda xs: torch.cat([x.cpu() for x in xs]).numpy()  # noqa: E731
    return cat(fkl), cat(rkl), cat(topk), types, np.array(owner)


def _save(fig, out: Path, name: str) -> str:
    fig.tight_layout()
    save_figure(fig, out / name, dpi=110)
    return name


def _plots(report: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    # 1. tail noise: accumulated KL per token type vs frequency, one curve per k
    tn = report["tail_noise"]
    fig, ax = plt.subplots(figsize=(6, 4))
    counts = np.array([t["count"] for t in tn["per_type"]])
    order = np.argsort(counts)
    for j, k in enumerate(tn["ks"]):
        ax.plot(counts[order], np.array([t["mean_topk_kl"][j] for t in tn["per_type"]])[order], marker="o", ms=3,
                label=f"k={k}")
    ax.set_xscale("log")
    ax.set_xlabel("token-type frequency (occurrences)")
    ax.set_ylabel("mean accumulated FKL")
    ax.set_title("Tail noise: top-k accumulated KL by token frequency")
    ax.legend(fontsize=7)
    files.append(_save(fig, out, "tail_noise.png"))
    # 2. token vs sequence, forward vs reverse, on vs off policy
    kl = report["kl"]
    names = ["token FKL\n(off-policy)", "seq FKL\n(off-policy)", "token RKL\n(on-policy)", "seq RKL\n(on-policy)",
             "seq RKL\n(off-policy IS)"]
    vals = [kl["token_fkl_per_seq"], kl["seq_fkl_off_policy"]["k1"], kl["token_rkl_per_seq_on_policy"],
            kl["seq_rkl_on_policy"]["k1"], kl["seq_rkl_off_policy"]["estimate"]]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.bar(names, vals, color=["#4c72b0", "#4c72b0", "#dd8452", "#dd8452", "#c44e52"])
    ax.set_ylabel("nats per sequence")
    ax.set_title(f"KL estimates (off-policy ESS {kl['seq_rkl_off_policy']['ess']:.1f} of {kl['seq_rkl_off_policy']['n']})")
    files.append(_save(fig, out, "kl_estimates.png"))
    # 3. sparsity: cumulative share of KL carried by the top tokens
    sp = report["sparsity"]
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for fam, d in sp["per_family"].items():
        ax.plot(np.linspace(0, 1, len(d["cumulative_share"])), d["cumulative_share"], label=f"{fam} (mean {d['mean_token_kl']:.3f})")
    ax.axhline(0.8, ls="--", c="gray")
    ax.set_xlabel("fraction of tokens (largest KL first)")
    ax.set_ylabel("share of total KL")
    ax.set_title("Signal sparsity by task family")
    ax.legend(fontsize=7)
    files.append(_save(fig, out, "sparsity.png"))
    return files


def tail_noise_by_token(topk: torch.Tensor, types: list, ks: list[int]) -> dict:
    """Per token type: the top-k accumulated FKL for every k, and the share of the full KL in the tail beyond the
    smallest k (the paper's Figures 1-2); plus how that share correlates with the type's frequency."""
    per_type = defaultdict(list)
    for i, ty in enumerate(types):
        per_type[ty].append(i)
    small = 0  # the smallest k
    rows = []
    for ty, idx in per_type.items():
        full = topk[idx, -1]
        rows.append({"token": ty, "count": len(idx), "mean_topk_kl": topk[idx].mean(0).tolist(),
                     "mean_kl_small_k": float(topk[idx, small].mean()), "mean_kl_full": float(full.mean()),
                     "tail_share": float(((full - topk[idx, small]).clip(min=0)).sum() / max(full.sum(), 1e-12))})
    rows.sort(key=lambda r: -r["count"])
    cnt = np.array([r["count"] for r in rows], dtype=float)
    tail = np.array([r["tail_share"] for r in rows])
    corr = float(np.corrcoef(np.log(cnt), tail)[0, 1]) if len(rows) > 2 and cnt.std() > 0 and tail.std() > 0 else float("nan")
    return {"ks": ks, "per_type": rows[:60], "freq_tail_share_correlation": corr,
            "full_minus_small_k_per_token": float((topk[:, -1] - topk[:, small]).mean())}


def sparsity_by_family(fam_of_sample: list[str], fkl: torch.Tensor, owner) -> dict:
    """Per task family: how few tokens carry 80% of the token FKL (the task signal's sparsity)."""
    per_family = {}
    for fam in sorted(set(fam_of_sample)):
        vals = np.sort(fkl[[fam_of_sample[o] == fam for o in owner]])[::-1]
        cum = np.cumsum(vals) / max(vals.sum(), 1e-12)
        share80 = float((np.searchsorted(cum, 0.8) + 1) / max(1, len(vals)))
        per_family[fam] = {"mean_token_kl": float(vals.mean()) if len(vals) else 0.0, "tokens": int(len(vals)),
                           "share_of_tokens_for_80pct": share80, "cumulative_share": cum[:: max(1, len(cum) // 50)].tolist()}
    return per_family


def run(cfg: DiagnoseConfig) -> dict:
    if not cfg.teacher or not cfg.student:
        raise ConfigError("config keys 'teacher' and 'student' are required")
    rt = cfg.runtime
    check_output_dir(cfg.output_dir)
    rt.start()
    t0 = time.time()
    chat = cfg.task.use_chat_template
    teacher, ttok = rt.load(cfg.teacher, frozen=True)
    student, stok = rt.load(cfg.student, frozen=True)
    task = cfg.task.load()
    examples = task.eval[: cfg.eval_prompts]
    check_context(teacher, ttok, examples, cfg.max_new_tokens, chat, "the teacher")
    check_context(student, stok, examples, cfg.max_new_tokens, chat, "the student")
    prompts = [e.prompt for e in examples]
    shared_vocab = same_vocabulary(ttok, stok)
    projector = None if shared_vocab else FirstCharProjector([ttok, stok])

    def sample(model, tok, salt):
        g = generate(model, tok, prompts, cfg.max_new_tokens, cfg.temperature, num_return_sequences=cfg.num_generations,
                     seed=rt.seed + salt, autocast=rt.autocast, use_chat_template=chat)
        return [prompts[x.prompt_index] for x in g], [x.text for x in g], [x.finished for x in g], [x.prompt_index for x in g]

    tP, tR, tF, tI = sample(teacher, ttok, 1)
    sP, sR, sF, sI = sample(student, stok, 2)

    # token level, off-policy (teacher samples): FKL, RKL, top-k accumulated FKL
    V = _support_size(teacher, projector)
    ks = sorted({k for k in cfg.top_k if k < V} | {V})
    fkl, rkl, topk, types, owner = _token_stats(teacher, ttok, student, stok, tP, tR, projector, chat, ks)
    # token level, on-policy (student samples): RKL
    _, rkl_on, _, _, _ = _token_stats(teacher, ttok, student, stok, sP, sR, projector, chat, ks)

    # sequence level
    lt_t = sequence_logprobs(teacher, ttok, tP, tR, tF, chat)["logprob"]
    ls_t = sequence_logprobs(student, stok, tP, tR, tF, chat)["logprob"]
    lt_s = sequence_logprobs(teacher, ttok, sP, sR, sF, chat)["logprob"]
    ls_s = sequence_logprobs(student, stok, sP, sR, sF, chat)["logprob"]
    n_seq = len(tR)
    kl = {
        "token_fkl_mean": float(fkl.mean()), "token_rkl_mean": float(rkl.mean()),
        "token_rkl_on_policy_mean": float(rkl_on.mean()),
        "token_fkl_per_seq": float(fkl.sum() / n_seq), "token_rkl_per_seq_on_policy": float(rkl_on.sum() / len(sR)),
        "seq_fkl_off_policy": kl_estimators(lt_t, ls_t),  # y ~ teacher: KL(T||S)
        "seq_rkl_on_policy": kl_estimators(ls_s, lt_s),  # y ~ student: KL(S||T)
        "seq_rkl_off_policy": off_policy_reverse_kl(ls_t, lt_t),  # y ~ teacher, importance-weighted
        "support": "vocabulary" if shared_vocab else "next-character (different tokenizers)",
    }

    tail_noise = tail_noise_by_token(topk, types, ks)
    per_family = sparsity_by_family([examples[i].family for i in tI], fkl, owner)
    correct = [task.score(examples[i], r) >= 1.0 for i, r in zip(tI, tR)]
    chars = torch.tensor([max(1, len(r)) for r in tR], dtype=torch.float64)
    wtp = {who: wrong_trace_preference(group_by_prompt(len(examples), tI, correct, lp.tolist()))
           for who, lp in (("teacher", lt_t / chars), ("student", ls_t / chars))}

    report = {"teacher": cfg.teacher, "student": cfg.student, "task": to_dict(cfg.task), "kl": kl,
              "tail_noise": tail_noise, "sparsity": {"per_family": per_family}, "off_policy": kl["seq_rkl_off_policy"],
              "wrong_trace_preference": wtp, "teacher_sample_accuracy": float(np.mean(correct)),
              "wall_seconds": time.time() - t0, "versions": versions(), "precision": rt.precision()}
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report["plots"] = _plots(report, out)
    write_json(out / "diagnose.json", report)
    write_text(out / "summary.md", summary_markdown(report))
    return report


def summary_markdown(r: dict) -> str:
    kl, tn, op = r["kl"], r["tail_noise"], r["off_policy"]
    lines = [f"# Distillation traps: {r['teacher']} → {r['student']}", "",
             f"Token distributions compared over: {kl['support']}.", "",
             "| measure | value |", "|---|---|",
             f"| token FKL per sequence (teacher samples) | {kl['token_fkl_per_seq']:.3f} |",
             f"| sequence FKL estimate k1 / k3 (teacher samples) | {kl['seq_fkl_off_policy']['k1']:.3f} / {kl['seq_fkl_off_policy']['k3']:.3f} |",
             f"| token RKL per sequence (student samples, on-policy) | {kl['token_rkl_per_seq_on_policy']:.3f} |",
             f"| sequence RKL on-policy k1 / k3 | {kl['seq_rkl_on_policy']['k1']:.3f} / {kl['seq_rkl_on_policy']['k3']:.3f} |",
             f"| sequence RKL off-policy (importance weighted) | {op['estimate']:.3f} (variance {op['variance']:.3g}) |",
             f"| off-policy effective sample size | {op['ess']:.1f} of {op['n']} |",
             f"| tail: mean KL added beyond k={tn['ks'][0]} per token | {tn['full_minus_small_k_per_token']:.4f} |",
             f"| corr(log frequency, tail share) | {tn['freq_tail_share_correlation']:.3f} |"]
    for fam, d in r["sparsity"]["per_family"].items():
        lines.append(f"| {fam}: mean token KL / tokens carrying 80% | {d['mean_token_kl']:.3f} / {d['share_of_tokens_for_80pct']:.2%} |")
    for who, w in r["wrong_trace_preference"].items():
        lines.append(f"| wrong-trace preference ({who}) | {w['rate']:.3f} ({w['pairs']} pairs) |")
    lines += ["", *[f"![{p}]({p})" for p in r.get("plots", [])]]
    return "\n".join(lines) + "\n"
