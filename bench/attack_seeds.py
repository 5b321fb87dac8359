"""The attack battery over seeds (issue #27): the embedded default's pipeline with the whole battery
(`attack_battery=full`: budgets 1x/4x/10x for SFT, KD and GKD, the filters, the unseen students, the defenses),
one run per seed, and the table of where the protection holds.

    .venv/bin/python bench/attack_seeds.py [--seeds 0 1 2] [--repeats 1] [--out bench/results] [key=value ...]

Per seed: `distillability demo --seed S attack_battery=full attack.repeats=R` into `<out>/runs/seedS`, the run
folder `knob_seeds.py` uses, so the teachers and students it made are reused (a rerun reuses every finished stage
and every finished cell). Writes `<out>/attack_seeds.json` (every seed's
attack.json cells, the pooled means, the protected budgets, the cost per attacker) and `<out>/attack_seeds.md`
(the tables for bench/README.md), and prints them. `--attackers a,b` keeps only those attackers of the
battery (e.g. to measure a subset first); overrides go to every run. `--collect` only tabulates what the runs
folder holds (seeds whose runs have not finished are left out).
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
from distillability.protection import SHARE_BAR  # noqa: E402
from distillability.recipes.attack import FULL_BATTERY  # noqa: E402


def run_seed(seed: int, folder: Path, repeats: int, attackers: list[str] | None, overrides: list[str],
             defense_attackers: list[str]) -> None:
    extra = []
    if attackers:
        chosen = [a for a in FULL_BATTERY if a.name in attackers]
        by = json.dumps(defense_attackers)
        extra = ["attack_battery=custom", "attack.battery=" + json.dumps([a.__dict__ for a in chosen]),
                 f"attack.defenses=[{{name: control+answer_only, kind: answer_only, attackers: {by}}}, "
                 f"{{name: control+least_likely, kind: least_likely, attackers: {by}}}]"]
    cmd = [sys.executable, "-m", "distillability.cli", "demo", "--seed", str(seed), "--output-dir", str(folder),
           "progress=false", "attack_battery=full" if not attackers else "", f"attack.repeats={repeats}", *extra,
           *overrides]
    subprocess.run([c for c in cmd if c], check=True)


def pooled(per_seed: dict) -> dict:
    """Mean over seeds of each cell's accuracy and ratio, with the per-seed values."""
    table: dict = {}
    for result in per_seed.values():
        for attacker, row in result["cells"].items():
            for teacher, cell in row.items():
                entry = table.setdefault(attacker, {}).setdefault(teacher, {"accuracy": [], "ratio": [], "gain_share": [],
                                                                            "wall_seconds": [], "status": []})
                entry["status"].append(cell.get("status"))
                for k in ("accuracy", "ratio", "gain_share", "wall_seconds"):
                    if cell.get(k) is not None:
                        entry[k].append(cell[k])
    for row in table.values():
        for entry in row.values():
            for k in ("accuracy", "ratio", "gain_share"):
                v = entry[k]
                entry[f"{k}_mean"] = statistics.fmean(v) if v else None
                entry[f"{k}_range"] = [min(v), max(v)] if v else None
    return table


def markdown(per_seed: dict, table: dict) -> str:
    seeds = sorted(per_seed)
    first = per_seed[seeds[0]]
    teachers = first["teachers"]
    lines = [f"Seeds {', '.join(map(str, seeds))}; {first['repeats']} student(s) per cell. Mean accuracy over seeds, "
             "in brackets the mean ratio to the control teacher's students of the same attacker [min-max over seeds].",
             "", "| attacker | " + " | ".join(teachers) + " |", "|---" * (len(teachers) + 1) + "|"]
    for a in first["battery"]:
        cells = []
        for t in teachers:
            e = table.get(a["name"], {}).get(t)
            if not e or e["accuracy_mean"] is None:
                cells.append(",".join(sorted({s or "-" for s in (e or {}).get("status", ["-"])})))
                continue
            r = e["ratio_mean"]
            rr = e["ratio_range"]
            cells.append(f"{e['accuracy_mean']:.3f}" + (f" ({r:.2f}x [{rr[0]:.2f}-{rr[1]:.2f}])" if r is not None else ""))
        lines.append(f"| {a['name']} | " + " | ".join(cells) + " |")
    lines += ["", f"Largest budget at which the undistillable teacher's students keep <= {SHARE_BAR} of the control's "
              "gain (per seed; results written before the gain measure carry the ratio's budget instead):", "",
              "| method | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---" * (len(seeds) + 1) + "|"]
    for method in ("sft", "kd", "gkd"):
        vals = []
        for s in seeds:
            p = per_seed[s].get("protection", {}).get("undistillable", {}).get(method)
            vals.append("-" if p is None else ("never" if p["largest_budget_protected"] is None
                                               else f"{p['largest_budget_protected']:g}x"))
        lines.append(f"| {method} | " + " | ".join(vals) + " |")
    lines += ["", "Cost per attacker (wall seconds summed over its cells, mean over seeds; 1x cells read from the "
              "distill stage cost 0 here):", "", "| attacker | seconds |", "|---|---|"]
    for a in first["battery"]:
        secs = [sum(c.get("wall_seconds") or 0 for c in per_seed[s]["cells"][a["name"]].values()) for s in seeds]
        lines.append(f"| {a['name']} | {statistics.fmean(secs):.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--attackers", type=str, default="",
                    help="comma list: only these attackers, against the control and undistillable teachers")
    ap.add_argument("--defense-attackers", type=str, default="",
                    help="with --attackers: the SFT attackers that attack the defenses (default: all of them)")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--collect", action="store_true")
    args, overrides = ap.parse_known_args()
    attackers = [a for a in args.attackers.split(",") if a] or None
    runs = args.out / "runs"
    per_seed, cost = {}, {}
    for seed in args.seeds:
        folder = runs / f"seed{seed}"
        if not args.collect:
            t0 = time.time()
            run_seed(seed, folder, args.repeats, attackers, overrides,
                     [a for a in args.defense_attackers.split(",") if a])
            cost[seed] = time.time() - t0
        if (folder / "attack" / "attack.json").exists():
            per_seed[seed] = json.loads((folder / "attack" / "attack.json").read_text())
            headline = folder / "headline.json"  # (absent while the run's evaluations are still going)
            per_seed[seed]["headline"] = json.loads(headline.read_text()) if headline.exists() else None
    if not per_seed:
        sys.exit("no finished seed to tabulate")
    table = pooled(per_seed)
    text = markdown(per_seed, table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attack_seeds.json").write_text(json.dumps(
        {"seeds": per_seed, "pooled": table, "wall_seconds_per_seed": cost, "overrides": overrides,
         "attackers": attackers, "defense_attackers": args.defense_attackers, "repeats": args.repeats}, indent=1, default=str))
    (args.out / "attack_seeds.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
