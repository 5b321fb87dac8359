"""Where the knob's protection stops (issue #28), as two plots in one figure, from committed results only:

    .venv/bin/python bench/plot_protection.py [--out docs/protection_vs_budget.png]

Left: the undistillable teacher's SFT students as a ratio of the control teacher's, against the attacker's
budget (1x / 4x / 10x its steps and distinct prompts), for every design measured: the shipped world over seeds
0-2 (`results/attack_seeds.json`: mean, min-max band) and the knob-v2 probes of seed 0
(`results/knob_v2/knob_v2.json`); the 0.6 bar of the issue's target and 1.0 (no protection).
Right: why 10x cannot be held in this world (`results/probe_styles/capacity_probe.json`): the student-sized model
after the 10x attacker's step count on 1,400 reference answers of one style, per style; the control teacher's
10x SFT students beside them. An accurate teacher can only choose among such styles.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from distillability.io import atomic_path

HERE = Path(__file__).resolve().parent
BUDGETS = (1, 4, 10)
LABELS = {"adv": "adversarial proxy", "trap-adv-disjoint": "adversarial proxy + answer-only mode, disjoint student base",
          "trap-adv-disjoint-short": "the same, calibrated on 2-3-term chains",
          "trap-adv-disjoint-short-seen": "the same, proxy trained on the teacher's mix (not blind)"}


def _ratios(cells: dict, teacher: str = "undistillable", method: str = "sft") -> list[float | None]:
    out = []
    for b in BUDGETS:
        cell = cells.get(f"{method}@{b}x", {}).get(teacher, {})
        out.append(cell.get("ratio") if cell.get("status", "ok") == "ok" else None)
    return out


def _shipped_seeds() -> dict:
    return json.loads((HERE / "results/attack_seeds.json").read_text())["seeds"]


def curves(seeds: dict | None = None) -> dict[str, dict]:
    """name -> {"mean": [...], "low": [...], "high": [...]} of the undistillable/control SFT ratio per budget."""
    out: dict[str, dict] = {}
    seeds = seeds if seeds is not None else _shipped_seeds()
    per_seed = [_ratios(s["cells"]) for s in seeds.values()]
    cols = list(zip(*per_seed))
    out[f"shipped world, frozen proxy (seeds {', '.join(seeds)})"] = {
        "mean": [sum(c) / len(c) for c in cols], "low": [min(c) for c in cols], "high": [max(c) for c in cols]}
    v2 = json.loads((HERE / "results/knob_v2/knob_v2.json").read_text())
    for variant, by_seed in v2.items():
        for seed, res in by_seed.items():
            r = _ratios(res["cells"])
            out[f"{LABELS.get(variant, variant)} (seed {seed})"] = {"mean": r, "low": r, "high": r}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE.parent / "docs/protection_vs_budget.png"))
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6), gridspec_kw={"width_ratios": [1.25, 1]})
    seeds = _shipped_seeds()
    for name, c in curves(seeds).items():
        pts = [(b, m, lo, hi) for b, m, lo, hi in zip(BUDGETS, c["mean"], c["low"], c["high"]) if m is not None]
        xs = [p[0] for p in pts]
        (line,) = left.plot(xs, [p[1] for p in pts], marker="o", label=name)
        if any(p[2] != p[3] for p in pts):
            left.fill_between(xs, [p[2] for p in pts], [p[3] for p in pts], color=line.get_color(), alpha=0.15)
    left.axhline(0.6, color="crimson", ls="--", lw=1, label="target: <= 0.6x at 4x and 10x")
    left.axhline(1.0, color="grey", ls=":", lw=1, label="no protection (1.0x)")
    left.set_xscale("log")
    left.set_xticks(BUDGETS, [f"{b}x" for b in BUDGETS])
    left.set_xlabel("attacker budget (optimizer steps and distinct prompts, x the 1x attacker's)")
    left.set_ylabel("undistillable teacher's SFT students / control's")
    left.set_title("The protection fades with budget, and needs a blind proxy")
    left.legend(fontsize=7, loc="upper left")
    left.set_ylim(0, 1.4)

    probe = json.loads((HERE / "results/probe_styles/capacity_probe.json").read_text())["student"]
    styles = ["worked", "running", "direct"]
    width = 0.38
    for i, (split, accs) in enumerate(probe.items()):
        xs = [j + (i - 0.5) * width for j in range(len(styles))]
        bars = right.bar(xs, [accs[s] for s in styles], width, label=f"chains of {split}")
        right.bar_label(bars, fmt="%.2f", fontsize=8)
    ctrl10 = [s["cells"]["sft@10x"]["control"]["accuracy"] for s in seeds.values()]
    right.axhline(sum(ctrl10) / len(ctrl10), color="black", ls="--", lw=1,
                  label=f"control teacher's 10x SFT students (shipped world, mean {sum(ctrl10) / len(ctrl10):.2f})")
    right.set_xticks(range(len(styles)), ["worked steps", "running totals", "answer only"])
    right.set_ylim(0, 1.4)
    right.set_ylabel("student-sized model, held-out accuracy")
    right.set_title("With 10x data a student learns every correct style")
    right.legend(fontsize=7.5, loc="upper center")
    fig.tight_layout()
    with atomic_path(args.out) as tmp:
        fig.savefig(tmp, dpi=110)
    print(args.out)


if __name__ == "__main__":
    main()
