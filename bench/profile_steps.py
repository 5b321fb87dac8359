"""Where the time goes in one calibrate step and one GKD step (issue #7): generation vs scoring vs
update, from the recipes' own per-step timings, on the compare_trl.py models and data.

    .venv/bin/python bench/profile_steps.py [--steps 10] [--bf16 on|off|auto] [--size tiny|real]

`--size real`: compare_trl.py's real-scale models (SmolLM2-135M-Instruct policy with LoRA, 8 x 8 generations of
48 tokens; GKD from it into a from-scratch student with its tokenizer), issue #29.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import compare_trl as bench  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--bf16", choices=["on", "off", "auto"], default="on")
    ap.add_argument("--size", choices=["tiny", "real"], default="tiny")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    root = Path(tempfile.mkdtemp(prefix="bench_prof_"))
    (bench.build_real if args.size == "real" else bench.build)(root)
    from distillability.precision import resolve

    bf16 = resolve("auto", "cpu")[0] if args.bf16 == "auto" else args.bf16 == "on"
    result = {}
    kinds = ("grpo_teacher", "grpo_teacher_eta", "gkd") if args.size == "real" else (
        "grpo_teacher", "grpo_teacher_eta", "grpo_student", "gkd")
    for kind in kinds:
        bench.worker_ours(kind, root, args.steps, bf16)
        rows = [json.loads(x) for x in (Path(bench.LAST_OUT[0]) / "log.jsonl").read_text().splitlines()][2:]
        if kind == "gkd":
            on = [r for r in rows if r["on_policy"]]
            off = [r for r in rows if not r["on_policy"]]
            result[kind] = {"s_step": statistics.median(r["s_step"] for r in rows),
                            "on_policy_s_generate": statistics.median(r["s_generate"] for r in on) if on else None,
                            "on_policy_s_step": statistics.median(r["s_step"] for r in on) if on else None,
                            "off_policy_s_step": statistics.median(r["s_step"] for r in off) if off else None}
        else:
            med = {k: statistics.median(r[k] for r in rows) for k in ("s_generate", "s_score", "s_step")}
            med["s_update"] = med["s_step"] - med["s_generate"] - med["s_score"]
            result[kind] = med
        print(kind, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result[kind].items()}, flush=True)
    print(json.dumps({"size": args.size, "bf16": bf16, **result}))


if __name__ == "__main__":
    main()
