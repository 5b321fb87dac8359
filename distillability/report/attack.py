"""The attack battery's report: the protection curve (student accuracy vs attacker budget per teacher, one panel
per method, the student base as a line, and the gain share vs budget beneath), the filter / unseen-student / defense
attackers as bars, the table of every cell and the headline sentence (the share of the control's gain a teacher's
students keep at each budget, and the largest budget at which it stays <= 0.5)."""

from __future__ import annotations

from pathlib import Path

from ..io import save_figure, write_text
from ..protection import MIN_GAIN, SHARE_BAR, Z, curve_label, curve_of
from .numbers import fmt as _fmt
from .numbers import pm as _pm

COLORS = {"original": "#8c8c8c", "control": "#4c72b0", "distillable": "#55a868", "undistillable": "#c44e52"}


def _method_phrase(method: str, p: dict, reference: str) -> str:
    budgets = sorted(p["gain_shares"], key=lambda b: float(b.rstrip("x")))
    parts = []
    for b in budgets:
        share, g = p["gain_shares"][b], p["reference_gains"].get(b)
        parts.append(f"{b} not measurable (the {reference}'s students gain {_fmt(g, '+.2f')})" if share is None
                     else f"{b} {_pm(share, p.get('gain_share_se', {}).get(b))}")
    held = p["largest_budget_protected"]
    measurable = [b for b in budgets if p["gain_shares"][b] is not None]
    if not p["measurable"]:
        status = f"no budget at which the {reference} teaches, nothing to withhold"
    elif held is None:
        status = "not protected at any budget where it could be measured"
    elif f"{held:g}x" == measurable[-1]:
        status = f"protected up to {held:g}x, the largest measurable budget"
    else:
        status = f"protected up to {held:g}x"
    return f"{curve_label(method)}: {status} (gain share {', '.join(parts)})"


def headline_sentence(result: dict, teacher: str = "undistillable") -> str:
    """What the teacher's students keep of the reference's gain along the budget curve, in one sentence."""
    prot = result.get("protection", {}).get(teacher)
    reference = result.get("reference", "control")
    if not prot:
        return f"No budget attacker was run against the {teacher} teacher."
    return (f"Against the budget attackers, the share of the {reference} teacher's students' gain over their base "
            f"that the {teacher} teacher's students keep (protected: <= {SHARE_BAR}): "
            + "; ".join(_method_phrase(m, p, reference) for m, p in prot.items()) + ".")


def cell_text(cell: dict) -> str:
    status = cell.get("status")
    if status in ("skipped", "failed"):
        return status
    share = f"; share {_pm(cell['gain_share'], cell.get('gain_share_se'))}" if cell.get("gain_share") is not None else ""
    gain = f" (gain {_pm(cell['gain'], cell.get('gain_se'), '+.3f')}{share})" if cell.get("gain") is not None else ""
    return f"{cell['accuracy']:.3f}{gain}" + (" partial" if status == "partial" else "")


def multiplier_text(m: dict) -> str:
    sign = {"at_least": ">= ", "at_most": "<= "}.get(m.get("bound"), "")
    return f"{sign}{m['multiplier']:.2f}x"


def cost_lines(result: dict) -> list[str]:
    """The cost multiplier table: per teacher and method, what an attacker pays in data at each budget."""
    costs = {t: c for t, c in result.get("cost_multiplier", {}).items() if c}
    if not costs:
        return []
    budgets = sorted({b for per in costs.values() for rows in per.values() for b in rows}, key=lambda b: float(b[:-1]))
    lines = ["", f"What the attacker pays: at each budget, the data (x) the {result['reference']} teacher's students "
             "need to reach what this teacher's students reached, i.e. budget / the reference's budget of equal "
             "accuracy (log-linear between measured budgets; >= and <= outside them). 1x: no protection; below 1x: "
             "this teacher teaches more.", "", "| teacher | method | " + " | ".join(budgets) + " |",
             "|---" * (len(budgets) + 2) + "|"]
    for t, per in costs.items():
        for method, rows in per.items():
            lines.append(f"| {t} | {curve_label(method)} | " + " | ".join(multiplier_text(rows[b]) if b in rows else "-"
                                                                    for b in budgets) + " |")
    return lines


def strongest_lines(result: dict) -> list[str]:
    """The strongest known attack per budget against each teacher and against the reference."""
    strong = {t: s for t, s in result.get("strongest_attack", {}).items() if s}
    if not strong:
        return []
    lines = ["", "The strongest attack per budget (any method, filter or student; not necessarily the same attacker "
             "for both teachers):", "", f"| teacher | budget | its strongest attacker | accuracy | the "
             f"{result['reference']}'s strongest | accuracy | ratio |", "|---|---|---|---|---|---|---|"]
    for t, rows in strong.items():
        for b, r in rows.items():
            lines.append(f"| {t} | {b} | {r['attacker']} | {r['accuracy']:.3f} | {r['reference_attacker']} | "
                         f"{r['reference_accuracy']:.3f} | {_fmt(r['ratio'], '.2f')} |")
    return lines


def student_lines(result: dict) -> list[str]:
    """Whom the battery attacked with: one line per attacker student (size, architecture, tokenizer, origin; the
    priming of a pretrained one, whose accuracy after priming is that student's base)."""
    from ..models import model_phrase

    students = result.get("students") or {}
    if not students:
        return []
    lines = ["Attacker students (a student's cells report gains over its own base):", ""]
    for name, d in students.items():
        p = d.get("primed")
        primed = (f"; primed on {p['answers']} {p['style']} answers ({p['steps']} steps): {_fmt(p['accuracy_before'])} "
                  f"-> {_fmt(p['accuracy_after'])}, its base" if p else "")
        lines.append(f"- `{name}`: {model_phrase(d)}{primed}")
    return lines + [""]


def markdown(result: dict, image_dir: str = ".") -> str:
    teachers, ref = result["teachers"], result["reference"]
    lines = [headline_sentence(result), "", *student_lines(result),
             f"Held-out accuracy of the attacker's students (mean over {result['repeats']} per cell) and, in brackets, "
             f"their gain over the student base ± its SE and the share of the {ref} teacher's students' gain they keep "
             f"(- where the {ref}'s gain is below {MIN_GAIN} or {Z:g} SE: nothing to share).",
             "", "| attacker | " + " | ".join(teachers) + " | steps | prompts |", "|---" * (len(teachers) + 3) + "|"]
    for a in result["battery"]:
        row = result["cells"][a["name"]]
        first = next((c for c in row.values() if c.get("status") in ("ok", "partial")), {})
        lines.append(f"| {a['name']} | " + " | ".join(cell_text(row.get(t, {})) for t in teachers)
                     + f" | {_fmt(first.get('steps'), 'd')} | {_fmt(first.get('prompts'), 'd')} |")
    lines += cost_lines(result) + strongest_lines(result)
    lines += ["", "| attacker | teacher | students | accuracy ± SE | base ± SE | gain ± SE | gain share ± SE | "
              "ratio | samples | wall s | note |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for a in result["battery"]:
        for t, c in result["cells"][a["name"]].items():
            note = c.get("reason") or "; ".join(c.get("errors", []))
            lines.append(f"| {a['name']} | {t} | {_fmt(c.get('n_students'), 'd')} | "
                         f"{_pm(c.get('accuracy'), c.get('accuracy_se'), '.3f')} | {_pm(c.get('base'), c.get('base_se'), '.3f')} | "
                         f"{_pm(c.get('gain'), c.get('gain_se'), '+.3f')} | {_pm(c.get('gain_share'), c.get('gain_share_se'))} | "
                         f"{_fmt(c.get('ratio'), '.2f')} | {_fmt(c.get('samples'), 'd')} | "
                         f"{_fmt(c.get('wall_seconds'), '.0f')} | {note} |")
    for name in result.get("plots", []):
        lines += ["", f"![{name}]({image_dir}/{name})"]
    return "\n".join(lines)


def _plots(out: Path, result: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    on_curve = curve_of(result["battery"])  # attacker name -> its budget curve (a method, or method:student)
    methods = list(dict.fromkeys(on_curve.values()))
    if methods:
        fig, axes = plt.subplots(2, len(methods), figsize=(4 * len(methods), 6.4), squeeze=False, sharey="row",
                                 sharex="col")
        for col, method in enumerate(methods):
            ax, ax_share = axes[0][col], axes[1][col]
            attackers = sorted((a for a in result["battery"] if on_curve.get(a["name"]) == method),
                               key=lambda a: a["budget"])
            bases = []
            for t in result["teachers"]:
                pts = [(a["budget"], result["cells"][a["name"]].get(t, {})) for a in attackers]
                pts = [(b, c) for b, c in pts if c.get("status") in ("ok", "partial")]
                if not pts:
                    continue
                bases += [c["base"] for _, c in pts]
                ax.errorbar([b for b, _ in pts], [c["accuracy"] for _, c in pts],
                            yerr=[c.get("accuracy_se") or 0.0 for _, c in pts], marker="o", capsize=3, label=t,
                            color=COLORS.get(t))
                shares = [(b, c) for b, c in pts if c.get("gain_share") is not None and t != result["reference"]]
                if shares:
                    ax_share.errorbar([b for b, _ in shares], [c["gain_share"] for _, c in shares],
                                      yerr=[c.get("gain_share_se") or 0.0 for _, c in shares], marker="o", capsize=3,
                                      label=t, color=COLORS.get(t))
            if bases:
                ax.axhline(sum(bases) / len(bases), color="black", linestyle="dashed", linewidth=1, label="student base")
            ax_share.axhline(1.0, color=COLORS["control"], linewidth=1, label=f"{result['reference']} (1 by definition)")
            ax_share.axhline(SHARE_BAR, color="black", linestyle="dotted", linewidth=1, label=f"protected below {SHARE_BAR}")
            ax_share.axhline(0.0, color="black", linestyle="dashed", linewidth=1)
            ax.set_title(curve_label(method))
            ax.set_ylim(0, 1.05)
            for a_ in (ax, ax_share):
                a_.set_xscale("log")
                ticks = sorted({a["budget"] for a in attackers})
                a_.set_xticks(ticks, [f"{b:g}x" for b in ticks])
                a_.minorticks_off()
            ax_share.set_xlabel("attacker budget (x the distill stage's)")
        axes[0][0].set_ylabel("student accuracy (held-out, ± SE)")
        axes[1][0].set_ylabel(f"share of the {result['reference']}'s gain")
        axes[0][-1].legend(fontsize=7)
        axes[1][-1].legend(fontsize=7)
        fig.tight_layout()
        save_figure(fig, out / "attack_budget.png")
        names.append("attack_budget.png")
    variants = [a for a in result["battery"] if a["name"] not in on_curve]
    if variants:
        import numpy as np

        teachers = result["teachers"]
        fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(variants)), 3.8))
        width = 0.8 / max(len(teachers), 1)
        for i, t in enumerate(teachers):
            vals = [result["cells"][a["name"]].get(t, {}).get("accuracy", np.nan) for a in variants]
            ax.bar(np.arange(len(variants)) + (i - (len(teachers) - 1) / 2) * width, vals, width, label=t,
                   color=COLORS.get(t))
        ax.set_xticks(np.arange(len(variants)), [a["name"] for a in variants], rotation=20, fontsize=8)
        ax.set_ylabel("student accuracy (held-out)")
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=7, ncol=3)
        fig.tight_layout()
        save_figure(fig, out / "attack_variants.png")
        names.append("attack_variants.png")
    return names


def write_attack_report(out: Path, result: dict) -> None:
    result["plots"] = _plots(out, result)
    write_text(out / "attack.md", "# Attack battery\n\n" + markdown(result) + "\n")
