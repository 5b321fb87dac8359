"""Per-family greedy accuracy of the students of a `knob_seeds.py` run (first student of each cell and the
unseen attacker), and the style of their math answers: where the undistillable teacher's protection acts.

    .venv/bin/python bench/knob_families.py OUT [--seeds 0 1 2]

OUT is a `knob_seeds.py --out` folder; each seed's held-out prompts are rebuilt from the task settings of its
run (`pipeline_config.yaml`). New pipeline runs report the same numbers in eval.json (`by_family`) and the
report.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
from pathlib import Path

import torch
import yaml

from distillability.config import from_dict
from distillability.metrics import accuracy_by_key
from distillability.models import load_model
from distillability.recipes.pipeline import PipelineConfig
from distillability.sampling import generate
from distillability.tasks.world import style_of


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    torch.set_num_threads(2)
    for seed in args.seeds:
        run = Path(args.out) / "runs" / f"seed{seed}"
        raw = yaml.safe_load((run / "pipeline_config.yaml").read_text())
        raw["task"].setdefault("world_heldout", "first")  # runs from before the option all had that split
        cfg = from_dict(PipelineConfig, raw)
        task = dataclasses.replace(cfg.task, seed=cfg.seed).load()
        ev = task.eval
        for method in ("sft", "kd", "gkd", "attack"):
            for teacher in ("control", "undistillable", "distillable"):
                path = f"{run}/attack_sft_correct_{teacher}/model" if method == "attack" else f"{run}/distill_{method}_{teacher}/model"
                model, tok = load_model(path)
                outs = generate(model, tok, [e.prompt for e in ev], 64, greedy=True)
                styles = collections.Counter(style_of(g.text) for g in outs if ev[g.prompt_index].family == "math")
                acc = accuracy_by_key([ev[g.prompt_index].family for g in outs],
                                      [task.score(ev[g.prompt_index], g.text) for g in outs])
                fams = {f: f"{v['greedy_accuracy']:.2f} ({v['num_prompts']})" for f, v in acc.items()}
                print(seed, method.ljust(6), teacher.ljust(13), fams, "math styles", dict(styles), flush=True)


if __name__ == "__main__":
    main()
