"""Estimators, metrics, failure modes, verifiers, configs."""

import itertools
import math
import random

import pytest
import torch

from distillability.config import ConfigError, load_config, parse_overrides
from distillability.estimators import effective_sample_size, kl_estimators, off_policy_reverse_kl
from distillability.failure_modes import classify
from distillability.grpo import (
    compute_advantages,
    gate_calibration_reward,
    grpo_loss,
    k3,
)
from distillability.metrics import pass_at_k, wrong_trace_preference
from distillability.recipes.calibrate import CalibrateConfig
from distillability.tasks.verifiers import extract_choice, extract_math_answer, math_equal, rouge_l


# ---------------------------------------------------------------- estimators against closed forms
def test_sequence_kl_estimators_converge_to_exact_kl():
    # two distributions over 6 "sequences": exact KL(p||q) vs Monte-Carlo estimators from y ~ p
    p = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04], dtype=torch.float64)
    q = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.1, 0.1], dtype=torch.float64)
    exact = (p * (p / q).log()).sum().item()
    g = torch.Generator().manual_seed(0)
    y = torch.multinomial(p, 200_000, replacement=True, generator=g)
    est = kl_estimators(p.log()[y], q.log()[y])
    assert abs(est["k1"] - exact) < 0.01 and abs(est["k3"] - exact) < 0.01
    assert est["k3_var"] < est["k1_var"]  # k3 is the low-variance estimator here


def test_off_policy_reverse_kl_importance_weighting():
    pt = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    ps = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    exact = (ps * (ps / pt).log()).sum().item()  # KL(S||T)
    y = torch.multinomial(pt, 400_000, replacement=True, generator=torch.Generator().manual_seed(1))
    r = off_policy_reverse_kl(ps.log()[y], pt.log()[y])
    assert abs(r["estimate"] - exact) < 0.01
    assert abs(r["estimate_self_normalised"] - exact) < 0.01
    assert 0 < r["ess"] < r["n"]


def test_effective_sample_size_closed_forms():
    assert effective_sample_size(torch.zeros(10)) == pytest.approx(10)
    assert effective_sample_size(torch.tensor([0.0, -1e9, -1e9])) == pytest.approx(1)
    w = torch.tensor([1.0, 2.0, 3.0])
    assert effective_sample_size(w.log()) == pytest.approx(36 / 14)


# ---------------------------------------------------------------- pass@k
@pytest.mark.parametrize("n,c,k,want", [(5, 0, 1, 0.0), (5, 5, 3, 1.0), (5, 2, 5, 1.0), (4, 1, 1, 0.25),
                                        (4, 2, 2, 1 - 1 / 6), (10, 3, 4, 1 - math.comb(7, 4) / math.comb(10, 4))])
def test_pass_at_k_closed_form(n, c, k, want):
    assert pass_at_k(n, c, k) == pytest.approx(want)


def test_pass_at_k_equals_brute_force_over_subsets():
    rng = random.Random(0)
    for _ in range(30):
        n = rng.randint(1, 7)
        outcomes = [rng.random() < 0.4 for _ in range(n)]
        k = rng.randint(1, n)
        subsets = list(itertools.combinations(outcomes, k))
        brute = sum(any(s) for s in subsets) / len(subsets)
        assert pass_at_k(n, sum(outcomes), k) == pytest.approx(brute)


def test_pass_at_k_rejects_k_above_n():
    with pytest.raises(ConfigError):
        pass_at_k(3, 1, 4)


def test_wrong_trace_preference_hand_case():
    groups = [[(True, -0.5), (False, -0.2), (False, -0.9)],  # pairs: wrong wins 1 of 2
              [(True, -0.1), (True, -0.3)],  # no incorrect trace: skipped
              [(True, -0.4), (False, -0.4)]]  # tie counts one half
    r = wrong_trace_preference(groups)
    assert r["pairs"] == 3 and r["prompts"] == 2 and r["rate"] == pytest.approx(1.5 / 3)


# ---------------------------------------------------------------- failure modes
def test_failure_modes_on_hand_written_responses():
    assert classify(" 3+4=7. #### 7", correct=True, has_answer=True) == "correct"
    assert classify(" 3+4=8. #### 8", correct=False, has_answer=True, answer_prob=0.3) == "wrong"
    assert classify(" 3+4=8. #### 8", correct=False, has_answer=True, answer_prob=0.95) == "overconfident"
    assert classify(" 9 9 9 9 9 9 9 9 9 9 9 9 9 9 9 #### 9", correct=False, has_answer=True) == "degradation"
    assert classify(" 3+4=7, 3+4=7, 3+4=7, 3+4=7, 3+4=7", correct=False, has_answer=False) == "degradation"
    assert classify(" 3+4=7, 7+2=9", correct=False, has_answer=False, finished=False) == "self_correction"
    wait = " Let me check. 3+4=7\nWait, 3+4=7\nWait, 3+4=7\n#### 7"
    assert classify(wait, correct=True, has_answer=True) == "self_correction"
    assert classify(" 3+4=7. #### 7", correct=True, has_answer=True, well_formed=False) == "degradation"


# ---------------------------------------------------------------- verifiers
def test_math_extraction_and_equivalence():
    assert extract_math_answer("so 5+5=10\n#### 1,234") == "1,234"
    assert math_equal(extract_math_answer("The answer is \\boxed{3/4}"), "0.75")
    assert math_equal("$18.00", "18")
    assert not math_equal("17", "18")
    assert extract_math_answer("no number here", strict=True) is None
    assert extract_choice("I think the answer is (C).") == "C"
    assert extract_choice("#### B") == "B"
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    assert rouge_l("dog", "the cat") == 0.0


def test_verifier_on_adversarial_input():
    """A 17,500-character nest of brackets (a catastrophic-backtracking regex would hang here) gives no answer
    equal to 3, and the last number wins where one is marked."""
    evil = "(" * 5000 + "1+" * 2500 + ")" * 5000
    assert not math_equal(extract_math_answer(evil), "3")
    assert extract_math_answer(evil + " #### 7") == "7"


# ---------------------------------------------------------------- configs
def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'etaa'.*'eta'"):
        load_config(CalibrateConfig, overrides=["etaa=1"])
    with pytest.raises(ConfigError, match="'num_generations'"):
        load_config(CalibrateConfig, overrides=["num_generations=1"])
    with pytest.raises(ConfigError, match="'learning_rate'"):
        load_config(CalibrateConfig, overrides=["learning_rate=-1"])
    with pytest.raises(ConfigError, match="'max_steps': expected an integer"):
        load_config(CalibrateConfig, overrides=["max_steps=ten"])
    with pytest.raises(ConfigError, match="'task.nmae'"):
        load_config(CalibrateConfig, overrides=["task.nmae=x"])
    f = tmp_path / "c.yaml"
    f.write_text("eta: 0.5\ntask:\n  num_train: 7\n")
    cfg = load_config(CalibrateConfig, str(f), ["--beta", "0.1", "--task.seed=3"])
    assert (cfg.eta, cfg.beta, cfg.task.num_train, cfg.task.seed) == (0.5, 0.1, 7, 3)
    assert parse_overrides(["a.b=1", "--c", "x", "--flag"]) == {"a": {"b": 1}, "c": "x", "flag": True}


def test_cli_config_typo_exits_2_with_one_line():
    from click.testing import CliRunner

    from distillability.cli import main

    r = CliRunner().invoke(main, ["distill", "methd=sft"])
    assert r.exit_code == 2
    assert r.output.strip().count("\n") == 0 and "methd" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["evaluate", "model=/no/such/folder"])
    assert r.exit_code == 2 and "/no/such/folder" in r.output


# ---------------------------------------------------------------- GRPO pieces
def test_advantages_hand_computed():
    r_task = torch.tensor([1.0, 0.0, 1.0, 1.0])  # two groups of 2: [1,0] and [1,1] (flat)
    r_cal = torch.tensor([0.2, 0.4, 0.1, 0.3])
    ema = {}
    adv = compute_advantages(r_task, r_cal, eta=-0.5, G=2, ema=ema, decay=0.9)
    s = math.sqrt(0.5)  # sample std of [1, 0]
    a_task0 = (1 - 0.5) / (s + 1e-4)
    # flat group [1, 1] falls back to the running stats of this batch: mean 0.75, std of [1,0,1,1]
    run_mean, run_std = 0.75, torch.tensor([1.0, 0.0, 1.0, 1.0]).std().item()
    a_task2 = (1 - run_mean) / (run_std + 1e-4)
    sc = math.sqrt(0.02)  # std of [0.2, 0.4] and of [0.1, 0.3]
    a_cal0 = (0.2 - 0.3) / (sc + 1e-4)
    want = torch.tensor([a_task0 - 0.5 * a_cal0, -a_task0 + 0.5 * a_cal0, a_task2 - 0.5 * a_cal0, a_task2 + 0.5 * a_cal0])
    assert torch.allclose(adv.float(), want.float(), atol=1e-4)


def test_calibration_gate_by_hand():
    r_cal = torch.tensor([0.5, 2.0, -1.0, 3.0, 1.0, 4.0], dtype=torch.float64)  # groups of 3
    bad = torch.tensor([False, True, False, True, False, False])  # e.g. r_task < 1 with gate_on=wrong
    up = gate_calibration_reward(r_cal, bad, 3, eta=1.0, how="worst")  # eta > 0: the group's minimum
    assert up.tolist() == [0.5, -1.0, -1.0, 1.0, 1.0, 4.0]
    down = gate_calibration_reward(r_cal, bad, 3, eta=-1.0, how="worst")  # eta < 0: the group's maximum
    assert down.tolist() == [0.5, 2.0, -1.0, 4.0, 1.0, 4.0]
    assert gate_calibration_reward(r_cal, bad, 3, 1.0, "zero").tolist() == [0.5, 0.0, -1.0, 0.0, 1.0, 4.0]
    assert gate_calibration_reward(r_cal, bad, 3, 1.0, "off").tolist() == r_cal.tolist()
    # a gated wrong response never has a higher calibration advantage than a correct one in its group
    adv = compute_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0]), up, 1.0, 3, {})
    assert adv[1] < adv[0] and adv[3] < adv[4] < adv[5]


def test_calibration_gate_config():
    assert load_config(CalibrateConfig, overrides=["wellformed_gate=off"]).wellformed_gate == "off"  # not False
    with pytest.raises(ConfigError, match="gate_on"):
        load_config(CalibrateConfig, overrides=["gate_on=wrong", "wellformed_gate=off"])


def test_k3_formula_and_loss_types():
    lp = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-1.5, -2.0, -0.1]])
    d = ref - lp
    assert torch.allclose(k3(ref, lp), torch.exp(d) - d - 1)
    assert (k3(ref, lp) >= 0).all() and k3(lp, lp).abs().max() == 0
    mask = torch.tensor([[1, 1, 0]])
    adv = torch.tensor([2.0])
    loss, clip, kl = grpo_loss(lp, lp.detach(), ref, adv, mask, 0.2, 0.1, "grpo", 4)
    want = (-2.0 + 0.1 * k3(ref, lp)[0, :2]).mean()
    assert loss.item() == pytest.approx(want.item(), abs=1e-6)
    loss_dr, _, _ = grpo_loss(lp, lp.detach(), ref, adv, mask, 0.2, 0.1, "dr_grpo", 4)
    assert loss_dr.item() == pytest.approx((-2.0 * 2 + 0.1 * k3(ref, lp)[0, :2].sum()).item() / 4, abs=1e-6)


def test_grpo_loss_length_bias_and_dr_grpo_without_it():
    """Two responses of 1 and 4 tokens with the same advantage: `grpo` (per-sequence mean) gives each token of
    the short one 4x the gradient of a token of the long one; `dr_grpo` and `dapo` give every token the same
    (1 / (2 * max_len) and 1 / 5): the bias that drifted the eta = 0 control to short answers."""
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]])
    adv = torch.tensor([1.0, 1.0])
    want = {"grpo": [[1 / 2, 0, 0, 0], [1 / 8] * 4], "dr_grpo": [[1 / 8, 0, 0, 0], [1 / 8] * 4],
            "dapo": [[1 / 5, 0, 0, 0], [1 / 5] * 4]}
    for loss_type, grad in want.items():
        lp = torch.full((2, 4), -1.0, dtype=torch.float64, requires_grad=True)
        loss, _, _ = grpo_loss(lp, lp.detach(), None, adv.double(), mask, 0.2, 0.0, loss_type, 4)
        loss.backward()
        assert torch.allclose(-lp.grad, torch.tensor(grad, dtype=torch.float64), atol=1e-12), loss_type
    assert CalibrateConfig().loss_type == "dr_grpo"


def test_preset_configs_load():
    from pathlib import Path

    from distillability.recipes.pipeline import load_pipeline_config

    for f in sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")):
        cfg = load_pipeline_config(str(f), None)
        assert cfg.output_dir


def test_deprecated_key_names_map_to_the_new_ones_with_one_warning(capsys):
    """One name per meaning: samples per prompt is num_generations, held-out prompts eval_prompts; the old keys
    still load for one release, with a one-line warning."""
    from distillability.config import from_dict
    from distillability.recipes.diagnose import DiagnoseConfig
    from distillability.recipes.distill import DistillConfig
    from distillability.recipes.evaluate import EvaluateConfig

    ev = from_dict(EvaluateConfig, {"n_samples": 3, "num_prompts": 7, "k": [1, 3]})
    assert ev.num_generations == 3 and ev.eval_prompts == 7
    assert from_dict(DiagnoseConfig, {"num_samples": 5}).num_generations == 5
    assert from_dict(DistillConfig, {"samples_per_prompt": 2}).num_generations == 2
    assert from_dict(CalibrateConfig, {"eval_samples": 4}).eval_generations == 4
    from_dict(EvaluateConfig, {"n_samples": 3, "k": [1]})
    err = capsys.readouterr().err.splitlines()
    assert err.count("warning: config key 'n_samples' is deprecated; use 'num_generations'") == 1
    with pytest.raises(ConfigError, match="'n_samples': deprecated name of 'num_generations'"):
        from_dict(EvaluateConfig, {"n_samples": 3, "num_generations": 3})
