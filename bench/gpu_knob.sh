#!/usr/bin/env bash
# The pipeline at a GPU size on one NVIDIA GPU: the tiny world with from-scratch models of tens of millions
# of parameters (teacher ~34M, student ~9M, proxy ~4M), bf16, more RL and distillation steps; writes the
# headline table to OUT/headline.md (and the full report to OUT/report.html). Budget: under 8 minutes on an
# H100/H200 (sized by estimate: step times of these sizes are latency-bound on a GPU).
#
#   bench/gpu_knob.sh [OUT] [key=value ...]        GPU size (needs CUDA; refuses without it)
#   bench/gpu_knob.sh --small [OUT] [key=value ...] the same chain at CPU smoke size (what the tests run)
#
# Extra key=value arguments override the pipeline config (e.g. seed=1 calibrate.max_steps=80).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
small=0
if [ "${1:-}" = "--small" ]; then small=1; shift; fi
OUT="${1:-runs/gpu_knob}"
[ $# -gt 0 ] && shift
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [ "$small" = 1 ]; then
  size=(quick=true threads=2 progress=false)
else
  if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_knob.sh: no CUDA device (use --small for the CPU smoke size)" >&2
    exit 2
  fi
  size=(
    world.teacher_size=[512,8,2048] world.proxy_size=[256,4,1024] world.student_size=[384,4,1536]
    world.teacher_steps=3000 world.proxy_steps=600 world.student_steps=150 world.batch_size=128
    world.learning_rate=1e-3
    task.num_train=8000 task.num_eval=400
    converge_steps=25
    calibrate.max_steps=60 calibrate.prompts_per_step=16 calibrate.num_generations=8 calibrate.eval_prompts=400
    calibrate.runtime.bf16=true
    distill.max_steps=300 distill.per_device_train_batch_size=64 distill.num_prompts=2000 distill.eval_prompts=400
    distill.learning_rate=1e-3 distill.runtime.bf16=true
    diagnose.eval_prompts=64 diagnose.runtime.bf16=true
    evaluate.eval_prompts=400 evaluate.num_generations=8 evaluate.k=[1,4,8] evaluate.runtime.bf16=true
    progress=false
  )
fi

start=$(date +%s)
"$PY" -m distillability.cli pipeline output_dir="$OUT" "${size[@]}" "$@"
end=$(date +%s)
device=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU")')
"$PY" - "$OUT" "$device" "$((end - start))" <<'PY'
import json, sys, datetime
from pathlib import Path
from distillability.report.protection import markdown_table
out, device, secs = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
head = json.loads((out / "headline.json").read_text())
text = (f"# gpu_knob: {datetime.date.today()}, {device}, {secs // 60}:{secs % 60:02d} wall\n\n"
        + markdown_table(head) + "\n")
(out / "headline.md").write_text(text, encoding="utf-8")
print(text)
PY
