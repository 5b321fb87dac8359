"""The answer first: what calibration did to each teacher and to the students distilled from it, in plain
sentences generated from the numbers (the report's opening block, headline.json's `verdict`, printed by the CLI)."""

from __future__ import annotations

from .attack import BAR  # students at or below BAR x the control's: protected

UTILITY = 0.9  # ... provided it keeps at least this share of the control's own accuracy


def _ratios(headline: dict, teacher: str) -> dict[str, float]:
    return {m: per[teacher] / per["control"] for m, per in headline["students"].items()
            if teacher in per and per.get("control")}


def _span(values) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.2f}x" if abs(hi - lo) < 0.005 else f"{lo:.2f}-{hi:.2f}x"


def _accs(values) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.3f}" if abs(hi - lo) < 0.0005 else f"{lo:.3f}-{hi:.3f}"


def teacher_sentence(headline: dict, teacher: str) -> str | None:
    """One teacher's verdict: its utility vs the control, what its students reach vs the control's students
    (and which method protected least / lifted least) and vs the student base."""
    t, c = headline["teachers"].get(teacher), headline["teachers"].get("control")
    if t is None or not c:
        return None
    utility = t / c
    ratios = _ratios(headline, teacher)
    if not ratios:
        return (f"The {teacher} teacher keeps {utility:.2f}x the control's accuracy ({t:.3f} vs {c:.3f}); no student "
                "ratio (the control's students scored 0 or were not distilled).")
    accs = [per[teacher] for per in headline["students"].values() if teacher in per]
    worst = max(ratios, key=ratios.get) if teacher != "distillable" else min(ratios, key=ratios.get)
    base = headline.get("student_base")
    vs_base = f" against the student base's {base:.3f}" if base is not None else ""
    if teacher == "distillable":
        word = ("Easier to distill" if min(ratios.values()) >= 1.0 else
                "Not easier to distill" if max(ratios.values()) < 1.0 else "Easier to distill for some methods")
        weakest = f"weakest lift: {worst.upper()} at {ratios[worst]:.2f}x"
    else:
        held = max(ratios.values()) <= BAR and utility >= UTILITY
        word = ("Protected" if held else "Partly protected" if min(ratios.values()) <= BAR else "Not protected")
        weakest = f"least protected: {worst.upper()} at {ratios[worst]:.2f}x"
    return (f"{word}: the {teacher} teacher keeps {utility:.2f}x the control's accuracy ({t:.3f} vs {c:.3f}); "
            f"students distilled from it reach {_span(ratios.values())} the control teacher's students ({weakest}), "
            f"accuracy {_accs(accs)}{vs_base}.")


def shifted_sentence(headline: dict) -> str | None:
    """The calibrated teachers' utility on the shifted split (headline's shifted_split names it), when measured."""
    sh = headline.get("teachers_shifted") or {}
    c = sh.get("control")
    rows = [(t, sh[t]) for t in ("undistillable", "distillable") if t in sh]
    if not rows or c is None:
        return None
    if not c:
        return "On the shifted split the control teacher scores 0, so the teachers' utility there has no ratio."
    parts = [f"the {t} teacher {v / c:.2f}x ({v:.3f} vs {c:.3f})" for t, v in rows]
    split = headline.get("shifted_split", "longer chains than any trained on")
    return f"On the shifted split ({split}): " + ", ".join(parts) + " the control's accuracy."


def verdict(headline: dict, attack_summary: str | None = None) -> list[str]:
    """The verdict block's sentences, the undistillable teacher first."""
    lines = [s for t in ("undistillable", "distillable") if (s := teacher_sentence(headline, t))]
    if (shifted := shifted_sentence(headline)) is not None:
        lines.append(shifted)
    if attack_summary:
        lines.append(attack_summary)
    if lines:
        lines.append(f"(Protected: the students stay at or below {BAR}x the control's while the teacher keeps at least "
                     f"{UTILITY}x the control's accuracy; the control is the same teacher RL-tuned on the task alone, eta = 0.)")
    return lines
