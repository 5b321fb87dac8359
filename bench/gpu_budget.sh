#!/usr/bin/env bash
# Distillation budget sweep on one GPU (issue #11): given the calibrated teachers of one knob run (built on
# the CPU), distil the world's student base from each teacher with SFT / KD / GKD under several budgets,
# all runs in parallel, and tabulate the student accuracies and the ratios to the eta = 0 control.
#
#   bench/gpu_budget.sh CARRY OUT
#
# CARRY holds the models and distill configs of one `knob_seeds.py` / `demo` run: original/, control/,
# distillable/, undistillable/ (teacher folders), student/ (the world's student base) and
# distill_{sft,kd,gkd}.yaml (that run's distill configs). Writes OUT/budget.json and OUT/budget.md.
set -uo pipefail
cd "$(dirname "$0")/.."
CARRY="$1"; OUT="$2"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
RUNS="${RUNS_DIR:-/tmp/gpu_budget}"
mkdir -p "$OUT" "$RUNS"
"$PY" -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU")'

# name | overrides
BUDGETS=(
  "b120|max_steps=120 learning_rate=5e-4 num_prompts=600"
  "b600|max_steps=600 learning_rate=2e-3 num_prompts=4000 runtime.bf16=true"
  "b600lo|max_steps=600 learning_rate=1e-3 num_prompts=4000 runtime.bf16=true"
  "b1200|max_steps=1200 learning_rate=2e-3 num_prompts=8000 runtime.bf16=true"
)
[ -n "${BUDGET_SMOKE:-}" ] && BUDGETS=("smoke|max_steps=2 num_prompts=8 eval_prompts=4")
jobs=()
for b in "${BUDGETS[@]}"; do
  name="${b%%|*}"; ovr="${b#*|}"
  for m in ${METHODS:-sft kd gkd}; do
    for t in control distillable undistillable; do
      jobs+=("$name $m $t $ovr")
    done
  done
done
printf '%s\n' "${jobs[@]}" | timeout "${JOBS_LIMIT:-470}" xargs -P "${PARALLEL:-12}" -I{} bash -c '
  set -- {}; name=$1 m=$2 t=$3; shift 3
  start=$(date +%s)
  '"$PY"' -m distillability.cli distill --config '"$CARRY"'/distill_$m.yaml teacher='"$CARRY"'/$t \
    student='"$CARRY"'/student output_dir='"$RUNS"'/$name/${m}_$t runtime.progress=false runtime.threads=1 \
    resume=false teacher_samples=null "$@" > '"$RUNS"'/$name.${m}_$t.log 2>&1
  rc=$?
  echo "$name $m $t rc=$rc $(( $(date +%s) - start ))s"
  [ $rc = 0 ] || tail -n 3 '"$RUNS"'/$name.${m}_$t.log
'
"$PY" - "$RUNS" "$OUT" <<'PY'
import json, sys
from pathlib import Path
runs, out = Path(sys.argv[1]), Path(sys.argv[2])
res = {}
for card in sorted(runs.glob("*/*/distill_card.json")):
    d = json.loads(card.read_text())
    res.setdefault(card.parent.parent.name, {})[card.parent.name] = {
        k: d.get(k) for k in ("student_accuracy", "student_accuracy_before", "teacher_sample_accuracy",
                              "final_loss", "wall_seconds")}
lines = ["| budget | method | control | distillable | undistillable | dist / control | undist / control |",
         "|---|---|---|---|---|---|---|"]
for b, cells in sorted(res.items()):
    for m in ("sft", "kd", "gkd"):
        acc = {t: cells.get(f"{m}_{t}", {}).get("student_accuracy") for t in ("control", "distillable", "undistillable")}
        if None in acc.values():
            lines.append(f"| {b} | {m} | incomplete: {acc} |"); continue
        c = max(acc["control"], 1e-9)
        lines.append(f"| {b} | {m} | {acc['control']:.2f} | {acc['distillable']:.2f} | {acc['undistillable']:.2f}"
                     f" | {acc['distillable'] / c:.2f} | {acc['undistillable'] / c:.2f} |")
(out / "budget.json").write_text(json.dumps(res, indent=1))
(out / "budget.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
