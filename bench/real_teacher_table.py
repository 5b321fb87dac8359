"""The tables of a knob run with a real teacher (issue #29) from its run folder: teachers and students with the
binomial standard error of every accuracy, the ratios to the control, the targets marked, the stage times.

    python bench/real_teacher_table.py runs/smollm2-tinyworld [--json OUT]

Teachers: greedy accuracy on the evaluation's held-out prompts (SE sqrt(p(1-p)/n)). Students: the attack stage's
1x cells (`attack.repeats` students per cell), their mean with the binomial SE of the pooled answers
(n = prompts x students) and the students' own accuracies. Reads only the run's JSON files (no model is loaded).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from distillability.protection import binomial_se as se

TEACHERS = ("original", "control", "distillable", "undistillable")


def tables(run: Path) -> tuple[str, dict]:
    ev = json.loads((run / "evaluations.json").read_text())
    attack = json.loads((run / "attack" / "attack.json").read_text())
    head = json.loads((run / "headline.json").read_text())
    teachers = ev["evaluations"]["teachers"]
    base = ev["evaluations"]["student_base"]
    out = {"teachers": {}, "students": {}, "student_base": {}, "stages_s": {}}
    ctl = teachers["control"]["greedy_accuracy"]
    lines = ["| teacher | greedy accuracy ± SE | x control | sample accuracy (T = 1) | D/char to the proxy | mean answer chars |",
             "|---|---|---|---|---|---|"]
    for t in TEACHERS:
        r = teachers[t]
        p, n = r["greedy_accuracy"], r["num_prompts"]
        out["teachers"][t] = {"accuracy": p, "se": se(p, n), "n": n, "ratio": p / ctl, "sample_accuracy": r["sample_accuracy"],
                              "D_per_char": r.get("D_to_proxy_per_char"), "mean_chars": r.get("mean_response_chars")}
        lines.append(f"| {t} | {p:.3f} ± {se(p, n):.3f} | {p / ctl:.2f} | {r['sample_accuracy']:.3f} | "
                     f"{r.get('D_to_proxy_per_char', float('nan')):.2f} | {r.get('mean_response_chars', float('nan')):.1f} |")
    pb, nb = base["greedy_accuracy"], base["num_prompts"]
    out["student_base"] = {"accuracy": pb, "se": se(pb, nb), "n": nb}
    lines += ["", f"Student base (before distillation): {pb:.3f} ± {se(pb, nb):.3f} ({nb} prompts).", "",
              "| attacker (students per cell) | " + " | ".join(t for t in attack["teachers"]) + " |",
              "|---" * (len(attack["teachers"]) + 1) + "|"]
    for name, row in attack["cells"].items():
        cells = []
        for t in attack["teachers"]:
            c = row.get(t, {})
            if c.get("status") not in ("ok", "partial"):
                cells.append(c.get("status", "-"))
                continue
            n = c["eval_prompts"] * len(c["accuracies"])
            s = se(c["accuracy"], n)
            out["students"].setdefault(name, {})[t] = {"accuracy": c["accuracy"], "se": s, "n": n,
                                                       "accuracies": c["accuracies"], "ratio": c.get("ratio"),
                                                       "teacher_sample_accuracy": c.get("teacher_sample_accuracy")}
            each = " / ".join(f"{a:.2f}" for a in c["accuracies"])
            ratio = f" ({c['ratio']:.2f}x)" if c.get("ratio") is not None else ""
            cells.append(f"{c['accuracy']:.3f} ± {s:.3f}{ratio} [{each}]")
        lines.append(f"| {name} ({attack['repeats']}) | " + " | ".join(cells) + " |")
    orig = {m: per["original"] for m, per in head["students"].items() if "original" in per}
    if orig:
        out["original_students"] = orig
        lines += ["", "The original teacher's students (the distill stage's, one per method): "
                  + ", ".join(f"{m.upper()} {a:.3f}" for m, a in orig.items()) + "."]
    stages = ev.get("stages", {})
    groups = {"teacher SFT": ("teacher_sft",), "diagnose": ("diagnose",), "calibrate (3)": ("calibrate_",),
              "distill stage": ("distill_",), "attack stage": ("attack",), "evaluate": ("eval/",)}
    for g, prefixes in groups.items():
        out["stages_s"][g] = round(sum(v["wall_seconds"] for k, v in stages.items() if k.startswith(prefixes)), 1)
    out["wall_s"] = round(head["wall_seconds"], 1)
    lines += ["", "Stage times (s): " + ", ".join(f"{g} {s:.0f}" for g, s in out["stages_s"].items())
              + f"; whole chain {out['wall_s']:.0f}."]
    return "\n".join(lines), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--json", default="", help="also write the numbers as JSON here")
    args = ap.parse_args()
    text, data = tables(Path(args.run))
    print(text)
    if args.json:
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        tmp.replace(args.json)


if __name__ == "__main__":
    main()
