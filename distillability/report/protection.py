"""The protection / distillability report: teacher utility, student accuracy and pass@k per method,
the distillability ratio (student accuracy from this teacher / from the control and original
teachers), failure-mode rates and the causal metrics. Markdown and a self-contained HTML page with
the plots embedded as PNG data URIs (readable offline)."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from ..io import save_figure, write_text
from ..protection import CALIBRATED, TEACHERS  # noqa: F401 (re-exported: the report's order of teachers)
from .attack import headline_sentence
from .attack import markdown as attack_markdown
from .numbers import fmt as _f
from .numbers import pm
from .verdict import verdict

GAIN_KEYS = ("accuracy", "accuracy_se", "accuracies", "n_students", "se_from", "base", "gain", "gain_se", "gain_share",
             "gain_share_se", "reference_teaches", "ratio")


def _roles(by_role: dict) -> list[str]:
    """The teacher roles present, in report order: TEACHERS, then any other (e.g. undistillable@LABEL)."""
    return [t for t in TEACHERS if t in by_role] + [t for t in by_role if t not in TEACHERS]


def headline_table(evaluations: dict, seed: int, wall_seconds: float, attacks: dict | None = None,
                   cells: dict | None = None, attacker: dict | None = None) -> dict:
    """headline.json: greedy accuracies on held-out prompts (teachers; students: the mean of each cell's students),
    the students' gains over the base with SEs and gain shares (`gains`, from `cells`: pipeline.student_cells),
    whom they measure (`attacker`), the attack battery's gains, shares and protected budgets, and the verdict."""
    from ..protection import binomial_se

    out = {
        "seed": seed, "wall_seconds": wall_seconds,
        "teachers": {t: evaluations["teachers"][t]["greedy_accuracy"] for t in _roles(evaluations["teachers"])},
        "students": {m: {t: r["greedy_accuracy"] for t, r in per.items()} for m, per in evaluations["students"].items()},
        **({"student_base": evaluations["student_base"]["greedy_accuracy"]} if "student_base" in evaluations else {}),
    }
    if cells:
        out["students"] = {m: {t: c["accuracy"] for t, c in per.items() if "accuracy" in c} for m, per in cells.items()}
        first = next(c for per in cells.values() for c in per.values() if "base" in c)
        out["student_base"], out["student_base_se"] = first["base"], first.get("base_se")
        if out["student_base_se"] is None and first.get("eval_prompts"):
            out["student_base_se"] = binomial_se(first["base"], first["eval_prompts"])
        out["gains"] = {m: {t: {k: c.get(k) for k in GAIN_KEYS} | {"status": c.get("status")} for t, c in per.items()}
                        for m, per in cells.items()}
    if attacker:
        out["attacker"] = attacker
    if "teachers_shifted" in evaluations:
        out["teachers_shifted"] = {t: evaluations["teachers_shifted"][t]["greedy_accuracy"] for t in TEACHERS
                                   if t in evaluations["teachers_shifted"]}
        if "shifted_split" in evaluations:
            out["shifted_split"] = evaluations["shifted_split"]
    if attacks:
        out["attacks"] = {"cells": {a: {t: {k: c.get(k) for k in ("status", *GAIN_KEYS, "base_se", "reference_gain",
                                                                    "reference_gain_se")}
                                        for t, c in row.items()} for a, row in attacks["cells"].items()},
                          "protection": attacks["protection"],
                          "summary": " ".join(headline_sentence(attacks, t) for t in _roles(attacks["protection"])
                                              if t == "undistillable" or t.startswith("undistillable@"))
                                     or headline_sentence(attacks),
                          "cost_multiplier": attacks.get("cost_multiplier"),
                          "strongest_attack": attacks.get("strongest_attack")}
    out["verdict"] = verdict(out, out["attacks"]["summary"] if attacks else None)
    return out


def _plot(headline: dict, out: Path) -> str:
    """headline.png: left, the accuracies of the teachers, the student base (its own bar) and the students per
    method; right, the students' gain over the base per method and teacher, ± SE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    methods = list(headline["students"])
    colors = {"original": "#8c8c8c", "control": "#4c72b0", "distillable": "#55a868", "undistillable": "#c44e52"}
    gains = headline.get("gains") or {}
    fig, axes = plt.subplots(1, 2 if gains else 1, figsize=(12 if gains else 7.5, 4.2), squeeze=False)
    ax = axes[0][0]
    groups = ["teacher"] + (["student base"] if "student_base" in headline else []) + methods
    x = np.arange(len(groups))
    width = 0.2
    for i, t in enumerate(TEACHERS):
        vals = [headline["teachers"].get(t, np.nan)] + ([np.nan] if "student_base" in headline else []) + \
               [headline["students"][m].get(t, np.nan) for m in methods]
        ax.bar(x + (i - 1.5) * width, vals, width, label=t, color=colors[t])
    if "student_base" in headline:
        ax.bar([1], [headline["student_base"]], 0.6, color="black", alpha=0.75,
               yerr=[headline.get("student_base_se") or 0.0], capsize=3)
        if methods:
            ax.hlines(headline["student_base"], 1.5, len(groups) - 0.5, colors="black", linestyles="dashed", linewidth=1,
                      label="student base")
    ax.set_xticks(x, ["teacher itself"] + (["student base"] if "student_base" in headline else [])
                  + [f"student ({m})" for m in methods])
    ax.set_ylabel("greedy accuracy (held-out)")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"Teachers and their students (seed {headline['seed']})")
    ax.legend(fontsize=8, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    if gains:
        ax = axes[0][1]
        gm = list(gains)
        xg = np.arange(len(gm))
        for i, t in enumerate(TEACHERS):
            vals = [gains[m].get(t, {}).get("gain", np.nan) for m in gm]
            errs = [gains[m].get(t, {}).get("gain_se") or 0.0 for m in gm]
            ax.bar(xg + (i - 1.5) * width, vals, width, yerr=errs, capsize=3, label=t, color=colors[t])
        ax.axhline(0, color="black", linewidth=1)
        ax.set_xticks(xg, [f"student ({m})" for m in gm])
        ax.set_ylabel("gain over the student base (± SE)")
        n = (headline.get("attacker") or {}).get("students_per_cell")
        ax.set_title("What distillation teaches" + (f" ({n} student{'s' if n > 1 else ''} per cell)" if n else ""))
    fig.tight_layout()
    name = "headline.png"
    save_figure(fig, out / name)
    return name


def markdown_table(headline: dict) -> str:
    cols = list(headline["teachers"])  # report order (protection._roles)
    lines = ["| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|",
             "| teacher | " + " | ".join(f"{headline['teachers'][t]:.3f}" for t in cols) + " |"]
    if "teachers_shifted" in headline:
        lines.append("| teacher, shifted split | " + " | ".join(
            f"{headline['teachers_shifted'].get(t, float('nan')):.3f}" for t in cols) + " |")
    for m, per in headline["students"].items():
        lines.append(f"| student ({m}) | " + " | ".join(f"{per[t]:.3f}" if t in per else "-" for t in cols) + " |")
    if "student_base" in headline:
        se = f" ± {headline['student_base_se']:.3f}" if headline.get("student_base_se") is not None else ""
        lines += ["", f"Student before distillation (the base every student starts from): {headline['student_base']:.3f}{se}."]
    return "\n".join(lines)


def gain_table(headline: dict) -> str:
    """Per method and teacher: the students, their accuracy ± SE, gain over the base ± SE, gain share ± SE."""
    gains = headline.get("gains")
    if not gains:
        return ""
    lines = ["| method | teacher | students | accuracy ± SE | gain over base ± SE | gain share ± SE | ÷ control |",
             "|---|---|---|---|---|---|---|"]
    for m, per in gains.items():
        for t in _roles(per):
            c = per[t]
            lines.append(f"| {m} | {t} | {_f(c.get('n_students'), 'd')} | {pm(c.get('accuracy'), c.get('accuracy_se'), '.3f')} | "
                         f"{pm(c.get('gain'), c.get('gain_se'), '+.3f')} | {pm(c.get('gain_share'), c.get('gain_share_se'), '.2f')} | "
                         f"{_f(c.get('ratio'), '.2f')} |")
    return "\n".join(lines)


MEANING = {
    "headline": "Greedy accuracy on held-out prompts never used in training. control: the same starting teacher "
                "RL-tuned on the task alone (eta = 0), the fair baseline; distillable / undistillable: calibrated with "
                "eta < 0 / > 0 for the same steps. The student base is the student before distillation.",
    "gain": "Gain over base: the students' mean accuracy minus the student base's (negative: distilling made the "
            "student worse than it started), ± its SE (the spread of the cell's students, or the binomial SE of their "
            "pooled answers where larger or where there is one student, and the base's binomial SE). Gain share: this "
            "teacher's students' gain / the control teacher's students' gain, with its delta-method SE; - where the "
            "control's students do not gain measurably (below 0.05 or 2 SE): there is nothing to withhold. ÷ control: "
            "the plain accuracy ratio, for reference.",
    "teachers": "pass@k: share of prompts with a correct answer among k samples. D to proxy /char: mean per-character "
                "log pi_teacher - log pi_proxy on the teacher's own samples (higher: harder for a small model to "
                "imitate). Wrong-trace preference: over prompts with a correct and an incorrect sample, the share of "
                "(correct, incorrect) pairs in which the teacher / the proxy finds the incorrect one more likely per "
                "character. Failure modes (first match wins): degradation (an n-gram repeated 4 times in a row, low "
                "distinct-3, or malformed), self_correction (no final answer, or a step restated 3 times), "
                "overconfident (a wrong answer given with mean answer-token probability >= 0.8), wrong, correct.",
    "students": "The same measures for the students (failure modes as in the teachers' table).",
    "family": "Where the protection (or the teaching) acts: a teacher protects only the task families in which it "
              "has a correct mode the student cannot imitate.",
    "cards": "Each calibration's teacher before and after, on its own held-out prompts: greedy accuracy and D to the "
             "proxy per character. The curves: per RL step, the task reward, the calibration reward r_cal "
             "(log pi_teacher - log pi_proxy per character, counted on correct responses) and the KL to the original "
             "teacher that anchors it.",
}


def _fm(r: dict) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in r["failure_modes"].items() if v)


def _pk(r: dict) -> str:
    return ", ".join(f"@{k} {v:.2f}" for k, v in r["pass_at_k"].items())


def _model_rows(evaluations: dict) -> list[str]:
    nan = float("nan")
    md = ["## Teachers: utility, failure modes and causal metrics", "",
          "| teacher | greedy acc | pass@k | D to proxy /char | wrong-trace pref. (teacher / proxy) | failure modes |",
          "|---|---|---|---|---|---|"]
    for t, r in evaluations["teachers"].items():
        wtp = r.get("wrong_trace_preference", {})
        md.append(f"| {t} | {r['greedy_accuracy']:.3f} | {_pk(r)} | {r.get('D_to_proxy_per_char', nan):.4f} | "
                  f"{wtp.get('model', {}).get('rate', nan):.2f} / {wtp.get('proxy', {}).get('rate', nan):.2f} | {_fm(r)} |")
    md += ["", MEANING["teachers"], "", "## Students: accuracy, pass@k, failure modes", "",
           "| method | teacher | greedy acc | pass@k | failure modes |", "|---|---|---|---|---|"]
    for m, per in evaluations["students"].items():
        md += [f"| {m} | {t} | {r['greedy_accuracy']:.3f} | {_pk(r)} | {_fm(r)} |" for t, r in per.items()]
    md += ["", MEANING["students"]]
    fams = sorted({f for per in evaluations["students"].values() for r in per.values() for f in r.get("by_family", {})})
    if fams:
        md += ["", "## Greedy accuracy by task family", "", "| model | " + " | ".join(fams) + " |",
               "|---" * (len(fams) + 1) + "|"]
        rows = [(f"teacher {t}", r) for t, r in evaluations["teachers"].items()]
        if "student_base" in evaluations:
            rows.append(("student base", evaluations["student_base"]))
        rows += [(f"{m} ← {t}", r) for m, per in evaluations["students"].items() for t, r in per.items()]
        for name, r in rows:
            by = r.get("by_family", {})
            md.append(f"| {name} | " + " | ".join(f"{by[f]['greedy_accuracy']:.3f}" if f in by else "-" for f in fams) + " |")
        md += ["", MEANING["family"]]
    return md


def _calibration_rows(out: Path, cards: dict) -> list[str]:
    from .curves import calibration_curves

    if not cards:
        return []
    md = ["## Calibration", "", "| teacher | eta | acc before → after | D/char before → after |", "|---|---|---|---|"]
    for t, c in cards.items():
        md.append(f"| {t} | {c['eta']:+g} | {c['before_accuracy']:.3f} → {c['after_accuracy']:.3f} | "
                  f"{c['before_D_per_char']:.4f} → {c['after_D_per_char']:.4f} |")
    md += ["", MEANING["cards"]]
    if plot := calibration_curves(out):
        md += ["", f"![calibration curves]({plot})"]
    return md


def _diagnose_rows(out: Path) -> list[str]:
    diag = out / "diagnose"
    if not (diag / "diagnose.json").exists():
        return []
    md = ["## Diagnose (teacher vs student)", "",
          "The distillation traps between the original teacher and the student base: token vs sequence and forward vs "
          "reverse KL, on- vs off-policy estimates with the importance-sampling effective sample size; the top-k "
          "accumulated KL per token type (tail noise); the share of KL carried by the most divergent tokens "
          "(sparsity). Every number: `diagnose/diagnose.json` and `diagnose/summary.md`."]
    for name in ("kl_estimates", "tail_noise", "sparsity"):
        if (diag / f"{name}.png").exists():
            md += ["", f"![{name.replace('_', ' ')}](diagnose/{name}.png)"]
    return md


def _facts_rows(headline: dict, cards: dict, facts: dict | None) -> list[str]:
    facts = facts or {}
    md = ["## Run facts", ""]
    precisions = {(p.get("device"), p.get("cpu"), p.get("amx"), p.get("avx512_bf16"), p.get("bf16"), p.get("reason"))
                  for c in cards.values() if (p := c.get("precision"))}
    for device, cpu, amx, avx, bf16, reason in sorted(precisions, key=str):
        hw = f"{device} ({cpu}; AMX {'yes' if amx else 'no'}, AVX512-BF16 {'yes' if avx else 'no'})" if device == "cpu" \
            else str(device)
        md.append(f"- device: {hw}; precision: {'bf16 autocast' if bf16 else 'float32'} ({reason})")
    if v := facts.get("versions"):
        md.append("- versions: " + ", ".join(f"{k} {x}" for k, x in v.items()))
    md.append(f"- seed {headline['seed']}" + (f", torch threads {facts['threads']}" if "threads" in facts else "")
              + f", wall time {headline['wall_seconds']:.0f} s")
    if stages := facts.get("stages"):
        reused = [k for k, s in stages.items() if s.get("reused")]
        md += ["- reused from an earlier run: " + (", ".join(reused) if reused else "none"), "",
               "| stage | wall s |", "|---|---|"]
        md += [f"| {k} | {'reused' if s.get('reused') else format(s['wall_seconds'], '.0f')} |" for k, s in stages.items()]
    return md


def _slice_words(evaluations: dict) -> str:
    """Which held-out prompts the teachers were read on, where that is a validation slice (evaluate.eval_offset):
    numbers to choose eta and steps on, not to report."""
    first = next(iter(evaluations.get("teachers", {}).values()), {})
    if not first.get("eval_offset"):
        return ""
    a = first["eval_offset"]
    return (f"**Validation slice**: held-out prompts {a}-{a + first['num_prompts'] - 1} (evaluate.eval_offset), "
            "for choosing eta and steps; the reported numbers are on the prompts before it. ")


def write_report(out: Path, headline: dict, evaluations: dict, cards: dict, attacks: dict | None = None,
                 facts: dict | None = None) -> None:
    """report.md and the self-contained report.html: the verdict and the headline plot first, then the tables
    (each with what its terms mean), then the details: calibration and training curves, attacks, diagnose, the
    run facts."""
    from .curves import student_losses

    plot = _plot(headline, out)
    md = ["# Distillability report", "", "## Verdict", ""]
    md += [f"> {line}" for line in headline.get("verdict") or verdict(headline, attacks and headline_sentence(attacks))]
    md += ["", f"![headline]({plot})", "", "## Accuracy", "", markdown_table(headline), "",
           _slice_words(evaluations) + MEANING["headline"], "",
           "## Gain over the student base", "", gain_table(headline) or "(no students distilled)", "", MEANING["gain"], "",
           *_model_rows(evaluations),
           "", *_calibration_rows(out, cards)]
    if losses := student_losses(out, list(headline["students"])):
        md += ["", "## Student training", "", "Each student's distillation loss per optimizer step (SFT: cross-entropy "
               "on the teacher's samples; KD / GKD: the token divergence to the teacher).", "",
               f"![student losses]({losses})"]
    if attacks:
        md += ["", "## Attacks", "", attack_markdown(attacks, "attack")]
    md += ["", *_diagnose_rows(out), "", *_facts_rows(headline, cards, facts)]
    text = "\n".join(md) + "\n"
    write_text(out / "report.md", text)
    write_text(out / "report.html", to_html(text, out))


_INLINE = re.compile(r"\*\*(.+?)\*\*|`([^`]+)`|\[([^\]]+)\]\(([^)\s]+)\)")


def inline(text: str) -> str:
    """Escaped HTML of one line of report Markdown: **bold**, `code` and [links](target) converted."""
    parts, pos = [], 0
    for m in _INLINE.finditer(text):
        parts.append(html.escape(text[pos:m.start()]))
        bold, code, label, target = m.groups()
        if bold is not None:
            parts.append(f"<strong>{html.escape(bold)}</strong>")
        elif code is not None:
            parts.append(f"<code>{html.escape(code)}</code>")
        else:
            parts.append(f'<a href="{html.escape(target)}">{html.escape(label)}</a>')
        pos = m.end()
    return "".join(parts) + html.escape(text[pos:])


def _image(line: str, base: Path) -> str:
    alt, src = line[2:line.index("]")], line[line.index("(") + 1: line.rindex(")")]
    path = base / src
    if not path.exists():
        return f"<p>(missing plot: {html.escape(src)})</p>"
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" title="{html.escape(src)}" src="data:image/png;base64,{data}">'


def to_html(markdown_text: str, base: Path) -> str:
    """The report's Markdown as one self-contained HTML page: headings, tables, lists, the verdict block
    (> lines), inline bold / code / links, and every image embedded as a data URI."""
    body, block = [], None  # block: the open "table" / "ul" / "verdict"

    def close():
        nonlocal block
        if block:
            body.append({"table": "</table>", "ul": "</ul>", "verdict": "</div>"}[block])
        block = None

    for line in markdown_text.splitlines():
        kind = ("table" if line.startswith("|") else "ul" if line.startswith("- ") else
                "verdict" if line.startswith("> ") else None)
        if kind != block:
            close()
            if kind:
                body.append({"table": "<table>", "ul": "<ul>", "verdict": '<div class="verdict">'}[kind])
                block = kind
                first_row = True
        if kind == "table":
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-"):
                continue
            tag = "th" if first_row else "td"
            first_row = False
            body.append("<tr>" + "".join(f"<{tag}>{inline(c)}</{tag}>" for c in cells) + "</tr>")
        elif kind == "ul":
            body.append(f"<li>{inline(line[2:])}</li>")
        elif kind == "verdict":
            body.append(f"<p>{inline(line[2:])}</p>")
        elif line.startswith("!["):
            body.append(_image(line, base))
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{inline(line.lstrip('#').strip())}</h{level}>")
        elif line.strip():
            body.append(f"<p>{inline(line)}</p>")
    close()
    style = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto;line-height:1.4}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
             "img{max-width:100%;display:block;margin:1em 0}code{background:#f3f3f3;padding:0 3px}"
             ".verdict{border-left:5px solid #c44e52;background:#fbf3f3;padding:.5em 1em;margin:1em 0}"
             ".verdict p{margin:.4em 0}")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>Distillability report</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")
