"""The knob, second generation (issue #28): named design variants, each measured with the attack battery and
checked against the issue's targets, per seed.

    .venv/bin/python bench/knob_v2.py --variants v1,adv,trap-adv --seeds 0 [--repeats 1] [--dry-run]
    .venv/bin/python bench/knob_v2.py --variants v1,adv --seeds 0 --collect     # tabulate what has run

A variant is a set of overrides of the embedded default (VARIANTS; what each is predicted to do is written in
bench/README.md, "The knob, second generation", before it runs). Each runs `attack_seeds.py` into
`<out>/<variant>/` (its own run folders, so variants never share a stage) with the budget attackers (SFT, KD,
GKD at 1x/4x/10x), best-of-16, the unseen and the teacher-sized students, against the control, distillable and
undistillable teachers, the teachers also evaluated on the shifted split (chains of 5 terms). The table marks
each target of the issue per seed; `<out>/knob_v2.json` holds every number. Tune on seeds 0-2, report on 3-5.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ATTACKERS = ["sft@1x", "sft@4x", "sft@10x", "kd@1x", "kd@4x", "kd@10x", "gkd@1x", "gkd@4x", "gkd@10x",
             "sft-best-of-16", "sft-unseen-student", "sft-large-student"]
COMMON = ["attack_teachers=[control,distillable,undistillable]", "shifted_terms=5", "attack.defenses=[]"]
TRAP = ["world.style_mix=[0.4,0.3,0.3]"]  # a direct (answer-only) mode in the teacher
VARIANTS: dict[str, list[str]] = {
    "v1": [],                                                   # the shipped default
    "adv": ["calibrate.proxy_updates=4"],                       # the adversarial proxy
    "trap": TRAP,
    "trap-adv": [*TRAP, "calibrate.proxy_updates=4"],
    "trap-adv-disjoint": [*TRAP, "calibrate.proxy_updates=4", "world.student_prompts=disjoint", "world.student_steps=200"],
    # calibrated on the 2-3-term chains only; utility also on the held-out 4-term chains, a length the world's
    # teacher trained on and the calibration never saw (the shifted split; later overrides win over COMMON's)
    "trap-adv-disjoint-short": [*TRAP, "calibrate.proxy_updates=4", "world.student_prompts=disjoint",
                                "world.student_steps=200", "calibration_terms=[2,3]", "shifted_terms=4"],
    # the "not built into the world" check on the best 1x-4x design: its proxy trained on the teacher's mix
    "trap-adv-disjoint-short-seen": [*TRAP, "calibrate.proxy_updates=4", "world.student_prompts=disjoint",
                                     "world.student_steps=200", "calibration_terms=[2,3]", "shifted_terms=4",
                                     "world.proxy_style_mix=[0.4,0.3,0.3]"],
    "trap-adv-disjoint-seen": [*TRAP, "calibrate.proxy_updates=4", "world.student_prompts=disjoint",
                               "world.student_steps=200", "world.proxy_style_mix=[0.4,0.3,0.3]"],
}


def run_variant(name: str, seeds: list[int], repeats: int, out: Path, extra: list[str], dry: bool,
                attackers: list[str]) -> None:
    cmd = [sys.executable, str(Path(__file__).parent / "attack_seeds.py"), *COMMON, *VARIANTS[name], *extra,
           "--attackers", ",".join(attackers), "--repeats", str(repeats), "--out", str(out / name),
           "--seeds", *map(str, seeds)]
    print(" ".join(cmd), flush=True)
    if not dry:
        subprocess.run(cmd, check=True)


def checks(attack: dict, head: dict) -> dict[str, bool | None]:
    """Issue #28's targets on one seed's attack.json and headline.json (None: not measured)."""
    cells = attack["cells"]

    def acc(a, t):
        c = cells.get(a, {}).get(t, {})
        return c.get("accuracy") if c.get("status") == "ok" else None

    def cell(a, t, k):
        c = cells.get(a, {}).get(t, {})
        return c.get(k) if c.get("status") == "ok" else None

    base = cell("sft@1x", "control", "base")
    out: dict[str, bool | None] = {}
    ctrl, dist = acc("sft@1x", "control"), acc("sft@1x", "distillable")
    out["teaches: control SFT@1x >= base + 0.10"] = None if None in (ctrl, base) else ctrl >= base + 0.10
    out["teaches: distillable SFT@1x >= 1.1x control"] = None if None in (ctrl, dist) else dist >= 1.1 * ctrl
    t, sh = head.get("teachers", {}), head.get("teachers_shifted", {})
    for who in ("undistillable", "distillable"):
        out[f"utility: {who} >= 0.95x (held-out)"] = (t[who] >= 0.95 * t["control"]) if who in t else None
        out[f"utility: {who} >= 0.9x (shifted)"] = (sh[who] >= 0.9 * sh["control"]) if who in sh else None
    for a in ATTACKERS:
        share, ratio, gain = (cell(a, "undistillable", k) for k in ("gain_share", "ratio", "gain"))
        # no gain share where the control's gain is within the noise; an undistillable student at or below its
        # base gained nothing, which meets the target whatever the control did
        out[f"{a}: gain share <= 0.3"] = True if gain is not None and gain <= 0 else None if share is None else share <= 0.3
        bound = 0.6 if a.endswith(("@4x", "@10x")) else 0.5
        out[f"{a}: ratio <= {bound}"] = None if ratio is None else ratio <= bound
    return out


def collect(names: list[str], seeds: list[int], out: Path) -> dict:
    result: dict = {}
    for name in names:
        for s in seeds:
            run = out / name / "runs" / f"seed{s}"
            if not (run / "attack" / "attack.json").exists() or not (run / "headline.json").exists():
                continue
            attack = json.loads((run / "attack" / "attack.json").read_text())
            head = json.loads((run / "headline.json").read_text())
            result.setdefault(name, {})[s] = {"checks": checks(attack, head), "teachers": head.get("teachers"),
                                              "teachers_shifted": head.get("teachers_shifted"),
                                              "student_base": head.get("student_base"),
                                              "cells": {a: {t: {k: c.get(k) for k in ("accuracy", "ratio", "gain",
                                                                                      "gain_share", "status")}
                                                            for t, c in row.items()}
                                                        for a, row in attack["cells"].items()}}
    return result


def markdown(result: dict) -> str:
    lines = []
    for name, per_seed in result.items():
        seeds = sorted(per_seed)
        lines += [f"### {name} ({' '.join(VARIANTS[name]) or 'the shipped default'})", "",
                  "| target | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---" * (len(seeds) + 1) + "|"]
        for key in per_seed[seeds[0]]["checks"]:
            marks = [{True: "yes", False: "**no**", None: "-"}[per_seed[s]["checks"].get(key)] for s in seeds]
            lines.append(f"| {key} | " + " | ".join(marks) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="v1")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("bench/results/knob_v2"))
    ap.add_argument("--attackers", default=",".join(ATTACKERS),
                    help="comma list (default: the targets' attackers; fewer while tuning, all for the final table)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    ap.add_argument("--collect", action="store_true", help="only tabulate what the run folders hold")
    args, extra = ap.parse_known_args()
    names = [v for v in args.variants.split(",") if v]
    if unknown := [v for v in names if v not in VARIANTS]:
        sys.exit(f"--variants: unknown {unknown[0]!r} (known: {', '.join(VARIANTS)})")
    if not args.collect:
        for name in names:
            run_variant(name, args.seeds, args.repeats, args.out, extra, args.dry_run,
                        [a for a in args.attackers.split(",") if a])
    if args.dry_run:
        return
    result = collect(names, args.seeds, args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "knob_v2.json"
    # other variants' results stay: a run updates the variants (and seeds) it names
    merged = json.loads(path.read_text()) if path.exists() else {}
    for name, per_seed in result.items():
        merged.setdefault(name, {}).update({str(s): v for s, v in per_seed.items()})
    path.write_text(json.dumps(merged, indent=1))
    text = markdown({n: {int(s): v for s, v in per.items()} for n, per in merged.items() if n in VARIANTS})
    (args.out / "knob_v2.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
