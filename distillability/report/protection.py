"""The protection / distillability report: teacher utility, student accuracy and pass@k per method,
the distillability ratio (student accuracy from this teacher / from the control and original
teachers), failure-mode rates and the causal metrics. Markdown and a self-contained HTML page with
the plots embedded as PNG data URIs (readable offline)."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from ..io import write_text
from .attack import headline_sentence
from .attack import markdown as attack_markdown

TEACHERS = ("original", "control", "distillable", "undistillable")  # the teacher roles, in report order
CALIBRATED = TEACHERS[1:]


def headline_table(evaluations: dict, seed: int, wall_seconds: float, attacks: dict | None = None) -> dict:
    """headline.json: greedy accuracies on held-out prompts, teachers and students per method, and the attack
    battery's accuracies, ratios and protected budgets."""
    out = {
        "seed": seed, "wall_seconds": wall_seconds,
        "teachers": {t: evaluations["teachers"][t]["greedy_accuracy"] for t in TEACHERS if t in evaluations["teachers"]},
        "students": {m: {t: r["greedy_accuracy"] for t, r in per.items()} for m, per in evaluations["students"].items()},
        **({"student_base": evaluations["student_base"]["greedy_accuracy"]} if "student_base" in evaluations else {}),
    }
    if attacks:
        out["attacks"] = {"cells": {a: {t: {k: c.get(k) for k in ("status", "accuracy", "ratio", "gain_share")}
                                        for t, c in row.items()} for a, row in attacks["cells"].items()},
                          "protection": attacks["protection"], "summary": headline_sentence(attacks)}
    return out


def ratios(headline: dict, baseline: str) -> dict:
    return {m: {t: (acc / per[baseline] if per.get(baseline) else float("nan")) for t, acc in per.items()}
            for m, per in headline["students"].items()}


def _plot(headline: dict, out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    methods = list(headline["students"])
    groups = ["teacher"] + methods
    x = np.arange(len(groups))
    width = 0.2
    colors = {"original": "#8c8c8c", "control": "#4c72b0", "distillable": "#55a868", "undistillable": "#c44e52"}
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for i, t in enumerate(TEACHERS):
        vals = [headline["teachers"].get(t, np.nan)] + [headline["students"][m].get(t, np.nan) for m in methods]
        ax.bar(x + (i - 1.5) * width, vals, width, label=t, color=colors[t])
    if "student_base" in headline and methods:
        ax.hlines(headline["student_base"], 0.5, len(groups) - 0.5, colors="black", linestyles="dashed", linewidth=1,
                  label="student before distillation")
    ax.set_xticks(x, ["teacher itself"] + [f"student ({m})" for m in methods])
    ax.set_ylabel("greedy accuracy (held-out)")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"Distillability knob: teachers and their students (seed {headline['seed']})")
    ax.legend(fontsize=8, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    fig.tight_layout()
    name = "headline.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def markdown_table(headline: dict) -> str:
    cols = [t for t in TEACHERS if t in headline["teachers"]]
    lines = ["| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|",
             "| teacher | " + " | ".join(f"{headline['teachers'][t]:.3f}" for t in cols) + " |"]
    for m, per in headline["students"].items():
        lines.append(f"| student ({m}) | " + " | ".join(f"{per.get(t, float('nan')):.3f}" for t in cols) + " |")
    if "student_base" in headline:
        lines += ["", f"Student before distillation (the base every student starts from): {headline['student_base']:.3f}."]
    return "\n".join(lines)


def write_report(out: Path, headline: dict, evaluations: dict, cards: dict, attacks: dict | None = None) -> None:
    plot = _plot(headline, out)
    r_control = ratios(headline, "control")
    r_orig = ratios(headline, "original")
    md = ["# Distillability report", "", *([headline_sentence(attacks), ""] if attacks else []),
          markdown_table(headline), "",
          f"Run time: {headline['wall_seconds']:.0f} s, seed {headline['seed']}.", "",
          "## Distillability ratio (student accuracy ÷ student of the control / original teacher ÷ student before "
          "distillation)", "",
          "| method | teacher | ÷ control | ÷ original | ÷ base |", "|---|---|---|---|---|"]
    base = headline.get("student_base")
    for m in r_control:
        for t in r_control[m]:
            vs_base = headline["students"][m][t] / base if base else float("nan")
            md.append(f"| {m} | {t} | {r_control[m][t]:.2f} | {r_orig[m][t]:.2f} | {vs_base:.2f} |")
    md += ["", "## Teachers: utility, failure modes and causal metrics", "",
           "| teacher | greedy acc | pass@k | D to proxy /char | wrong-trace pref. (teacher / proxy) | failure modes |",
           "|---|---|---|---|---|---|"]
    for t, r in evaluations["teachers"].items():
        wtp = r.get("wrong_trace_preference", {})
        fm = ", ".join(f"{k} {v:.2f}" for k, v in r["failure_modes"].items() if v)
        pk = ", ".join(f"@{k} {v:.2f}" for k, v in r["pass_at_k"].items())
        md.append(f"| {t} | {r['greedy_accuracy']:.3f} | {pk} | {r.get('D_to_proxy_per_char', float('nan')):.4f} | "
                  f"{wtp.get('model', {}).get('rate', float('nan')):.2f} / {wtp.get('proxy', {}).get('rate', float('nan')):.2f} | {fm} |")
    md += ["", "## Students: accuracy, pass@k, failure modes", "", "| method | teacher | greedy acc | pass@k | failure modes |",
           "|---|---|---|---|---|"]
    for m, per in evaluations["students"].items():
        for t, r in per.items():
            fm = ", ".join(f"{k} {v:.2f}" for k, v in r["failure_modes"].items() if v)
            pk = ", ".join(f"@{k} {v:.2f}" for k, v in r["pass_at_k"].items())
            md.append(f"| {m} | {t} | {r['greedy_accuracy']:.3f} | {pk} | {fm} |")
    fams = sorted({f for per in evaluations["students"].values() for r in per.values() for f in r.get("by_family", {})})
    if fams:
        # where the protection (or the teaching) acts: a teacher protects only the families in which it has a
        # correct mode the student cannot imitate
        md += ["", "## Greedy accuracy by task family", "", "| model | " + " | ".join(fams) + " |",
               "|---" * (len(fams) + 1) + "|"]
        rows = [(f"teacher {t}", r) for t, r in evaluations["teachers"].items()]
        if "student_base" in evaluations:
            rows.append(("student base", evaluations["student_base"]))
        rows += [(f"{m} ← {t}", r) for m, per in evaluations["students"].items() for t, r in per.items()]
        for name, r in rows:
            by = r.get("by_family", {})
            md.append(f"| {name} | " + " | ".join(f"{by[f]['greedy_accuracy']:.3f}" if f in by else "-" for f in fams) + " |")
    if cards:
        md += ["", "## Calibration cards", "", "| teacher | eta | acc before → after | D/char before → after |", "|---|---|---|---|"]
        for t, c in cards.items():
            md.append(f"| {t} | {c['eta']:+g} | {c['before_accuracy']:.3f} → {c['after_accuracy']:.3f} | "
                      f"{c['before_D_per_char']:.4f} → {c['after_D_per_char']:.4f} |")
    md += ["", f"![headline]({plot})"]
    if attacks:
        md += ["", "## Attacks", "", attack_markdown(attacks, "attack")]
    diag = out / "diagnose"
    if (diag / "diagnose.json").exists():
        md += ["", "## Diagnose (teacher vs student)", "", "See [diagnose/summary.md](diagnose/summary.md)."]
    text = "\n".join(md) + "\n"
    write_text(out / "report.md", text)
    write_text(out / "report.html", to_html(text, out))


def to_html(markdown_text: str, base: Path) -> str:
    """A minimal markdown-to-HTML for our reports (tables, headings, images embedded as data URIs)."""
    body, in_table = [], False
    for line in markdown_text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-"):
                continue
            if not in_table:
                body.append("<table>")
                in_table = True
                body.append("<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cells) + "</tr>")
            else:
                body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if line.startswith("!["):
            src = line[line.index("(") + 1: line.rindex(")")]
            path = base / src
            if path.exists():
                data = base64.b64encode(path.read_bytes()).decode()
                body.append(f'<img alt="{html.escape(src)}" src="data:image/png;base64,{data}">')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    if in_table:
        body.append("</table>")
    style = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}img{max-width:100%}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>Distillability report</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n"
