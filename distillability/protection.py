"""Protection statistics, in one place for recipes, report and benchmarks (docs/method.md §6, "Gain over base").

A teacher protects only what its students would otherwise have gained. For each cell (a teacher, a method or an
attacker, `n` students distilled with different seeds):

- the cell's accuracy is the mean of its students' greedy accuracies; its standard error is the larger of the
  spread-based SE (std of the students / sqrt(n)) and the binomial SE of the pooled graded answers (n x prompts):
  with one student the spread is unknown and only the binomial part is claimed;
- the **gain** is accuracy - the student base's accuracy, with SE sqrt(SE_cell^2 + SE_base^2) (the base is one
  model read on the same prompts: binomial);
- the **gain share** of a teacher is its students' gain / the reference (control) teacher's students' gain, with
  its delta-method SE (the base is shared by both gains);
- the reference **teaches** when its gain is >= MIN_GAIN and >= Z standard errors; a gain share is only a number
  where it does;
- **protected** (per method or budget): the reference teaches and the teacher's students keep <= SHARE_BAR of its
  gain, while the teacher keeps >= UTILITY x the reference's own accuracy;
- **easier to distill**: the teacher's students gain more than the reference's by >= Z SE of the difference.
"""

from __future__ import annotations

import math

TEACHERS = ("original", "control", "distillable", "undistillable")  # the teacher roles, in report order
CALIBRATED = TEACHERS[1:]
SHARE_BAR = 0.5   # protected: the students keep at most this share of the control's gain
UTILITY = 0.9     # ... while the teacher keeps at least this share of the control's own accuracy
MIN_GAIN = 0.05   # the reference teaches: a gain at least this large ...
Z = 2.0           # ... and at least Z standard errors


def binomial_se(accuracy: float, n: int) -> float:
    """sqrt(p (1 - p) / n): the SE of an accuracy read on n graded answers (p clipped to [1/n, 1 - 1/n], so a
    perfect or null score still carries the uncertainty of a finite sample)."""
    if not n:
        return float("nan")
    p = min(max(accuracy, 1.0 / n), 1 - 1.0 / n) if n > 1 else accuracy
    return math.sqrt(p * (1 - p) / n)


def cell_stats(accuracies: list[float], prompts: int | None) -> dict:
    """Mean, spread and SE of a cell's students (accuracies read on `prompts` held-out prompts each)."""
    n = len(accuracies)
    mean = sum(accuracies) / n
    std = math.sqrt(sum((a - mean) ** 2 for a in accuracies) / (n - 1)) if n > 1 else 0.0
    binom = binomial_se(mean, prompts * n) if prompts else None
    spread = std / math.sqrt(n) if n > 1 else None
    parts = [x for x in (binom, spread) if x is not None]
    return {"accuracy": mean, "accuracy_std": std, "accuracies": list(accuracies), "n_students": n,
            "accuracy_se": max(parts) if parts else None,
            "se_from": "spread" if spread is not None and (binom is None or spread >= binom) else
                       "binomial" if binom is not None else None}


def gain(accuracy: float, accuracy_se: float | None, base: float, base_se: float | None) -> tuple[float, float | None]:
    """(accuracy - base, its SE)."""
    if accuracy_se is None or base_se is None:
        return accuracy - base, None
    return accuracy - base, math.hypot(accuracy_se, base_se)


def teaches(g: float, se: float | None) -> bool:
    """The reference's students gain measurably: >= MIN_GAIN and >= Z SE (no SE: the size alone)."""
    return g >= MIN_GAIN and (se is None or g >= Z * se)


def gain_share(acc: float, acc_se: float | None, ref: float, ref_se: float | None, base: float,
               base_se: float | None) -> tuple[float | None, float | None]:
    """(the teacher's students' gain / the reference's, its delta-method SE); (None, None) where the reference does
    not teach (a share of nothing measurable is not a number). With share s = (a - b) / (r - b):
    Var s = (SE_a^2 + s^2 SE_r^2 + (s - 1)^2 SE_b^2) / (r - b)^2."""
    g_ref, g_ref_se = gain(ref, ref_se, base, base_se)
    if not teaches(g_ref, g_ref_se):
        return None, None
    s = (acc - base) / g_ref
    if acc_se is None or ref_se is None or base_se is None:
        return s, None
    return s, math.sqrt(acc_se ** 2 + s ** 2 * ref_se ** 2 + (s - 1) ** 2 * base_se ** 2) / g_ref


def more_gain(acc: float, acc_se: float | None, ref: float, ref_se: float | None) -> bool:
    """The teacher's students gain more than the reference's by >= Z SE of the difference (the base cancels)."""
    diff = acc - ref
    if acc_se is None or ref_se is None:
        return diff >= MIN_GAIN
    return diff > 0 and diff >= Z * math.hypot(acc_se, ref_se)


def relate_cell(cell: dict, ref: dict, base_se: float | None) -> None:
    """Fill a cell's ratio, gain SE, gain share (with SE) and `reference_teaches` against its reference cell (both
    with accuracy, accuracy_se and base)."""
    cell["ratio"] = cell["accuracy"] / ref["accuracy"] if ref["accuracy"] > 0 else None
    cell["gain"], cell["gain_se"] = gain(cell["accuracy"], cell.get("accuracy_se"), cell["base"], base_se)
    g_ref, g_ref_se = gain(ref["accuracy"], ref.get("accuracy_se"), ref["base"], base_se)
    cell["reference_gain"], cell["reference_gain_se"] = g_ref, g_ref_se
    cell["reference_teaches"] = teaches(g_ref, g_ref_se)
    cell["gain_share"], cell["gain_share_se"] = gain_share(cell["accuracy"], cell.get("accuracy_se"), ref["accuracy"],
                                                           ref.get("accuracy_se"), cell["base"], base_se)
    if cell is ref and cell["gain_share"] is not None:
        cell["gain_share_se"] = 0.0  # the reference against itself: 1 by definition


def measured(cell: dict) -> bool:
    """A cell with an accuracy to read: every repeat finished, or some did (partial)."""
    return cell.get("status") in ("ok", "partial")


def relate(cells: dict, reference: str) -> None:
    """Every attacker row: each measured cell against the reference teacher's cell of the same attacker."""
    for row in cells.values():
        ref = row.get(reference, {})
        for cell in row.values():
            if measured(cell) and measured(ref):
                relate_cell(cell, ref, ref.get("base_se"))


def _field(a, key: str):
    """A field of an attacker, given as an Attacker or as its dict (attack.json's battery)."""
    return a.get(key) if isinstance(a, dict) else getattr(a, key)


def _plain(a) -> bool:
    """An attacker with no filter and no change of sampling: a point of a budget curve."""
    return not _field(a, "keep_correct_only") and _field(a, "best_of") == 1 and _field(a, "sample_temperature") is None


def curve_key(method: str, student: str = "default") -> str:
    """A budget curve's name: the method for the default student ('sft'), 'method:student' for another."""
    return method if student == "default" else f"{method}:{student}"


def curve_label(key: str) -> str:
    """'sft' -> 'SFT', 'sft:smollm2' -> 'SFT (smollm2)'."""
    method, _, student = key.partition(":")
    return method.upper() + (f" ({student})" if student else "")


def budget_curves(battery) -> dict[str, list]:
    """The battery's budget curves: its plain attackers (no filter, no sampling change) grouped by method and
    student, each sorted by budget. The default student's curves are every plain attacker at the base attacker's
    learning rate and batch; another student's curve is kept where it has two budgets or more (one point stays a
    variant of the battery, e.g. the full battery's unseen-student attacker). Attackers are Attacker objects or
    their dicts (attack.json's battery)."""
    groups: dict[str, list] = {}
    for a in battery:
        student = _field(a, "student")
        if _plain(a) and (student != "default" or (_field(a, "learning_rate") is None
                                                   and _field(a, "per_device_train_batch_size") is None)):
            groups.setdefault(curve_key(_field(a, "method"), student), []).append(a)
    return {k: sorted(v, key=lambda a: _field(a, "budget")) for k, v in groups.items()
            if ":" not in k or len({_field(a, "budget") for a in v}) >= 2}


def curve_of(battery) -> dict[str, str]:
    """Attacker name -> the budget curve it is a point of (attackers on no curve are absent)."""
    return {_field(a, "name"): k for k, v in budget_curves(battery).items() for a in v}


def _budget_points(cells: dict, attackers: list, teacher: str) -> list[tuple[float, dict]]:
    """A curve's attackers (budget_curves) -> (budget, the teacher's cell) where the cell was measured."""
    pts = [(a.budget, cells.get(a.name, {}).get(teacher, {})) for a in attackers]
    return [(b, c) for b, c in pts if measured(c)]


def protected_budget(cells: dict, battery, teacher: str, bar: float = SHARE_BAR) -> dict:
    """Per budget curve (budget_curves: a method, or method:student): the gain share at each budget (None where
    the reference teaches nothing), the reference's gain there, and the largest budget up to which every measurable budget keeps the
    share <= bar (None: not even the smallest measurable one; `measurable` False: the reference taught at none)."""
    out = {}
    for method, attackers in budget_curves(battery).items():  # a curve: a method, or method:student
        pts = _budget_points(cells, attackers, teacher)
        if not pts:
            continue
        shares = {f"{b:g}x": c.get("gain_share") for b, c in pts}
        held, broken = None, False
        for b, c in pts:
            if c.get("gain_share") is None:
                continue
            if broken or c["gain_share"] > bar:
                broken = True
                continue
            held = b
        out[method] = {"largest_budget_protected": held, "gain_shares": shares,
                       "gain_share_se": {f"{b:g}x": c.get("gain_share_se") for b, c in pts},
                       "reference_gains": {f"{b:g}x": c.get("reference_gain") for b, c in pts},
                       "ratios": {f"{b:g}x": c.get("ratio") for b, c in pts},
                       "measurable": any(s is not None for s in shares.values())}
    return out


def _budget_curve(cells: dict, attackers: list, teacher: str) -> list[tuple[float, float]]:
    return [(b, c["accuracy"]) for b, c in _budget_points(cells, attackers, teacher)]


def cost_multiplier(cells: dict, battery, teacher: str, reference: str) -> dict:
    """Protection as what it costs the attacker, per method: at each budget b of the teacher's curve, b / b', where
    b' is the budget at which the reference teacher's students first reach the accuracy the teacher's students
    reached at b (linear in log budget between the reference's measured budgets), per budget curve. 2.5 reads: from this teacher an
    attacker pays 2.5 times the data for what the reference teaches. Outside the reference's measured range only a
    bound is known: `at_least` b / (its smallest budget) when the reference's smallest budget already teaches as
    much, `at_most` b / (its largest budget) when the reference never teaches as much."""
    out: dict = {}
    for method, attackers in budget_curves(battery).items():
        ref, own = _budget_curve(cells, attackers, reference), _budget_curve(cells, attackers, teacher)
        if not ref or not own:
            continue
        rows = {}
        for b, y in own:
            if y <= ref[0][1]:
                rows[f"{b:g}x"] = {"multiplier": b / ref[0][0], "bound": "at_least", "accuracy": y}
                continue
            found = None
            for (b0, y0), (b1, y1) in zip(ref, ref[1:]):
                if y0 < y <= y1:
                    found = math.exp(math.log(b0) + (y - y0) / (y1 - y0) * (math.log(b1) - math.log(b0)))
                    break
            rows[f"{b:g}x"] = ({"multiplier": b / found, "bound": None, "accuracy": y} if found is not None
                               else {"multiplier": b / ref[-1][0], "bound": "at_most", "accuracy": y})
        out[method] = rows
    return out


def strongest_attack(cells: dict, battery, teacher: str, reference: str) -> dict:
    """Per budget: the attacker (any method, filter or student) whose students reached the highest accuracy against
    the teacher, the same against the reference, their ratio and the gain share of the two bests (the best
    attacker's students against the reference's best, over the same base)."""
    out = {}
    for budget in sorted({a.budget for a in battery}):
        best = {}
        for who in (teacher, reference):
            scored = [(cells.get(a.name, {}).get(who, {}), a.name) for a in battery if a.budget == budget]
            scored = [(c["accuracy"], name, c) for c, name in scored if measured(c)]
            best[who] = max(scored, key=lambda s: (s[0], s[1])) if scored else None
        if best[teacher] is None or best[reference] is None:
            continue
        (acc, name, cell), (ref_acc, ref_name, ref_cell) = best[teacher], best[reference]
        if "base" in ref_cell and math.isclose(cell.get("base", math.nan), ref_cell["base"]):  # one student base
            share, share_se = gain_share(acc, cell.get("accuracy_se"), ref_acc, ref_cell.get("accuracy_se"),
                                         ref_cell["base"], ref_cell.get("base_se"))
        elif "base" in cell and "base" in ref_cell and teaches(ref_acc - ref_cell["base"], ref_cell.get("gain_se")):
            # two attackers, possibly two students: each gain over its own base (no shared-base SE claimed)
            share, share_se = (acc - cell["base"]) / (ref_acc - ref_cell["base"]), None
        else:
            share, share_se = None, None
        out[f"{budget:g}x"] = {"attacker": name, "accuracy": acc, "reference_attacker": ref_name,
                               "reference_accuracy": ref_acc, "ratio": acc / ref_acc if ref_acc > 0 else None,
                               "gain_share": share, "gain_share_se": share_se}
    return out
