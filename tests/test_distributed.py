"""Scale-out: `accelerate launch` with 2 processes on CPU (gloo) follows the 1-process loss curve with the
same global batch, and only rank 0 writes outputs."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

COMMON = ["task.num_train=100", "task.num_eval=8", "runtime.bf16=false", "runtime.threads=1", "runtime.progress=false",
          "save_steps=0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], processes: int, cwd: Path, fsdp: bool = False) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if processes == 1:
        cmd = [sys.executable, "-m", "distillability.cli", *args]
    else:
        mode = ["--use_fsdp", "--fsdp_version", "2"] if fsdp else ["--multi_gpu"]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), "-m", "distillability.cli", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    err = proc.stderr
    assert proc.returncode == 0, err if len(err) <= 9000 else f"{err[:6000]}\n[...]\n{err[-3000:]}"


def _log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def _max_weight_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    return max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)


@pytest.mark.parametrize("method", ["sft", "gkd"])
def test_distill_two_processes_match_one(tiny_pair, tmp_path, method):
    args = ["distill", f"teacher={tiny_pair['teacher']}", f"student={tiny_pair['student_same']}", f"method={method}",
            "max_steps=4", "num_prompts=16", "eval_prompts=4", "max_new_tokens=16", "lmbda=0.5", *COMMON]
    _run([*args, "output_dir=one", "per_device_train_batch_size=8"], 1, tmp_path)
    _run([*args, "output_dir=two", "per_device_train_batch_size=4"], 2, tmp_path)
    one, two = _log(tmp_path / "one"), _log(tmp_path / "two")
    assert len(one) == len(two) == 4  # rank 1 wrote no rows
    if method == "gkd":
        assert any(r["on_policy"] for r in one), "the seeds should give at least one on-policy step"
    for a, b in zip(one, two):
        assert a["on_policy"] == b["on_policy"]
        assert abs(a["loss"] - b["loss"]) < 1e-4, (a, b)
    # the teacher samples were drawn in two halves, one per process, and equal the 1-process samples
    assert (tmp_path / "one/teacher_samples.jsonl").read_text() == (tmp_path / "two/teacher_samples.jsonl").read_text()
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


@pytest.mark.parametrize("method", ["sft", "gkd"])
def test_distill_fsdp_matches_one(tiny_pair, tmp_path, method):
    """Sharded (FSDP2 through `accelerate launch --use_fsdp`): the same loss curve and final weights as one
    process with the global batch, a checkpoint that resumes, and rank 0 alone writing."""
    args = ["distill", f"teacher={tiny_pair['teacher']}", f"student={tiny_pair['student_same']}", f"method={method}",
            "num_prompts=16", "eval_prompts=4", "max_new_tokens=16", "lmbda=0.5", *COMMON]
    _run([*args, "max_steps=4", "output_dir=one", "per_device_train_batch_size=8"], 1, tmp_path)
    # 2 steps with a checkpoint, then resume to 4: the optimizer state is gathered and re-sharded
    _run([*args, "max_steps=2", "output_dir=fsdp", "per_device_train_batch_size=4", "save_steps=1"], 2, tmp_path,
         fsdp=True)
    _run([*args, "max_steps=4", "output_dir=fsdp", "per_device_train_batch_size=4", "save_steps=1", "resume=true"], 2,
         tmp_path, fsdp=True)
    one, two = _log(tmp_path / "one"), _log(tmp_path / "fsdp")
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        assert a["on_policy"] == b["on_policy"]
        assert abs(a["loss"] - b["loss"]) < 1e-4, (a, b)
    assert _max_weight_diff(tmp_path / "one/model", tmp_path / "fsdp/model") < 1e-4
    c1 = json.loads((tmp_path / "one/distill_card.json").read_text())
    c2 = json.loads((tmp_path / "fsdp/distill_card.json").read_text())
    assert c1["student_accuracy"] == c2["student_accuracy"]


def test_calibrate_two_processes_match_one(tiny_pair, tmp_path):
    args = ["calibrate", f"model={tiny_pair['teacher']}", f"proxy={tiny_pair['student']}", "eta=1", "max_steps=3",
            "num_generations=4", "eval_prompts=4", "eval_generations=1", "max_completion_length=16", *COMMON]
    _run([*args, "output_dir=one", "prompts_per_step=4"], 1, tmp_path)
    _run([*args, "output_dir=two", "prompts_per_step=2"], 2, tmp_path)
    one, two = _log(tmp_path / "one"), _log(tmp_path / "two")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        for key in ("loss", "task_reward", "r_cal", "response_chars"):
            assert abs(a[key] - b[key]) < 1e-4, (key, a, b)
    c1 = json.loads((tmp_path / "one/calibration_card.json").read_text())
    c2 = json.loads((tmp_path / "two/calibration_card.json").read_text())
    assert abs(c1["after_D_per_char"] - c2["after_D_per_char"]) < 1e-3


def test_calibrate_fsdp_matches_one(tiny_pair, tmp_path):
    """calibrate with the policy sharded (FSDP2): generation from gathered weights, the same rewards and loss
    curve as one process, and the utility guard's selected weights restored on every rank."""
    args = ["calibrate", f"model={tiny_pair['teacher']}", f"proxy={tiny_pair['student']}", "eta=1", "max_steps=3",
            "num_generations=4", "eval_prompts=4", "eval_generations=1", "max_completion_length=16",
            "min_accuracy_ratio=0.5", "guard_steps=1", "guard_prompts=4", *COMMON]
    _run([*args, "output_dir=one", "prompts_per_step=4"], 1, tmp_path)
    _run([*args, "output_dir=fsdp", "prompts_per_step=2"], 2, tmp_path, fsdp=True)
    one, two = _log(tmp_path / "one"), _log(tmp_path / "fsdp")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        for key in ("loss", "task_reward", "r_cal", "response_chars", "guard_val_accuracy"):
            assert abs(a[key] - b[key]) < 1e-4, (key, a, b)
    c1 = json.loads((tmp_path / "one/calibration_card.json").read_text())
    c2 = json.loads((tmp_path / "fsdp/calibration_card.json").read_text())
    assert c1["guard"] == c2["guard"]
    assert abs(c1["after_D_per_char"] - c2["after_D_per_char"]) < 1e-3
    assert _max_weight_diff(tmp_path / "one/model", tmp_path / "fsdp/model") < 1e-4
