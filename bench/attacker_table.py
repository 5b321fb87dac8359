"""The knob against pretrained attackers (configs/smollm2-attacker.yaml), tabulated from whatever has run: every
attack cell's students (their distill cards), read as the attack stage reads them (attack.summarise, the gain over
the student's own base, the share of the control's gain with its SE), the teachers' accuracies (the evaluate stage's
300 test prompts where it has run, else the calibration cards' 100), the targets of the claim, and a plot of the
gain vs budget per attacker student and teacher. Usable while the run goes on: a cell counts once its students are
done (a partial cell says how many of its students are done).

    .venv/bin/python bench/attacker_table.py [--run runs/smollm2-attacker] [--out bench/results/smollm2_attacker]

Writes <out>.json, <out>.md and <out>.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from distillability.protection import SHARE_BAR, budget_curves, curve_label, protected_budget, relate  # noqa: E402
from distillability.recipes import attack  # noqa: E402
from distillability.recipes.pipeline import load_pipeline_config  # noqa: E402

BARS = {"1x": 0.5, "4x": 0.7}  # the gain-share bars for attacker (a) at each budget


def _met(value: float, bar: float, at_most: bool = False) -> str:
    ok = value <= bar if at_most else value >= bar
    return "met" if ok else f"missed by {abs(value - bar):.3f}"


def checks(res: dict) -> list[str]:
    """The claim's targets on what has run, each with its value and met / missed by how much."""
    out, cells, acc = [], res["cells"], res["teacher_accuracy"]
    for name in res["battery"]:
        c = cells.get(name, {}).get("control")
        if name.endswith("@1x") and c:
            out.append(f"control gain >= +0.15 at 1x, {name}: {c['gain']:+.3f} ± {c.get('gain_se') or 0:.3f} "
                       f"({_met(c['gain'], 0.15)})")
    ctrl = acc.get("control", {}).get("accuracy")
    for t in res["teachers"]:
        if t.startswith("undistillable") and ctrl and acc.get(t, {}).get("accuracy") is not None:
            r = acc[t]["accuracy"] / ctrl
            out.append(f"{t} teacher >= 0.9x the control: {r:.3f}x ({_met(r, 0.9)}; {acc[t]['from']})")
    for key, names in res["curves"].items():
        for name in names:
            bar = BARS.get(name.rsplit("@", 1)[-1]) if key.endswith(":smollm2") else None
            for t in res["teachers"]:
                c = cells.get(name, {}).get(t, {})
                if t.startswith("undistillable") and c.get("gain_share") is not None:
                    tail = f" (<= {bar}: {_met(c['gain_share'], bar, at_most=True)})" if bar is not None else ""
                    out.append(f"gain share, {name}, {t}: {c['gain_share']:.2f} ± {c.get('gain_share_se') or 0:.2f}{tail}")
            d, c0 = cells.get(name, {}).get("distillable"), cells.get(name, {}).get("control")
            if d and c0 and c0["gain"] > 0:
                r, se = d["gain"] / c0["gain"], d.get("gain_share_se") or 0.0
                out.append(f"distillable gain >= 1.1x the control's, {name}: {r:.2f}x ± {se:.2f} ({_met(r, 1.1)}"
                           f"{'' if r - se > 1 else '; within 1 SE of the control'})")
    return out


def _design(card: dict) -> str:
    """What else than eta sets a calibration apart (the adaptive proxy's settings, steps, rate): one eta sweep
    varies eta only."""
    adv = {k: v for k, v in (card.get("adversary") or {}).items() if k != "responses_learned"}
    return json.dumps({"adversary": adv, "steps": card.get("steps"), "learning_rate": card.get("learning_rate"),
                       "beta": card.get("beta")}, sort_keys=True)


def teacher_accuracies(run: Path) -> dict:
    """Per teacher role: (accuracy, prompts, where from)."""
    out = {}
    for card in sorted(run.glob("calibrate_*/calibration_card.json")):
        role = card.parent.name.removeprefix("calibrate_")
        c = json.loads(card.read_text())
        ccfg = card.parent / "config.yaml"
        n = yaml.safe_load(ccfg.read_text()).get("eval_prompts") if ccfg.exists() else None
        out[role] = {"accuracy": c.get("after_accuracy"), "prompts": n, "from": "calibration card", "eta": c.get("eta"),
                     "D_per_char_to_proxy": c.get("after_D_per_char"), "proxy": c.get("proxy"),
                     "design": _design(c)}
    for ev in sorted(run.glob("eval_from*/teacher_*/eval.json")):  # the validation slice (evaluate.eval_offset)
        role = ev.parent.name.removeprefix("teacher_")
        e = json.loads(ev.read_text())
        if role in out and "_shifted" not in role:
            first = int(ev.parent.parent.name.removeprefix("eval_from"))
            n = e.get("num_prompts", e.get("eval_prompts"))
            out[role]["validation"] = {"accuracy": e.get("greedy_accuracy"), "prompts": n,
                                       "slice": f"{first}-{first + n - 1}" if n else str(first)}
    for ev in sorted(run.glob("eval/teacher_*/eval.json")):
        role = ev.parent.name.removeprefix("teacher_")
        if "_shifted" in role:
            continue
        e = json.loads(ev.read_text())
        out[role] = {**out.get(role, {}), "accuracy": e.get("greedy_accuracy"),
                     "prompts": e.get("num_prompts", e.get("eval_prompts")), "from": "evaluate stage (test prompts)"}
    return out


def eta_choice(acc: dict, bar: float = 0.9) -> list[dict]:
    """The eta sweeps: undistillable teachers calibrated against one proxy at several etas; per sweep the rule
    fixed before the run: the largest eta whose teacher keeps >= `bar` x the control's accuracy on the validation
    slice (never the test prompts the students are reported on)."""
    ctrl = acc.get("control", {}).get("validation", {}).get("accuracy")
    by_proxy: dict = {}
    for t, v in acc.items():
        if t.startswith("undistillable") and v.get("eta") is not None:
            by_proxy.setdefault((v.get("proxy"), v.get("design")), []).append(t)
    out = []
    for (proxy, _), roles in by_proxy.items():
        if len(roles) < 2:
            continue
        rows = sorted(({"teacher": t, "eta": acc[t]["eta"], "validation": acc[t].get("validation", {}).get("accuracy")}
                       for t in roles), key=lambda r: r["eta"])
        for r in rows:
            r["ratio"] = r["validation"] / ctrl if ctrl and r["validation"] is not None else None
        keep = [r for r in rows if r["ratio"] is not None and r["ratio"] >= bar - 1e-9]  # 0.72 / 0.80 is 0.9
        out.append({"proxy": proxy, "rows": rows, "bar": bar, "chosen": keep[-1]["teacher"] if keep else None,
                    "complete": all(r["ratio"] is not None for r in rows)})
    return out


def collect(run: Path, config: Path) -> dict:
    """Every cell on disk of the battery in `config` (the shipped pipeline config): the attack stage's cells and,
    for the world's student at 1x, the distill stage's; teachers in the config's role order (a run with more extra
    proxies than the config lists adds them after)."""
    pcfg = load_pipeline_config(str(config), [])
    cfg = pcfg.attack
    on_disk = {p.name for p in (run / "attack" / "cells").glob("*/*") if p.is_dir()}
    on_disk |= {p.name.removeprefix("calibrate_") for p in run.glob("calibrate_*") if p.is_dir()}
    order = ["control", *(t for t in pcfg.roles() if t not in ("original", "control", "distillable")), "distillable"]
    teachers = [t for t in order if t in on_disk] + sorted(on_disk - set(order))
    cells: dict = {}
    for a in cfg.battery:
        want = a.repeats or max(cfg.repeats, pcfg.students_per_cell)  # as the pipeline runs the attack stage
        for t in teachers:
            cards = []
            for r in range(want):  # a repeat run by the attack stage, or read from the pipeline's distill stage
                card = run / "attack" / "cells" / a.name / t / f"r{r}"
                if a.is_budget and a.budget == 1.0 and a.student == "default":
                    card = run / (f"distill_{a.method}_{t}" + (f"_r{r}" if r else ""))
                if (card / "distill_card.json").exists():
                    cards.append(json.loads((card / "distill_card.json").read_text()))
            if cards:
                cells.setdefault(a.name, {})[t] = {**attack.summarise(cards), "complete": len(cards) == want,
                                                   "wanted": want}
    relate(cells, "control")
    prot = {t: protected_budget(cells, cfg.battery, t) for t in teachers if t != "control"}
    students = {}
    for name in cfg.prime.students:
        card = run / "attack" / "primed" / name / "distill_card.json"
        if card.exists():
            c = json.loads(card.read_text())
            students[name] = {"model": cfg.students[name], "accuracy_raw": c.get("student_accuracy_before"),
                              "accuracy_primed": c.get("student_accuracy")}
    acc = teacher_accuracies(run)
    return {"run": str(run), "teachers": teachers, "teacher_accuracy": acc, "eta_sweeps": eta_choice(acc),
            "battery": [a.name for a in cfg.battery],
            "curves": {k: [a.name for a in v] for k, v in budget_curves(cfg.battery).items()},
            "cells": cells, "protection": prot, "primed_students": students, "profile_minutes": profile(run)}


def profile(run: Path) -> dict:
    """Where the time went, in minutes, from every finished stage's card (wall_seconds): the teacher's SFT, each
    calibration, the distill stage, the priming, each attacker's cells (all teachers and repeats), evaluations."""
    groups: dict[str, float] = {}
    for card in run.rglob("*.json"):
        if card.name not in ("distill_card.json", "calibration_card.json", "eval.json", "diagnose.json"):
            continue
        try:
            wall = json.loads(card.read_text()).get("wall_seconds")
        except (OSError, ValueError):
            continue
        if not wall:
            continue
        parts = card.relative_to(run).parts
        if parts[0] == "attack" and parts[1] == "cells":
            key = f"attack {parts[2]}"
        elif parts[0] == "attack":
            key = f"attack priming {parts[2]}"
        elif parts[0].startswith("distill_"):
            key = "distill stage (the world's student)"
        elif parts[0] == "eval":
            key = "evaluate stage"
        else:
            key = parts[0]
        groups[key] = groups.get(key, 0.0) + wall / 60
    return dict(sorted(groups.items(), key=lambda kv: -kv[1]))


def _pm(x, se, spec=".3f") -> str:
    if x is None:
        return "-"
    return f"{x:{spec}}" + (f" ± {se:{spec.lstrip('+')}}" if se is not None else "")


def _students(c: dict) -> str:
    """A cell's students: their number, and of how many where the cell is not complete."""
    return f"{c['n_students']}" + ("" if c.get("complete") else f" of {c.get('wanted', '?')}")


def compact_table(res: dict) -> str:
    """One row per attacker, one column per teacher: the students' gain over their base (± SE) and, for the
    protected teachers, its share of the control's gain (the README's table)."""
    teachers = [t for t in res["teachers"] if any(t in res["cells"].get(a, {}) for a in res["battery"])]
    lines = ["| attacker | base | " + " | ".join(teachers) + " |", "|---|---|" + "---|" * len(teachers)]
    for name in res["battery"]:
        row = res["cells"].get(name, {})
        if not row:
            continue
        base = next(iter(row.values()))["base"]
        cells = []
        for t in teachers:
            c = row.get(t)
            if not c or c.get("gain") is None:
                cells.append("")
                continue
            share = (f", **{_pm(c['gain_share'], c.get('gain_share_se'), '.2f')}**"
                     if t != "control" and c.get("gain_share") is not None else "")
            cells.append(_pm(c["gain"], c.get("gain_se"), "+.3f") + share + f" ({_students(c)})")
        lines.append(f"| {name} | {base:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(res: dict) -> str:
    acc = res["teacher_accuracy"]
    lines = ["Teachers (greedy accuracy): " + "; ".join(
        f"{t} {v['accuracy']:.3f} ({v['prompts']} prompts, {v['from']})" for t, v in acc.items()
        if v.get("accuracy") is not None), ""]
    val = {t: v["validation"] for t, v in acc.items() if v.get("validation")}
    if val:
        lines += ["Teachers on the validation slice (choose eta and steps here): " + "; ".join(
            f"{t} {v['accuracy']:.3f} (prompts {v['slice']})" for t, v in val.items()), ""]
    for sw in res.get("eta_sweeps", []):
        lines += [f"Eta sweep against `{sw['proxy']}` (rule: the largest eta with the teacher >= {sw['bar']}x the "
                  "control on validation): " + "; ".join(
                      f"eta {r['eta']:g} {r['ratio']:.3f}x" if r["ratio"] is not None else f"eta {r['eta']:g} -"
                      for r in sw["rows"])
                  + (f" -> **{sw['chosen']}**" if sw["chosen"] else " -> none keeps the bar")
                  + ("" if sw["complete"] else " (not every teacher evaluated yet)"), ""]
    if res["primed_students"]:
        lines += ["Primed attacker students (64 answer-only examples): " + "; ".join(
            f"{n}: {_pm(s['accuracy_raw'], None)} raw -> {_pm(s['accuracy_primed'], None)} primed (its base)"
            for n, s in res["primed_students"].items()), ""]
    lines += ["| attacker | teacher | students | accuracy ± SE | base | gain ± SE | gain share ± SE |",
              "|---|---|---|---|---|---|---|"]
    for name in res["battery"]:
        for t in res["teachers"]:
            c = res["cells"].get(name, {}).get(t)
            if not c or c.get("status") not in ("ok", "partial"):
                continue
            lines.append(f"| {name} | {t} | {_students(c)} | {_pm(c['accuracy'], c.get('accuracy_se'))} | {c['base']:.3f} | "
                         f"{_pm(c['gain'], c.get('gain_se'), '+.3f')} | "
                         f"{_pm(c.get('gain_share'), c.get('gain_share_se'), '.2f')} |")
    lines += ["", "The same, compact (gain over base ± SE, **gain share ± SE**, students per cell):", "",
              compact_table(res)]
    if res.get("checks"):
        lines += ["", "Targets (on what has run):", "", *(f"- {x}" for x in res["checks"])]
    prof = res.get("profile_minutes") or {}
    if prof:
        lines += ["", f"Where the time went (minutes of finished stages, {sum(prof.values()):.0f} in all): "
                  + "; ".join(f"{k} {v:.1f}" for k, v in prof.items()) + "."]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from distillability.io import save_figure
    from distillability.report.attack import COLORS

    curves = {k: v for k, v in res["curves"].items()
              if any(res["cells"].get(a, {}).get(t, {}).get("gain") is not None for a in v for t in res["teachers"])}
    if not curves:
        return
    fig, axes = plt.subplots(1, len(curves), figsize=(3.8 * len(curves) + 2.2, 3.6), squeeze=False, sharey=True)
    extra = ["#dd8452", "#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974"]
    for ax, (key, names) in zip(axes[0], curves.items()):
        for i, t in enumerate(res["teachers"]):
            pts = [(float(n.rsplit("@", 1)[1].rstrip("x")), res["cells"].get(n, {}).get(t, {})) for n in names]
            pts = [(b, c) for b, c in pts if c.get("gain") is not None]
            shift = 1.06 ** (i - (len(res["teachers"]) - 1) / 2)  # side by side, not on top of each other
            if pts:
                ax.errorbar([b * shift for b, _ in pts], [c["gain"] for _, c in pts],
                            yerr=[c.get("gain_se") or 0 for _, c in pts],
                            marker="o", capsize=3, label=t, color=COLORS.get(t, extra[i % len(extra)]))
        ax.axhline(0, color="black", linewidth=1, linestyle="dashed")
        ax.set_xscale("log")
        ax.set_xticks([1, 4], ["1x", "4x"])
        ax.set_xlim(0.7, 5.7)
        ax.minorticks_off()
        ax.set_title(curve_label(key) if ":" in key else f"{key.upper()} (the world's 0.46M student)", fontsize=10)
        ax.set_xlabel("teacher answers (x 600)")
    axes[0][0].set_ylabel("students' gain over their base (± SE)")
    handles = {h.get_label(): h for ax in axes[0] for h in ax.get_legend_handles_labels()[0]}
    fig.legend(list(handles.values()), list(handles), fontsize=7, loc="center right")
    fig.suptitle(f"Gain vs budget per attacker (protected: gain share <= {SHARE_BAR})", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 2.0 / fig.get_figwidth(), 1))
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=Path("runs/smollm2-attacker"))
    ap.add_argument("--config", type=Path, default=Path("configs/smollm2-attacker.yaml"))
    ap.add_argument("--out", type=Path, default=Path("bench/results/smollm2_attacker"))
    args = ap.parse_args()
    res = collect(args.run, args.config)
    res["checks"] = checks(res)
    from distillability.io import write_json, write_text

    write_json(args.out.with_suffix(".json"), res)
    write_text(args.out.with_suffix(".md"), markdown(res) + "\n")
    plot(res, args.out.with_suffix(".png"))
    print(markdown(res))


if __name__ == "__main__":
    main()
