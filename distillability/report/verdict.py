"""The answer first: what calibration did to each teacher and to the students distilled from it, in plain
sentences generated from the numbers (the report's opening block, headline.json's `verdict`, printed by the CLI).

Every sentence follows from the students' gain over their base (docs/method.md §6;
distillability/protection.py): a teacher is called protected only where distilling the control teacher teaches
the student measurably and the protected teacher's students keep at most SHARE_BAR of that gain; where the control
teaches nothing there is nothing to withhold, and the verdict says so. The first sentence names whom the numbers
are about (the student, its size and tokenizer, the budget): they say nothing of other students or budgets."""

from __future__ import annotations

from ..models import model_phrase
from ..protection import MIN_GAIN, SHARE_BAR, UTILITY, Z, measured, more_gain, relate
from .numbers import pm


def gain_cells(headline: dict) -> dict:
    """headline['gains'] when the run measured it; else cells built from the accuracies alone (no SEs)."""
    if headline.get("gains"):
        return headline["gains"]
    base = headline.get("student_base")
    if base is None:
        return {}
    cells = {m: {t: {"status": "ok", "accuracy": a, "accuracy_se": None, "base": base, "base_se": None}
                 for t, a in per.items()} for m, per in headline["students"].items()}
    relate(cells, "control")
    return cells


def whom_sentence(headline: dict) -> str | None:
    """Whom the numbers are about: the student, the budget, the students per cell."""
    facts = headline.get("attacker")
    if not facts:
        return None
    b, n = facts.get("budget", {}), facts.get("students_per_cell", 1)
    budget = (f"distilled on {b['samples']:,} teacher samples of {b['prompts']:,} prompts in {b['steps']} steps (the "
              "1x budget)" if b.get("samples") and b.get("prompts") and b.get("steps") else "distilled at the 1x budget")
    per_cell = (f"{n} students per cell" if n > 1 else "one student per cell (a direction, not a result: its SE is "
                "the binomial one only)")
    return (f"Measured against {model_phrase(facts['student'])}, {budget}, {per_cell}, read on "
            f"{b.get('eval_prompts') or 'the'} held-out prompts. It speaks for this student at this budget only.")


def _below(g: float, se: float | None) -> str:
    err = f" ± {se:.3f}" if se is not None else ""
    return f"end {-g:.3f}{err} below the base" if g < 0 else f"gain only {g:+.3f}{err}"


def control_sentence(cells: dict, base: float, base_se: float | None) -> str | None:
    rows = {m: per["control"] for m, per in cells.items() if measured(per.get("control", {}))}
    if not rows:
        return None
    taught = {m: c for m, c in rows.items() if c.get("reference_teaches")}
    base_text = f"the base's {pm(base, base_se, '.3f')}"
    if len(taught) == len(rows):
        parts = ", ".join(f"{pm(c['gain'], c.get('gain_se'), '+.3f')} ({m.upper()})" for m, c in rows.items())
        return f"Distilling the unprotected (control) teacher teaches this student: its students gain {parts} over {base_text}."
    not_taught = ", ".join(f"its {m.upper()} students {_below(c['gain'], c.get('gain_se'))}" for m, c in rows.items()
                           if m not in taught)
    if not taught:
        return ("Distillation from the unprotected (control) teacher does not teach this student at this budget: "
                f"protection cannot be measured here; {not_taught} ({base_text}).")
    parts = ", ".join(f"{m.upper()} ({pm(c['gain'], c.get('gain_se'), '+.3f')})" for m, c in taught.items())
    return (f"Distilling the unprotected (control) teacher teaches this student by {parts} over {base_text}, not by the "
            f"other methods ({not_taught}): protection is measured only for {', '.join(m.upper() for m in taught)}.")


def _utility(headline: dict, teacher: str) -> tuple[float, float, float] | None:
    t, c = headline["teachers"].get(teacher), headline["teachers"].get("control")
    return None if t is None or not c else (t / c, t, c)


def protected_roles(headline: dict) -> list[str]:
    """The teachers calibrated to be undistillable: `undistillable`, then one per extra proxy (undistillable@LABEL)."""
    return [t for t in headline.get("teachers", {}) if t == "undistillable" or t.startswith("undistillable@")]


def undistillable_sentence(headline: dict, cells: dict, role: str = "undistillable") -> str | None:
    u = _utility(headline, role)
    rows = {m: per[role] for m, per in cells.items() if measured(per.get(role, {})) and measured(per.get("control", {}))}
    if u is None or not rows:
        return None
    utility, t, c = u
    who = "the undistillable teacher" if role == "undistillable" else f"the {role} teacher (its own proxy)"
    keeps = f"{who} keeps {utility:.2f}x the control's accuracy ({t:.3f} vs {c:.3f})"
    shares = {m: x for m, x in rows.items() if x.get("gain_share") is not None}
    if not shares:
        own = ", ".join(f"{m.upper()} {x['gain']:+.3f} (control {cells[m]['control']['gain']:+.3f})" for m, x in rows.items())
        harm = all(x["gain"] < 0 for x in rows.values())
        return (f"No protection to measure: {keeps}, but the control's students gain nothing to withhold. Its students' "
                f"gain over the base: {own}" + (": eta > 0 changes how much distillation harms this student, which is "
                                                "harm, not protection." if harm else "."))
    worst = max(shares, key=lambda m: shares[m]["gain_share"])
    held = [m for m, x in shares.items() if x["gain_share"] <= SHARE_BAR]
    word = ("Not protected" if utility < UTILITY or not held else "Protected" if len(held) == len(shares)
            else "Partly protected")
    text = ", ".join(f"{pm(x['gain_share'], x.get('gain_share_se'), '.2f')} by {m.upper()}"
                     for m, x in shares.items())
    unmeasured = [m.upper() for m in rows if m not in shares]
    tail = f"; not measurable by {', '.join(unmeasured)} (the control teaches nothing there)" if unmeasured else ""
    lost = f" (below the {UTILITY}x it must keep)" if utility < UTILITY else ""
    return (f"{word}: {keeps}{lost}; its students keep {text} of the control's students' gain (least protected: "
            f"{worst.upper()} at {shares[worst]['gain_share']:.2f}){tail}.")


def distillable_sentence(headline: dict, cells: dict) -> str | None:
    u = _utility(headline, "distillable")
    rows = {m: (per["distillable"], per["control"]) for m, per in cells.items()
            if measured(per.get("distillable", {})) and measured(per.get("control", {}))}
    if u is None or not rows:
        return None
    utility, t, c = u
    easier = [m for m, (d, ref) in rows.items() if more_gain(d["accuracy"], d.get("accuracy_se"), ref["accuracy"],
                                                              ref.get("accuracy_se"))]
    word = ("Easier to distill" if len(easier) == len(rows) else
            f"Easier to distill by {', '.join(m.upper() for m in easier)} only" if easier else
            "Not measurably easier to distill")
    text = ", ".join(f"{d['gain']:+.3f} vs the control's {ref['gain']:+.3f} ({m.upper()})" for m, (d, ref) in rows.items())
    return (f"{word}: the distillable teacher keeps {utility:.2f}x the control's accuracy ({t:.3f} vs {c:.3f}); its "
            f"students gain {text} over the base.")


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


DEFINITION = (f"(Gain: the students' accuracy minus the student base's, ± its SE from the spread of the students in a "
              f"cell and the base's binomial SE; gain share: a teacher's students' gain / the control's. Protected: the "
              f"control's students gain >= {MIN_GAIN} and >= {Z:g} SE, the undistillable teacher's students keep <= "
              f"{SHARE_BAR} of that gain, and the teacher keeps >= {UTILITY}x the control's accuracy. Easier to distill: "
              f"the distillable teacher's students gain more than the control's by >= {Z:g} SE. The control is the same "
              "teacher RL-tuned on the task alone, eta = 0.)")


def verdict(headline: dict, attack_summary: str | None = None) -> list[str]:
    """The verdict block's sentences: whom it measured, whether the control teaches, the undistillable teacher,
    the distillable one, the shifted split, the attack battery, the definitions."""
    cells = gain_cells(headline)
    base = headline.get("student_base")
    lines = [whom_sentence(headline)]
    if cells and base is not None:
        lines += [control_sentence(cells, base, headline.get("student_base_se")),
                  *(undistillable_sentence(headline, cells, r) for r in protected_roles(headline) or ["undistillable"]),
                  distillable_sentence(headline, cells)]
    lines += [shifted_sentence(headline), attack_summary]
    lines = [x for x in lines if x]
    if lines:
        lines.append(DEFINITION)
    return lines
