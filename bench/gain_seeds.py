"""The embedded default's knob over fresh seeds, in gain-over-base terms: per seed, `distillability demo --seed S`
with K students per cell (no attack stage), then the table of the students' gains over their base, gain shares
and the targets of the claim, per seed and pooled.

    .venv/bin/python bench/gain_seeds.py --seeds 3 4 5 [--students 3] [--out bench/results/gain_seeds] [--runs runs/gain_seeds] [key=value ...]
    .venv/bin/python bench/gain_seeds.py --seeds 3 4 5 --collect   # tabulate what has run

Each seed builds its own world (seed 0's ships in the package) and runs into `<runs>/seedS`; a rerun reuses
every finished stage, so an interrupted seed continues. Writes `<out>.json` (every seed's gains cells and the
pooled table) and `<out>.md`. Pooled over seeds: a cell's gain is the mean of the seeds' gains, its SE the spread
of the seeds' gains / sqrt(seeds) (world, calibration and students all vary between seeds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

TEACHERS = ("control", "distillable", "undistillable")
TARGETS = {"control gain >= +0.15": 0.15, "undistillable teacher >= 0.95x": 0.95, "undistillable gain share <= 0.3": 0.3,
           "distillable gain >= 1.1x the control's": 1.1}


def run_seed(seed: int, runs: Path, students: int, threads: int, overrides: list[str]) -> None:
    cmd = [sys.executable, "-m", "distillability.cli", "demo", "--seed", str(seed), "--output-dir",
           str(runs / f"seed{seed}"), "progress=false", f"students_per_cell={students}", "skip=[attack]",
           f"distill_teachers=[{','.join(TEACHERS)}]", f"threads={threads}", *overrides]
    print(" ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True)
    print(f"seed {seed}: {time.time() - t0:.0f} s", flush=True)


def _mean_se(xs: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(xs), (statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else None)


def checks(head: dict) -> dict[str, dict]:
    """The claim's targets on one seed's headline (per method where it applies), with the margin of each."""
    t, g = head["teachers"], head["gains"]
    out = {"undistillable teacher >= 0.95x": {"all": t["undistillable"] / t["control"]}}
    for m, per in g.items():
        out.setdefault("control gain >= +0.15", {})[m] = per["control"]["gain"]
        out.setdefault("undistillable gain share <= 0.3", {})[m] = per["undistillable"]["gain_share"]
        ratio = per["distillable"]["gain"] / per["control"]["gain"] if per["control"]["gain"] > 0 else None
        out.setdefault("distillable gain >= 1.1x the control's", {})[m] = ratio
    return out


def met(name: str, value: float | None) -> bool | None:
    if value is None:
        return None
    return value <= TARGETS[name] if "<=" in name else value >= TARGETS[name]


def collect(seeds: list[int], runs: Path) -> dict:
    heads = {s: json.loads((runs / f"seed{s}" / "headline.json").read_text()) for s in seeds
             if (runs / f"seed{s}" / "headline.json").exists()}
    if not heads:
        sys.exit(f"no finished seed under {runs}")
    methods = list(next(iter(heads.values()))["gains"])
    pooled = {}
    for m in methods:
        pooled[m] = {}
        for t in TEACHERS:
            gains = [h["gains"][m][t]["gain"] for h in heads.values()]
            shares = [h["gains"][m][t]["gain_share"] for h in heads.values() if h["gains"][m][t]["gain_share"] is not None]
            g, se = _mean_se(gains)
            ctrl = [h["gains"][m]["control"]["gain"] for h in heads.values()]
            share = statistics.fmean(gains) / statistics.fmean(ctrl) if statistics.fmean(ctrl) > 0 else None
            pooled[m][t] = {"gain": g, "gain_se_over_seeds": se, "gain_share_pooled": share,
                            "gain_share_per_seed": shares, "students": sum(h["gains"][m][t]["n_students"] for h in heads.values())}
    utility = [h["teachers"]["undistillable"] / h["teachers"]["control"] for h in heads.values()]
    per_seed = {s: checks(h) for s, h in heads.items()}
    return {"seeds": list(heads), "methods": methods, "per_seed": {str(s): {"teachers": h["teachers"],
            "student_base": h["student_base"], "student_base_se": h.get("student_base_se"), "gains": h["gains"],
            "checks": per_seed[s], "wall_seconds": h["wall_seconds"], "attacker": h.get("attacker")}
            for s, h in heads.items()}, "pooled": pooled, "utility": {"per_seed": utility, "mean": statistics.fmean(utility)}}


def markdown(res: dict) -> str:
    seeds = res["seeds"]
    lines = [f"Seeds {', '.join(map(str, seeds))}; students per cell: "
             f"{res['per_seed'][str(seeds[0])]['gains'][res['methods'][0]]['control']['n_students']}. Gain over the student base "
             "(± the SE of the cell, from its students' spread and the base's binomial SE) and the gain share.", "",
             "| seed | base | method | control gain | distillable gain | undistillable gain | undistillable share | "
             "distillable / control | undistillable teacher / control |", "|---|---|---|---|---|---|---|---|---|"]
    for s in seeds:
        r = res["per_seed"][str(s)]
        for m in res["methods"]:
            g = r["gains"][m]
            pm = lambda c: f"{c['gain']:+.3f} ± {c['gain_se']:.3f}" if c.get("gain_se") is not None else f"{c['gain']:+.3f}"  # noqa: E731
            share = g["undistillable"]["gain_share"]
            sse = g["undistillable"].get("gain_share_se")
            dist = g["distillable"]["gain"] / g["control"]["gain"] if g["control"]["gain"] > 0 else None
            lines.append(f"| {s} | {r['student_base']:.3f} | {m} | {pm(g['control'])} | {pm(g['distillable'])} | "
                         f"{pm(g['undistillable'])} | {'-' if share is None else f'{share:.2f}'}"
                         f"{'' if sse is None or share is None else f' ± {sse:.2f}'} | "
                         f"{'-' if dist is None else f'{dist:.2f}x'} | "
                         f"{r['teachers']['undistillable'] / r['teachers']['control']:.3f}x |")
    lines += ["", "Pooled over seeds (gain: mean of the seeds' gains ± their spread / sqrt(seeds); share: pooled gain / "
              "the control's pooled gain):", "", "| method | control gain | distillable gain | undistillable gain | "
              "undistillable share | distillable / control |", "|---|---|---|---|---|---|"]
    for m in res["methods"]:
        p = res["pooled"][m]
        pm = lambda c: f"{c['gain']:+.3f}" + (f" ± {c['gain_se_over_seeds']:.3f}" if c["gain_se_over_seeds"] else "")  # noqa: E731
        share = p["undistillable"]["gain_share_pooled"]
        dist = p["distillable"]["gain"] / p["control"]["gain"] if p["control"]["gain"] > 0 else None
        lines.append(f"| {m} | {pm(p['control'])} | {pm(p['distillable'])} | {pm(p['undistillable'])} | "
                     f"{'-' if share is None else f'{share:.2f}'} | {'-' if dist is None else f'{dist:.2f}x'} |")
    lines += ["", f"Undistillable teacher's accuracy / the control's: mean {res['utility']['mean']:.3f}x "
              f"(per seed {', '.join(f'{u:.3f}' for u in res['utility']['per_seed'])}).", "", "Targets, per seed "
              "and method (value; met or missed by how much):", ""]
    for name in TARGETS:
        cells = []
        for s in seeds:
            for m, v in res["per_seed"][str(s)]["checks"][name].items():
                ok = met(name, v)
                cells.append(f"seed {s} {m}: {'-' if v is None else f'{v:.2f}'} "
                             f"({'n/a' if ok is None else 'met' if ok else f'missed by {abs(v - TARGETS[name]):.2f}'})")
        lines.append(f"- {name}: " + "; ".join(cells))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[3, 4, 5])
    ap.add_argument("--students", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench/results/gain_seeds"), help="<out>.json and <out>.md")
    ap.add_argument("--runs", type=Path, default=Path("runs/gain_seeds"), help="the seeds' run folders")
    ap.add_argument("--collect", action="store_true")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if not args.collect:
        for s in args.seeds:
            run_seed(s, args.runs, args.students, args.threads, args.overrides)
    res = collect(args.seeds, args.runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(res, indent=1) + "\n")
    Path(f"{args.out}.md").write_text(markdown(res) + "\n")
    print(markdown(res))


if __name__ == "__main__":
    main()
