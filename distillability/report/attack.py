"""The attack battery's report: the protection curve (student accuracy vs attacker budget per teacher, one panel
per method, the student base as a line), the filter / unseen-student / defense attackers as bars, the table of
every cell and the headline sentence (the largest budget at which a teacher's ratio to the control stays <= 0.6)."""

from __future__ import annotations

from pathlib import Path

from ..io import write_text

BAR = 0.6  # the ratio to the control's students at or below which a teacher counts as protected
COLORS = {"original": "#8c8c8c", "control": "#4c72b0", "distillable": "#55a868", "undistillable": "#c44e52"}


def _fmt(x, spec=".3f") -> str:
    return "-" if x is None else format(x, spec)


def headline_sentence(result: dict, teacher: str = "undistillable") -> str:
    """Where the teacher's protection holds against the budget attackers, in one sentence."""
    prot = result.get("protection", {}).get(teacher)
    if not prot:
        ran = any(a.get("is_budget") and result["cells"].get(a["name"], {}).get(teacher, {}).get("status") == "ok"
                  for a in result.get("battery", []))
        if ran:
            return (f"No protection ratio for the {teacher} teacher: the {result.get('reference', 'control')} "
                    "teacher's students scored 0 at every budget.")
        return f"No budget attacker was run against the {teacher} teacher."
    parts = []
    for method, p in prot.items():
        budgets = sorted(p["ratios"], key=lambda b: float(b.rstrip("x")))
        held = p["largest_budget_protected"]
        if held is None:
            parts.append(f"{method.upper()} never ({p['ratios'][budgets[0]]:.2f}x already at {budgets[0]})")
        elif f"{held:g}x" == budgets[-1]:
            parts.append(f"{method.upper()} up to {held:g}x, the largest budget tried ({p['ratios'][budgets[-1]]:.2f}x)")
        else:
            nxt = budgets[budgets.index(f"{held:g}x") + 1]
            parts.append(f"{method.upper()} up to {held:g}x ({p['ratios'][nxt]:.2f}x at {nxt})")
    return (f"Against budget attackers the {teacher} teacher stays protected (its students at or below {BAR}x the "
            "control's) for: " + "; ".join(parts) + ".")


def cell_text(cell: dict) -> str:
    status = cell.get("status")
    if status in ("skipped", "failed"):
        return status
    spread = f" ±{cell['accuracy_std']:.2f}" if cell.get("accuracy_std") else ""
    ratio = f" ({cell['ratio']:.2f}x)" if cell.get("ratio") is not None else ""
    return f"{cell['accuracy']:.3f}{spread}{ratio}" + (" partial" if status == "partial" else "")


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
            lines.append(f"| {t} | {method.upper()} | " + " | ".join(multiplier_text(rows[b]) if b in rows else "-"
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


def markdown(result: dict, image_dir: str = ".") -> str:
    teachers = result["teachers"]
    lines = [headline_sentence(result), "",
             f"Held-out accuracy of the attacker's students (mean over {result['repeats']} per cell, ± their standard "
             f"deviation) and, in brackets, the ratio to the {result['reference']} teacher's students of the same attacker.",
             "", "| attacker | " + " | ".join(teachers) + " | steps | prompts |", "|---" * (len(teachers) + 3) + "|"]
    for a in result["battery"]:
        row = result["cells"][a["name"]]
        first = next((c for c in row.values() if c.get("status") in ("ok", "partial")), {})
        lines.append(f"| {a['name']} | " + " | ".join(cell_text(row.get(t, {})) for t in teachers)
                     + f" | {_fmt(first.get('steps'), 'd')} | {_fmt(first.get('prompts'), 'd')} |")
    lines += cost_lines(result) + strongest_lines(result)
    lines += ["", "| attacker | teacher | accuracy ± binomial SE (prompts x students) | base | gain | share of the control's "
              "gain (- where that gain is within 2 SE of 0) | samples | wall s | note |",
              "|---|---|---|---|---|---|---|---|---|"]
    for a in result["battery"]:
        for t, c in result["cells"][a["name"]].items():
            note = c.get("reason") or "; ".join(c.get("errors", []))
            se = f" ± {c['accuracy_se']:.3f}" if c.get("accuracy_se") is not None else ""
            lines.append(f"| {a['name']} | {t} | {_fmt(c.get('accuracy'))}{se} | {_fmt(c.get('base'))} | {_fmt(c.get('gain'), '+.3f')} | "
                         f"{_fmt(c.get('gain_share'), '.2f')} | {_fmt(c.get('samples'), 'd')} | "
                         f"{_fmt(c.get('wall_seconds'), '.0f')} | {note} |")
    for name in result.get("plots", []):
        lines += ["", f"![{name}]({image_dir}/{name})"]
    return "\n".join(lines)


def _plots(out: Path, result: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    budget = [a for a in result["battery"] if a["is_budget"]]
    methods = [m for m in ("sft", "kd", "gkd") if any(a["method"] == m for a in budget)]
    if methods:
        fig, axes = plt.subplots(1, len(methods), figsize=(4 * len(methods), 3.6), squeeze=False, sharey=True)
        for ax, method in zip(axes[0], methods):
            attackers = sorted((a for a in budget if a["method"] == method), key=lambda a: a["budget"])
            bases = []
            for t in result["teachers"]:
                pts = [(a["budget"], result["cells"][a["name"]].get(t, {})) for a in attackers]
                pts = [(b, c) for b, c in pts if c.get("status") in ("ok", "partial")]
                if not pts:
                    continue
                bases += [c["base"] for _, c in pts]
                ax.errorbar([b for b, _ in pts], [c["accuracy"] for _, c in pts],
                            yerr=[c.get("accuracy_std", 0.0) for _, c in pts], marker="o", capsize=3, label=t,
                            color=COLORS.get(t))
            if bases:
                ax.axhline(sum(bases) / len(bases), color="black", linestyle="dashed", linewidth=1, label="student base")
            ax.set_xscale("log")
            ticks = sorted({a["budget"] for a in attackers})
            ax.set_xticks(ticks, [f"{b:g}x" for b in ticks])
            ax.minorticks_off()
            ax.set_xlabel("attacker budget (x the default)")
            ax.set_title(method.upper())
            ax.set_ylim(0, 1.05)
        axes[0][0].set_ylabel("student accuracy (held-out)")
        axes[0][-1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "attack_budget.png", dpi=110)
        plt.close(fig)
        names.append("attack_budget.png")
    variants = [a for a in result["battery"] if not a["is_budget"]]
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
        fig.savefig(out / "attack_variants.png", dpi=110)
        plt.close(fig)
        names.append("attack_variants.png")
    return names


def write_attack_report(out: Path, result: dict) -> None:
    result["plots"] = _plots(out, result)
    write_text(out / "attack.md", "# Attack battery\n\n" + markdown(result) + "\n")
