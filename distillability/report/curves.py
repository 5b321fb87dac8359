"""Training curves of a pipeline run, read from its stages' log.jsonl: the calibrations (task reward, r_cal and
the KL to the reference per step, one line per teacher) and the students' distillation losses (one panel per
method, one line per teacher)."""

from __future__ import annotations

import json
from pathlib import Path

from ..io import save_figure
from .attack import COLORS


def _log(path: Path) -> list[dict]:
    try:
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    except (OSError, ValueError):
        return []


def _figure(ncols: int, width: float = 4.2, height: float = 3.0):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return plt, fig, axes[0]


def _save(plt, fig, out: Path, name: str) -> str:
    fig.tight_layout()
    save_figure(fig, out / name, dpi=100)
    return name


def calibration_curves(out: Path) -> str | None:
    """calibration_curves.png from out/calibrate_<teacher>/log.jsonl; None when no calibration logged."""
    logs = {d.name.removeprefix("calibrate_"): rows for d in sorted(out.glob("calibrate_*"))
            if (rows := _log(d / "log.jsonl"))}
    if not logs:
        return None
    metrics = [("task_reward", "task reward (mean)"), ("r_cal", "r_cal (mean, nats/char)"),
               ("kl_ref", "KL to the reference (k3)")]
    plt, fig, axes = _figure(len(metrics))
    for ax, (key, title) in zip(axes, metrics, strict=True):
        for teacher, rows in logs.items():
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=teacher, color=COLORS.get(teacher), linewidth=1.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("RL step")
    axes[0].legend(fontsize=8)
    return _save(plt, fig, out, "calibration_curves.png")


def student_losses(out: Path, methods: list[str]) -> str | None:
    """student_losses.png from out/distill_<method>_<teacher>/log.jsonl; None when no distillation logged."""
    panels = {}
    for m in methods:
        per = {d.name.removeprefix(f"distill_{m}_"): rows for d in sorted(out.glob(f"distill_{m}_*"))
               if (rows := _log(d / "log.jsonl"))}
        if per:
            panels[m] = per
    if not panels:
        return None
    plt, fig, axes = _figure(len(panels))
    for ax, (m, per) in zip(axes, panels.items(), strict=True):
        for teacher, rows in per.items():
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=teacher, color=COLORS.get(teacher),
                    linewidth=1.0)
        ax.set_title(f"{m.upper()} students: training loss", fontsize=10)
        ax.set_xlabel("optimizer step")
    axes[0].legend(fontsize=8)
    return _save(plt, fig, out, "student_losses.png")
