"""The knob over seeds (issue #11): run the demo pipeline for each seed, add the unseen attacker, and
tabulate the ratios the paper's claim is about, relative to the eta = 0 *control* teacher.

    .venv/bin/python bench/knob_seeds.py [--seeds 0 1 2] [--out bench/results] [key=value overrides ...]

Per seed: `distillability demo --seed S` (its world, calibrations, SFT/KD/GKD students, evaluation), then
the attacker the calibration never saw: SFT on only verified-correct teacher samples (`keep_correct_only`),
into the world's student base (another size and tokenizer than the proxy), from the control,
distillable and undistillable teachers. Writes `<out>/knob_seeds.json` (every seed's headline, the
attacker's accuracies, ratios, means, spreads and pooled ratios) and `<out>/knob_seeds.md` (the table for
bench/README.md), and prints the table. Overrides go to every demo run (e.g. `calibrate.max_steps=60`).
`--student-repeats K` distills K students per (method, teacher) with different distill seeds and uses
their mean (one student's accuracy varies by +-30% between equivalent teachers). A rerun into the same
`--out` reuses every finished stage.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distillability.report.protection import CALIBRATED  # noqa: E402

TEACHERS = CALIBRATED


def _cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "distillability.cli", *args], check=True)


def _fresh(card: Path, *inputs: Path) -> bool:
    """A cached student is reused only if its card is newer than its teacher's weights and the distill config
    it copies (the pipeline reruns those when a setting changes)."""
    return card.exists() and all(card.stat().st_mtime_ns > p.stat().st_mtime_ns for p in inputs if p.exists())


def run_seed(seed: int, out: Path, overrides: list[str], repeats: int = 1) -> dict:
    run = out / "runs" / f"seed{seed}"
    t0 = time.time()
    _cli("demo", "--seed", str(seed), "--output-dir", str(run), "progress=false", *overrides)
    head = json.loads((run / "headline.json").read_text())
    ev = json.loads((run / "evaluations.json").read_text())
    student = ev["models"]["student"]
    attacker = {}
    for t in TEACHERS:
        folder = run / f"attack_sft_correct_{t}"
        card = folder / "distill_card.json"
        dcfg = run / f"distill_sft_{t}" / "config.yaml"  # the pipeline's SFT settings, with the filter on
        if not _fresh(card, dcfg, Path(ev["teachers"][t]) / "model.safetensors"):
            _cli("distill", "--config", str(dcfg), f"teacher={ev['teachers'][t]}", f"student={student}",
                 "keep_correct_only=true", f"output_dir={folder}", "runtime.progress=false", "resume=false")
        attacker[t] = json.loads(card.read_text())["student_accuracy"]
    head["students"]["sft_correct_only"] = attacker
    if "student_base" not in head:  # runs from before the pipeline evaluated the base: its distill cards' "before"
        head["student_base"] = json.loads((run / "distill_sft_control" / "distill_card.json").read_text())[
            "student_accuracy_before"]
    if repeats > 1:
        # more students per (method, teacher): the same distill config with other seeds (its own teacher
        # samples and data order); the headline keeps their mean, `student_runs` every run
        head["student_runs"] = {}
        for method in [m for m in head["students"] if m != "sft_correct_only"]:
            head["student_runs"][method] = {}
            for t in TEACHERS:
                accs = [head["students"][method][t]]
                for r in range(1, repeats):
                    folder = run / f"repeat{r}_{method}_{t}"
                    card = folder / "distill_card.json"
                    dcfg = run / f"distill_{method}_{t}" / "config.yaml"
                    if not _fresh(card, dcfg, Path(ev["teachers"][t]) / "model.safetensors"):
                        _cli("distill", "--config", str(dcfg),
                             f"teacher={ev['teachers'][t]}", f"student={student}", f"runtime.seed={seed + 1000 * r}",
                             f"output_dir={folder}", "runtime.progress=false", "resume=false")
                    accs.append(json.loads(card.read_text())["student_accuracy"])
                head["student_runs"][method][t] = accs
                head["students"][method][t] = statistics.mean(accs)
    head["seed_wall_seconds"] = time.time() - t0
    return head


def ratios(head: dict) -> dict:
    t = head["teachers"]
    out = {"teacher_undistillable_vs_control": t["undistillable"] / max(t["control"], 1e-9),
           "teacher_distillable_vs_control": t["distillable"] / max(t["control"], 1e-9)}
    for method, accs in head["students"].items():
        base = max(accs["control"], 1e-9)
        out[f"{method}_undistillable_vs_control"] = accs["undistillable"] / base
        out[f"{method}_distillable_vs_control"] = accs["distillable"] / base
    return out


TARGETS = {  # ratio name pattern -> (comparison, threshold), from issue #11
    "teacher_undistillable_vs_control": (">=", 0.9),
    "teacher_distillable_vs_control": (">=", 0.9),
    "_undistillable_vs_control": ("<=", 0.6),
    "_distillable_vs_control": (">=", 1.0),
}


def _target(name: str):
    if name in TARGETS:
        return TARGETS[name]
    for suffix in ("_undistillable_vs_control", "_distillable_vs_control"):
        if name.endswith(suffix):
            return TARGETS[suffix]
    return None


def pooled_head(heads: list[dict]) -> dict:
    """Accuracies summed over seeds: ratios of these weigh each seed by its control's accuracy, so a seed
    whose control students are near zero cannot swing the summary as it swings the mean of ratios."""
    return {"teachers": {r: sum(h["teachers"][r] for h in heads) for r in heads[0]["teachers"]},
            "students": {m: {r: sum(h["students"][m][r] for h in heads) for r in accs}
                         for m, accs in heads[0]["students"].items()}}


def table(seeds: list[int], heads: list[dict]) -> tuple[str, dict]:
    rs = [ratios(h) for h in heads]
    pooled = ratios(pooled_head(heads))
    names = list(rs[0])
    summary = {}
    lines = ["| ratio (vs the eta=0 control) | target | " + " | ".join(f"seed {s}" for s in seeds)
             + " | mean | sd | pooled | held in |",
             "|---|---|" + "---|" * len(seeds) + "---|---|---|---|"]
    for n in names:
        vals = [r[n] for r in rs]
        op, thr = _target(n)
        held = sum((v >= thr) if op == ">=" else (v <= thr) for v in vals)
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        summary[n] = {"values": vals, "mean": statistics.mean(vals), "sd": sd, "pooled": pooled[n],
                      "target": f"{op} {thr}", "held_in_seeds": held}
        lines.append(f"| {n} | {op} {thr} | " + " | ".join(f"{v:.2f}" for v in vals)
                     + f" | {statistics.mean(vals):.2f} | {sd:.2f} | {pooled[n]:.2f} | {held}/{len(vals)} |")
    acc = ["", "| accuracy | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for role in ("original", "control", "distillable", "undistillable"):
        acc.append(f"| teacher {role} | " + " | ".join(f"{h['teachers'][role]:.2f}" for h in heads) + " |")
    if all("student_base" in h for h in heads):
        acc.append("| student base (before distillation) | " + " | ".join(f"{h['student_base']:.2f}" for h in heads) + " |")
    for method in heads[0]["students"]:
        for role in heads[0]["students"][method]:
            acc.append(f"| student {method} <- {role} | "
                       + " | ".join(f"{h['students'][method][role]:.2f}" for h in heads) + " |")
    return "\n".join(lines + acc), summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--student-repeats", type=int, default=1,
                    help="students per (method, teacher) from other distill seeds; ratios use their mean")
    ap.add_argument("--from-json", help="tabulate an earlier knob_seeds.json again (no runs), e.g. after a table change")
    ap.add_argument("overrides", nargs="*", help="key=value overrides for every demo run")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        old = json.loads(Path(args.from_json).read_text())
        seeds, overrides, heads, date = old["seeds"], old["overrides"], old["headlines"], old["date"]
    else:
        seeds, overrides, date = args.seeds, args.overrides, time.strftime("%Y-%m-%d")
        heads = [run_seed(s, out, overrides, args.student_repeats) for s in seeds]
    md, summary = table(seeds, heads)
    result = {"seeds": seeds, "overrides": overrides, "headlines": heads, "summary": summary, "date": date}
    (out / "knob_seeds.json").write_text(json.dumps(result, indent=1))
    (out / "knob_seeds.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
