"""The mechanism on a tiny world: calibration moves D(pi_theta || pi_C) in the direction of eta while
accuracy holds, and each distillation method lifts a weak student above its starting accuracy."""

import pytest

from distillability.config import load_config
from distillability.recipes import calibrate, distill

from .conftest import SMALL_WORLD_TASK

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("eta", [-1.0, 1.0])
def test_calibration_moves_divergence_in_the_direction_of_eta(small_world, tmp_path, eta):
    card = calibrate.run(load_config(calibrate.CalibrateConfig, overrides=[
        f"model={small_world['teacher']}", f"proxy={small_world['proxy']}", f"eta={eta}", "max_steps=60",
        "num_generations=8", "prompts_per_step=8", "learning_rate=1e-4", "beta=0.04", "max_completion_length=64",
        "eval_prompts=64", "eval_generations=4", f"output_dir={tmp_path}", "runtime.progress=false", *SMALL_WORLD_TASK]))
    moved = card["after_D_per_char"] - card["before_D_per_char"]
    assert moved * eta > 0, card
    # the teacher keeps its utility: accuracy does not fall by more than 10 points (RL may raise it)
    assert card["after_accuracy"] >= card["before_accuracy"] - 0.10, card


@pytest.mark.parametrize("method", ["sft", "kd", "gkd"])
def test_each_method_lifts_the_weak_student(small_world, tmp_path, method):
    card = distill.run(load_config(distill.DistillConfig, overrides=[
        f"teacher={small_world['teacher']}", f"student={small_world['student']}", f"method={method}",
        "cross_tokenizer=char", "max_steps=100", "per_device_train_batch_size=16", "num_prompts=400",
        "learning_rate=3e-3", "max_new_tokens=64", "eval_prompts=64", f"output_dir={tmp_path}",
        "runtime.progress=false", *SMALL_WORLD_TASK]))
    assert card["student_accuracy"] > card["student_accuracy_before"] + 0.05, card
