"""The utility-protection trade of the real-teacher knob runs in one figure: for each run of
configs/smollm2-tinyworld.yaml, the undistillable teacher's greedy accuracy as a share of the control's (x, with
its standard error) against its students' accuracy as a share of the control's students' (y: the mean of the SFT,
KD and GKD cells at 1x, 3 students each, with the cells' range), the targets' corner shaded.

    python bench/plot_real_frontier.py [--out docs/real_teacher_frontier.png]

Reads the committed bench/results/real_teacher_runs.json (each run as bench/real_teacher_table.py wrote it); loads no
model.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from distillability.io import atomic_path

HERE = Path(__file__).resolve().parent
# (run in results/real_teacher_runs.json, RL steps per teacher, eta_undistillable, how the run computed): every
# 600-step-SFT run of the config
RUNS = (
    ("eta1_60steps_a", 60, 1.0, "bf16"),
    ("eta1_60steps_b", 60, 1.0, "bf16"),
    ("eta1_80steps", 80, 1.0, "bf16"),
    ("eta0.75_80steps", 80, 0.75, "bf16"),
    ("eta0.85_80steps", 80, 0.85, "float32"),
)
TEACHER_TARGET, STUDENT_TARGET = 0.9, 0.6


def points(results: Path = HERE / "results") -> list[dict]:
    """One point per recorded run: the undistillable teacher's ratio to the control and its SE (delta method on the
    two binomial SEs), its students' mean ratio over the 1x cells and their min and max."""
    out = []
    runs = json.loads((results / "real_teacher_runs.json").read_text())["runs"]
    for name, steps, eta, precision in RUNS:
        if name not in runs:
            continue
        d = runs[name]
        u, c = d["teachers"]["undistillable"], d["teachers"]["control"]
        ratio = u["ratio"]  # real_teacher_table.py: accuracy / the control's
        se = ratio * math.sqrt((u["se"] / u["accuracy"]) ** 2 + (c["se"] / c["accuracy"]) ** 2)
        cells = [cell["undistillable"]["ratio"] for cell in d["students"].values()]
        out.append({"file": name, "steps": steps, "eta": eta, "precision": precision, "teacher": ratio,
                    "teacher_se": se, "students": sum(cells) / len(cells), "low": min(cells), "high": max(cells),
                    "meets": ratio >= TEACHER_TARGET and max(cells) <= STUDENT_TARGET})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE.parent / "docs" / "real_teacher_frontier.png"))
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = points()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    ax.fill_between([TEACHER_TARGET, 1.0], 0.0, STUDENT_TARGET, color="tab:green", alpha=0.12,
                    label="targets: teacher >= 0.9x, every cell <= 0.6x")
    for p in pts:
        color = "tab:red" if p["steps"] == 80 else "tab:gray"
        marker = "s" if p["precision"] == "float32" else "o"
        ax.errorbar(p["teacher"], p["students"], xerr=p["teacher_se"],
                    yerr=[[p["students"] - p["low"]], [p["high"] - p["students"]]], fmt=marker, color=color,
                    capsize=3)
        ax.annotate(f"eta {p['eta']:g}, {p['steps']} steps" + (", fp32" if p["precision"] == "float32" else ""),
                    (p["teacher"], p["students"]), textcoords="offset points",
                    xytext=(6, -12) if p["precision"] == "float32" else (6, 4), fontsize=8)
    ax.set_xlim(0.84, 1.0)
    ax.set_ylim(0.2, 0.8)
    ax.set_xlabel("undistillable teacher's accuracy / control's (± SE, 300 prompts)")
    ax.set_ylabel("its students' accuracy / control's students'\n(mean of SFT, KD, GKD at 1x; bar: min-max cell)")
    ax.set_title("SmolLM2-135M teacher, tiny world's task: utility vs protection per run", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    with atomic_path(args.out) as tmp:
        fig.savefig(tmp, dpi=120)
    print(f"wrote {args.out} ({len(pts)} runs)")


if __name__ == "__main__":
    main()
