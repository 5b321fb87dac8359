"""The attack battery: the filters on hand-made scores, budget scaling, failed cells, the defenses, and a small
battery end to end on tiny models (resumable, reusing cells run elsewhere)."""

import dataclasses
import json

import pytest
import yaml

from distillability import protection
from distillability.config import load_config
from distillability.errors import ConfigError
from distillability.recipes import attack
from distillability.sample_filters import answer_only, pick_per_prompt

FAST = ["task.num_train=200", "task.num_eval=16", "attacker.runtime.progress=false", "attacker.max_new_tokens=16",
        "attacker.eval_prompts=8", "attacker.per_device_train_batch_size=4", "attacker.save_steps=0",
        "attacker.warmup_steps=0"]


def test_best_of_n_keeps_the_correct_sample_the_student_finds_most_likely():
    rows = [{"prompt": "a", "response": "r1", "correct": 1.0}, {"prompt": "a", "response": "r2", "correct": 0.0},
            {"prompt": "a", "response": "r3", "correct": 1.0}, {"prompt": "b", "response": "s1", "correct": 0.0},
            {"prompt": "b", "response": "s2", "correct": 0.0}, {"prompt": "c", "response": "t1", "correct": 1.0}]
    scores = [-2.0, -0.1, -1.0, -3.0, -0.5, -9.0]
    # r2 is the most likely of prompt a but wrong: the correct r3 wins; b has no correct one: its most likely
    assert [r["response"] for r in pick_per_prompt(rows, scores)] == ["r3", "s2", "t1"]
    # the defender's least likely correct sample
    assert [r["response"] for r in pick_per_prompt(rows, scores, highest=False)] == ["r1", "s1", "t1"]
    # ties: the earliest; without prefer_correct the score alone decides
    assert [r["response"] for r in pick_per_prompt(rows[:3], [-1.0, -1.0, -1.0], prefer_correct=False)] == ["r1"]
    assert [r["response"] for r in pick_per_prompt(rows, scores, prefer_correct=False)] == ["r2", "s2", "t1"]
    with pytest.raises(ValueError):
        pick_per_prompt(rows, scores[:2])


def test_answer_only_removes_the_chain_of_thought_and_rescores():
    from distillability.config import TaskConfig

    task = TaskConfig(num_train=20, num_eval=4).load()
    e = next(x for x in task.train if x.family == "math")
    worked = e.solutions["worked"]
    wrong = " 1+1=2. #### 99999"
    rows = [{"prompt": e.prompt, "response": worked, "correct": 1.0},
            {"prompt": e.prompt, "response": wrong, "correct": 0.0},
            {"prompt": e.prompt, "response": " I do not know", "correct": 0.0}]
    out = answer_only(task, {e.prompt: e}, rows)
    assert out[0]["response"] == e.solutions["direct"] and out[0]["correct"] == 1.0
    assert out[1]["response"] == " #### 99999" and out[1]["correct"] == 0.0
    assert out[2]["response"] == "" and out[2]["correct"] == 0.0


def _cfg(tmp_path, tiny_pair, *extra):
    return load_config(attack.AttackConfig, overrides=[
        f"teachers.control={tiny_pair['teacher']}", f"teachers.undistillable={tiny_pair['teacher']}",
        f"students.default={tiny_pair['student']}", f"proxy={tiny_pair['student_same']}",
        f"output_dir={tmp_path / 'attack'}", "attacker.max_steps=2", "attacker.num_prompts=6", *FAST, *extra])


def test_budgets_scale_steps_and_prompts_and_keep_the_learning_rate(tmp_path, tiny_pair):
    cfg = _cfg(tmp_path, tiny_pair, "attacker.max_steps=120", "attacker.num_prompts=60", "attacker.learning_rate=5e-4",
               "task.num_train=500")
    by = {a.name: a for a in attack.FULL_BATTERY}
    for name, steps, prompts in (("sft@1x", 120, 60), ("kd@4x", 480, 240), ("gkd@10x", 1200, 500)):
        d = attack.cell_config(cfg, by[name], "control", 0, tmp_path / "x")
        # 10x asks for 600 prompts: capped at the 500 training prompts there are
        assert (d.max_steps, d.num_prompts, d.learning_rate, d.method) == (steps, prompts, 5e-4, by[name].method)
    d = attack.cell_config(cfg, by["sft-best-of-16"], "control", 2, tmp_path / "x")
    assert d.num_generations == 16 and d.keep_most_likely and d.keep_correct_only and d.runtime.seed == 2000
    d = attack.cell_config(cfg, by["sft-correct"], "control+least_likely", 0, tmp_path / "x")
    assert d.teacher_defense == "least_likely" and d.defense_model == tiny_pair["student_same"]
    assert attack.skip_reason(cfg, by["kd@1x"], "control+answer_only").startswith("a text-only defense")
    assert "students.unseen" in attack.skip_reason(cfg, by["sft-unseen-student"], "control")
    assert attack.skip_reason(cfg, by["sft@10x"], "control+answer_only") is None  # [] = every SFT attacker
    few = _cfg(tmp_path, tiny_pair, "defenses=[{name: control+answer_only, kind: answer_only, attackers: [sft@1x]}]")
    assert attack.skip_reason(few, by["sft@1x"], "control+answer_only") is None
    assert "attackers" in attack.skip_reason(few, by["sft@10x"], "control+answer_only")


def test_a_failed_cell_is_reported_not_dropped():
    ok = {"student_accuracy": 0.5, "student_accuracy_before": 0.25, "num_teacher_samples": 10,
          "settings": {"max_steps": 3, "num_prompts": 5}, "wall_seconds": 2.0}
    cell = attack.summarise([ok, {"failed": "loss is nan at step 2"}])
    assert cell["status"] == "partial" and cell["accuracy"] == 0.5 and cell["errors"] == ["loss is nan at step 2"]
    assert attack.summarise([{"failed": "x"}]) == {"status": "failed", "errors": ["x"]}
    cells = {"a": {"control": attack.summarise([ok]), "undistillable": attack.summarise([{**ok, "student_accuracy": 0.3}]),
                   "other": {"status": "failed", "errors": ["x"]}}}
    protection.relate(cells, "control")
    assert cells["a"]["undistillable"]["ratio"] == pytest.approx(0.6)
    assert cells["a"]["undistillable"]["gain_share"] == pytest.approx(0.05 / 0.25)
    assert "ratio" not in cells["a"]["other"]
    # a reference gain inside the noise (0.33 - 0.25 = 0.08 on 100 prompts: SE ~0.064, 2 SE ~0.13) gives no share:
    # a share of nothing measurable is not a number
    small = {**ok, "student_accuracy": 0.33, "settings": {**ok["settings"], "eval_prompts": 100}}
    cells = {"a": {"control": attack.summarise([small]), "undistillable": attack.summarise([{**small, "student_accuracy": 0.1}])}}
    protection.relate(cells, "control")
    assert cells["a"]["undistillable"]["reference_teaches"] is False and cells["a"]["undistillable"]["gain_share"] is None
    assert cells["a"]["undistillable"]["ratio"] == pytest.approx(0.1 / 0.33)
    # the SE of a cell: the larger of the spread's (std / sqrt n) and the binomial one of the pooled answers
    three = attack.summarise([{**small, "student_accuracy": a} for a in (0.2, 0.3, 0.4)])
    assert three["accuracy_se"] == pytest.approx(0.1 / 3 ** 0.5) and three["se_from"] == "spread"
    close = attack.summarise([{**small, "student_accuracy": a} for a in (0.299, 0.3, 0.301)])
    assert close["accuracy_se"] == pytest.approx((0.3 * 0.7 / 300) ** 0.5) and close["se_from"] == "binomial"
    assert attack.summarise([ok])["accuracy_se"] is None  # no eval_prompts recorded: no SE claimed
    assert protection.binomial_se(0.0, 100) == pytest.approx((0.01 * 0.99 / 100) ** 0.5)  # a 0 still has an SE


def test_gain_share_and_its_delta_method_se_against_a_float64_monte_carlo():
    """share = (a - b) / (r - b): the delta-method SE against the spread of the share over simulated reads."""
    import numpy as np

    a, r, b, se_a, se_r, se_b = 0.30, 0.60, 0.20, 0.01, 0.012, 0.008
    share, se = protection.gain_share(a, se_a, r, se_r, b, se_b)
    assert share == pytest.approx(0.25)
    rng = np.random.default_rng(0)
    n = 400_000
    sim = (a + se_a * rng.standard_normal(n) - (bb := b + se_b * rng.standard_normal(n))) / (
        r + se_r * rng.standard_normal(n) - bb)
    assert se == pytest.approx(sim.std(), rel=0.03)
    assert protection.gain_share(0.3, 0.01, 0.24, 0.01, 0.2, 0.01) == (None, None)  # +0.04: below MIN_GAIN
    assert protection.more_gain(0.7, 0.01, 0.6, 0.01) and not protection.more_gain(0.62, 0.01, 0.6, 0.01)


def test_protected_budget_is_the_largest_budget_whose_gain_share_stays_below_the_bar():
    battery = [attack.Attacker(name=f"sft@{b:g}x", budget=b) for b in (1.0, 4.0, 10.0)]
    ok = lambda share, g=0.3: {"status": "ok", "accuracy": 0.5, "gain_share": share, "reference_gain": g}  # noqa: E731
    cells = {"sft@1x": {"u": ok(0.2)}, "sft@4x": {"u": ok(0.45)}, "sft@10x": {"u": ok(0.9)}}
    p = protection.protected_budget(cells, battery, "u")["sft"]
    assert p["largest_budget_protected"] == 4.0 and p["gain_shares"] == {"1x": 0.2, "4x": 0.45, "10x": 0.9}
    # where the control teaches nothing at 1x the budget is skipped, not counted as protected
    cells["sft@1x"]["u"] = ok(None, -0.1)
    assert protection.protected_budget(cells, battery, "u")["sft"]["largest_budget_protected"] == 4.0
    cells["sft@4x"]["u"] = ok(0.7)
    p = protection.protected_budget(cells, battery, "u")
    assert p["sft"]["largest_budget_protected"] is None and p["sft"]["measurable"]
    from distillability.report.attack import headline_sentence

    text = headline_sentence({"protection": {"undistillable": p}})
    assert "SFT: not protected at any budget where it could be measured (gain share 1x not measurable (the control's " \
           "students gain -0.10), 4x 0.70, 10x 0.90)" in text
    nothing = {b: {"u": ok(None, -0.2)} for b in cells}
    text = headline_sentence({"protection": {"undistillable": protection.protected_budget(nothing, battery, "u")}})
    assert "SFT: no budget at which the control teaches, nothing to withhold" in text


def test_cost_multiplier_and_strongest_attack_against_hand_computed_values():
    import math

    battery = [attack.Attacker(name=f"sft@{b:g}x", budget=b) for b in (1.0, 4.0, 10.0)]
    battery += [attack.Attacker(name="sft-best-of-16", keep_correct_only=True, best_of=16),
                attack.Attacker(name="kd@1x", method="kd")]
    ok = lambda acc: {"status": "ok", "accuracy": acc, "base": 0.1}  # noqa: E731
    cells = {"sft@1x": {"c": ok(0.27), "u": ok(0.06)}, "sft@4x": {"c": ok(0.65), "u": ok(0.25)},
             "sft@10x": {"c": ok(0.82), "u": ok(0.90)}, "sft-best-of-16": {"c": ok(0.30), "u": ok(0.22)},
             "kd@1x": {"c": ok(0.20), "u": {"status": "failed"}}}
    cost = protection.cost_multiplier(cells, battery, "u", "c")
    assert set(cost) == {"sft"}  # one KD point of the reference, none of the teacher: no curve
    # 1x: 0.06 <= the control's 1x accuracy: at least 1 / 1
    assert cost["sft"]["1x"] == {"multiplier": 1.0, "bound": "at_least", "accuracy": 0.06}
    # 4x: 0.25 < 0.27, the control's smallest budget already teaches more: at least 4 / 1
    assert cost["sft"]["4x"]["multiplier"] == 4.0 and cost["sft"]["4x"]["bound"] == "at_least"
    # 10x: 0.90 above every control point: at most 10 / 10
    assert cost["sft"]["10x"] == {"multiplier": 1.0, "bound": "at_most", "accuracy": 0.90}
    cells["sft@10x"]["u"] = ok(0.70)  # between the control's 4x (0.65) and 10x (0.82), log-linear
    b_equal = math.exp(math.log(4) + (0.70 - 0.65) / (0.82 - 0.65) * math.log(10 / 4))
    got = protection.cost_multiplier(cells, battery, "u", "c")["sft"]["10x"]
    assert got["bound"] is None and got["multiplier"] == pytest.approx(10 / b_equal) and 1.90 < got["multiplier"] < 1.92
    strong = protection.strongest_attack(cells, battery, "u", "c")
    # at 1x the best against u is best-of-16 (0.22 > 0.06), and against c too (0.30 > 0.27 > 0.20)
    assert strong["1x"] == {"attacker": "sft-best-of-16", "accuracy": 0.22, "reference_attacker": "sft-best-of-16",
                            "reference_accuracy": 0.30, "ratio": pytest.approx(0.22 / 0.30),
                            "gain_share": pytest.approx(0.12 / 0.20), "gain_share_se": None}
    assert strong["10x"]["ratio"] == pytest.approx(0.70 / 0.82) and set(strong) == {"1x", "4x", "10x"}
    from distillability.report.attack import markdown

    text = markdown({"teachers": ["c", "u"], "reference": "c", "repeats": 1, "battery": [], "cells": {},
                     "cost_multiplier": {"u": protection.cost_multiplier(cells, battery, "u", "c")},
                     "strongest_attack": {"u": strong}})
    assert "| u | SFT | >= 1.00x | >= 4.00x | 1.91x |" in text and "| u | 1x | sft-best-of-16 | 0.220 |" in text


def test_config_errors_name_the_key(tiny_pair, tmp_path):
    for extra, needle in ((["reference=nobody"], "'reference'"), (["battery=[{name: x, methd: sft}]"], "battery[0].methd"),
                          (["battery=[{name: x, budget: 0}]"], "battery[0].budget"),
                          (["defenses=[{name: d, teacher: ghost}]"], "defenses[0].teacher"),
                          (["defenses=[{name: d, attackers: [sft@99x]}]"], "defenses[0].attackers")):
        with pytest.raises(ConfigError, match=__import__("re").escape(needle)):
            _cfg(tmp_path, tiny_pair, *extra)
    with pytest.raises(ConfigError, match="students.default"):
        load_config(attack.AttackConfig, overrides=[f"teachers.control={tiny_pair['teacher']}"])
    # without teachers (the pipeline's attack section, whose models the pipeline fills in) the section loads;
    # running it says what is missing, before any work
    partial = load_config(attack.AttackConfig, overrides=["repeats=3", f"output_dir={tmp_path / 'never'}"])
    with pytest.raises(ConfigError, match="'teachers'"):
        attack.run(partial)
    assert not (tmp_path / "never").exists()
    from distillability.recipes.pipeline import load_pipeline_config

    assert load_pipeline_config(None, ["attack_battery=full", "attack.repeats=3"]).attack.repeats == 3


@pytest.mark.slow
def test_small_battery_end_to_end_resumes_and_reuses(tiny_pair, tmp_path):
    import torch

    from distillability.models import load_model, save_model
    from distillability.recipes import distill

    # an attacker student whose weights are NaN: its loss is NaN at step 1
    broken, tok = load_model(tiny_pair["student"], device="cpu")
    with torch.no_grad():
        next(broken.parameters()).fill_(float("nan"))
    save_model(broken, tok, tmp_path / "nan_student")
    # a cell run elsewhere (the pipeline's distill stage) is read, not retrained
    elsewhere = tmp_path / "elsewhere"
    cfg0 = _cfg(tmp_path, tiny_pair)
    distill.run(attack.cell_config(cfg0, attack.Attacker(name="sft@1x"), "control", 0, elsewhere))
    battery = ("battery=[{name: sft@1x}, {name: sft@2x, budget: 2}, {name: best-of-2, keep_correct_only: false, "
               "best_of: 2}, {name: kd@1x, method: kd}, {name: sft-broken, student: broken}]")
    cfg = _cfg(tmp_path, tiny_pair, battery, "attacker.cross_tokenizer=char", "attacker.learning_rate=1e-3",
               "defenses=[{name: control+answer_only, kind: answer_only}, {name: control+least_likely, "
               "kind: least_likely, generations: 2}]", f"reuse={{sft@1x/control: {elsewhere}}}", f"students.broken={tmp_path / 'nan_student'}")
    result = attack.run(cfg)
    cells = result["cells"]
    assert cells["sft@1x"]["control"]["status"] == "ok"
    assert not (tmp_path / "attack" / "cells" / "sft@1x" / "control").exists()  # reused
    assert (tmp_path / "attack" / "cells" / "sft@1x" / "undistillable" / "r0" / "distill_card.json").exists()
    card = json.loads((tmp_path / "attack" / "cells" / "sft@2x" / "control" / "r0" / "distill_card.json").read_text())
    assert card["settings"]["max_steps"] == 4 and card["settings"]["num_prompts"] == 12
    # the same teacher under both roles, the same seed: the same student (ratio 1, or none when the reference is 0)
    two = cells["sft@2x"]
    assert two["undistillable"]["accuracy"] == two["control"]["accuracy"]
    assert two["undistillable"].get("ratio") in (None, pytest.approx(1.0))
    # best-of-2: one sample per prompt, the one the student found most likely
    samples = (tmp_path / "attack" / "cells" / "best-of-2" / "control" / "r0" / "teacher_samples.jsonl").read_text()
    assert len(samples.splitlines()) == 6
    # the defenses: answer-only samples, one least-likely sample per prompt; no KD against a text-only defense
    ans = [json.loads(x)["response"] for x in (tmp_path / "attack" / "cells" / "sft@1x" / "control+answer_only" / "r0"
                                                / "teacher_samples.jsonl").read_text().splitlines()]
    assert all(r == "" or r.startswith(" #### ") for r in ans)
    ll = (tmp_path / "attack" / "cells" / "sft@1x" / "control+least_likely" / "r0" / "teacher_samples.jsonl")
    assert len(ll.read_text().splitlines()) == 6
    assert cells["kd@1x"]["control+answer_only"]["status"] == "skipped"
    # a NaN loss: the cell is reported failed with the error, the battery goes on
    assert cells["kd@1x"]["control"]["status"] == "ok"
    assert cells["sft-broken"]["control"]["status"] == "failed" and "nan" in cells["sft-broken"]["control"]["errors"][0]
    out = tmp_path / "attack"
    assert {"attack.json", "attack.md", "attack_budget.png", "attack_variants.png"} <= {p.name for p in out.iterdir()}
    assert "sft@2x" in (out / "attack.md").read_text()
    # KD at the SFT cell's budget and repeat trains on that cell's teacher samples, drawn once (the same teacher
    # file under both roles here); a budget with other prompts draws its own
    import yaml

    def used(cell):
        return yaml.safe_load((out / "cells" / cell / "r0" / "config.yaml").read_text())["teacher_samples"]

    # (the reused 1x cell's samples were drawn with the same settings and seed: they serve its sampling key)
    first = elsewhere / "teacher_samples.jsonl"
    assert used("kd@1x/control") == str(first) and used("sft@1x/undistillable") == str(first)
    assert used("sft@2x/control") is None
    assert (out / "cells" / "kd@1x" / "control" / "r0" / "teacher_samples.jsonl").read_text() == first.read_text()
    assert used("sft@1x/control+answer_only") is None  # a defended teacher's samples are its own
    # resumable: a rerun trains nothing (every cell reused) and gives the same numbers
    mtime = (out / "cells" / "sft@2x" / "control" / "r0" / "distill_card.json").stat().st_mtime_ns
    again = attack.run(cfg)
    assert again["cells"]["sft@2x"]["control"]["accuracy"] == cells["sft@2x"]["control"]["accuracy"]
    assert (out / "cells" / "sft@2x" / "control" / "r0" / "distill_card.json").stat().st_mtime_ns == mtime


def test_the_pipeline_attacks_the_teachers_it_is_told_and_always_the_control():
    from distillability.recipes.pipeline import attack_roles, load_pipeline_config

    teachers = dict.fromkeys(("original", "control", "distillable", "undistillable"), "path")
    assert attack_roles(load_pipeline_config(None, []), teachers) == ["control", "undistillable"]  # small
    assert attack_roles(load_pipeline_config(None, ["attack_battery=full"]), teachers) == list(teachers)
    chosen = load_pipeline_config(None, ["attack_battery=full", "attack_teachers=[undistillable]"])
    assert attack_roles(chosen, teachers) == ["control", "undistillable"]
    assert attack_roles(chosen, {"control": "path"}) == ["control"]
    # a second proxy's teacher is a role of its own, attacked in the order given
    extra = load_pipeline_config(None, ["attack_battery=custom", "extra_proxies={attacker: some/model}",
                                        "attack_teachers=[undistillable@attacker, undistillable]"])
    teachers["undistillable@attacker"] = "path"
    assert attack_roles(extra, teachers) == ["control", "undistillable@attacker", "undistillable"]
    with pytest.raises(ConfigError, match="'attack_teachers': 'undistillable@other'"):
        load_pipeline_config(None, ["extra_proxies={attacker: some/model}", "attack_teachers=[undistillable@other]"])


def test_budget_curves_group_plain_attackers_by_method_and_student():
    A = attack.Attacker
    battery = [A(name="sft@1x"), A(name="sft@4x", budget=4), A(name="kd@1x", method="kd"),
               A(name="p-sft@1x", student="p", learning_rate=5e-5), A(name="p-sft@4x", student="p", budget=4,
                                                                        learning_rate=5e-5),
               A(name="q-sft@1x", student="q"),  # one point of another student: a variant, no curve
               A(name="sft-lr", learning_rate=1e-2),  # the default student at another rate: a variant
               A(name="best-of-4", keep_correct_only=True, best_of=4)]
    curves = protection.budget_curves(battery)
    assert {k: [a.name for a in v] for k, v in curves.items()} == {
        "sft": ["sft@1x", "sft@4x"], "kd": ["kd@1x"], "sft:p": ["p-sft@1x", "p-sft@4x"]}
    assert protection.curve_label("sft:p") == "SFT (p)" and protection.curve_label("kd") == "KD"
    # the same from attack.json's dicts
    assert protection.curve_of([dataclasses.asdict(a) for a in battery]) == protection.curve_of(battery)
    # a student's curve is read against the reference's cells of the same attackers, over that student's base
    cells = {"p-sft@1x": {"c": {"status": "ok", "accuracy": 0.50, "accuracy_se": 0.02, "base": 0.20, "base_se": 0.02},
                          "u": {"status": "ok", "accuracy": 0.29, "accuracy_se": 0.02, "base": 0.20, "base_se": 0.02}},
             "p-sft@4x": {"c": {"status": "ok", "accuracy": 0.70, "accuracy_se": 0.02, "base": 0.20, "base_se": 0.02},
                          "u": {"status": "ok", "accuracy": 0.60, "accuracy_se": 0.02, "base": 0.20, "base_se": 0.02}}}
    protection.relate(cells, "c")
    p = protection.protected_budget(cells, battery, "u")["sft:p"]
    assert p["gain_shares"]["1x"] == pytest.approx(0.3) and p["gain_shares"]["4x"] == pytest.approx(0.8)
    assert p["largest_budget_protected"] == 1.0


@pytest.mark.slow
def test_a_primed_student_is_the_base_of_its_cells(tiny_pair, tmp_path):
    cfg = _cfg(tmp_path, tiny_pair, f"students.other={tiny_pair['student_same']}", "repeats=1", "defenses=[]",
               "prime.students=[other]", "prime.num_prompts=16", "prime.max_steps=3", "prime.learning_rate=3e-3",
               "battery=[{name: o@1x, student: other, learning_rate: 1e-3}, "
               "{name: o@2x, student: other, budget: 2, learning_rate: 1e-3, repeats: 2}]")
    result = attack.run(cfg)
    primed = tmp_path / "attack" / "primed" / "other"
    card = json.loads((primed / "distill_card.json").read_text())
    # the priming trained on the first 16 training prompts' direct answers (' #### ANSWER'), nothing else
    rows = [json.loads(x) for x in (primed / "teacher_samples.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and all(r["response"].startswith(" #### ") for r in rows)
    assert card["settings"]["max_steps"] == 3
    # every cell of that student starts from the primed model: its base is the priming's accuracy after
    c1, c2 = (result["cells"][n]["control"] for n in ("o@1x", "o@2x"))
    assert c1["base"] == pytest.approx(card["student_accuracy"]) == c2["base"]
    assert c2["n_students"] == 2 and c1["n_students"] == 1  # the attacker's own repeats
    cell_cfg = yaml.safe_load((tmp_path / "attack" / "cells" / "o@1x" / "control" / "r0" / "config.yaml").read_text())
    assert cell_cfg["student"] == str(primed / "model") and cell_cfg["learning_rate"] == 1e-3
    assert result["battery"][0]["curve"] == "sft:other" and "sft:other" in result["protection"]["undistillable"]
    s = result["students"]["other"]
    assert s["primed"]["accuracy_after"] == card["student_accuracy"] and s["primed"]["answers"] == 16
    with pytest.raises(ConfigError, match="'prime.style': 'terse'"):
        attack.run(dataclasses.replace(cfg, prime=dataclasses.replace(cfg.prime, style="terse")))
    text = (tmp_path / "attack" / "attack.md").read_text()
    assert "`other`" in text and "primed on 16 direct answers" in text and "SFT (other)" in text


def test_keys_added_for_pretrained_attackers_leave_earlier_stages_reused():
    """A stage saved before prime, per-attacker repeats/batch and eval_offset existed compares equal to the same
    stage now, where those keys are at their defaults (so a finished attack or evaluation is not run again)."""
    from distillability.config import LATER_KEYS, to_dict
    from distillability.recipes import evaluate
    from distillability.recipes.stages import stage_config_text

    assert LATER_KEYS["prime"] == to_dict(attack.PrimeConfig())
    text = yaml.safe_load(stage_config_text(attack.AttackConfig()))
    assert "prime" not in text and all("repeats" not in a and "per_device_train_batch_size" not in a
                                       for a in text["battery"])
    assert "eval_offset" not in yaml.safe_load(stage_config_text(evaluate.EvaluateConfig()))
    primed = attack.AttackConfig(prime=attack.PrimeConfig(students=["p"]))
    assert yaml.safe_load(stage_config_text(primed))["prime"]["students"] == ["p"]


def test_a_primed_attack_student_is_an_extra_proxy_at_its_own_eta(tiny_pair, tmp_path, monkeypatch):
    from distillability.recipes import pipeline

    base = ["attack_battery=custom", f"teacher={tiny_pair['teacher']}", f"proxy={tiny_pair['student_same']}",
            f"student={tiny_pair['student']}", "task.num_train=200", "task.num_eval=16", "converge_steps=0",
            f"attack.students.other={tiny_pair['student_same']}", "attack.prime.students=[other]",
            "attack.prime.num_prompts=16", "attack.prime.max_steps=2", "distill.max_new_tokens=16",
            "progress=false", "distill.eval_prompts=8", f"output_dir={tmp_path}"]
    with pytest.raises(ConfigError, match="'extra_proxies.p': 'primed:nobody' names no primed attack student"):
        pipeline.load_pipeline_config(None, [*base, "extra_proxies={p: 'primed:nobody'}"])
    with pytest.raises(ConfigError, match="'extra_etas.q': no extra proxy has that label"):
        pipeline.load_pipeline_config(None, [*base, "extra_proxies={p: 'primed:other'}", "extra_etas={q: 2}"])
    with pytest.raises(ConfigError, match="'extra_etas.p': -1.0 is not > 0"):
        pipeline.load_pipeline_config(None, [*base, "extra_proxies={p: 'primed:other'}", "extra_etas={p: -1}"])
    cfg = pipeline.load_pipeline_config(None, [*base, "extra_proxies={p: 'primed:other', p2: 'primed:other', "
                                                      "raw: some/model}", "extra_etas={p2: 2.5}",
                                               "extra_calibrate={p2: {beta: 0.5}}"])
    c = pipeline.Chain(cfg)
    c.models = {"teacher": tiny_pair["teacher"], "proxy": tiny_pair["student_same"], "student": tiny_pair["student"]}
    calibrations = {}

    def stage(name, scfg, marker, fn, under=None):  # the calibrations are recorded, not run (the priming runs)
        calibrations[name] = scfg
        return {}

    monkeypatch.setattr(c, "stage", stage)
    teachers, _ = pipeline.calibrate_teachers(c, tiny_pair["teacher"])
    primed = tmp_path / "attack" / "primed" / "other"
    assert (primed / "distill_card.json").exists()  # primed once, in the folder the attack stage reuses
    got = {n: (s.proxy, s.eta) for n, s in calibrations.items()}
    assert got["calibrate_undistillable@p"] == (str(primed / "model"), cfg.eta_undistillable)
    assert got["calibrate_undistillable@p2"] == (str(primed / "model"), 2.5)
    assert got["calibrate_undistillable@raw"] == ("some/model", cfg.eta_undistillable)
    assert calibrations["calibrate_undistillable@p2"].beta == 0.5  # its own settings; the others keep calibrate's
    assert {s.beta for n, s in calibrations.items() if n != "calibrate_undistillable@p2"} == {cfg.calibrate.beta}
    assert got["calibrate_undistillable"] == (tiny_pair["student_same"], cfg.eta_undistillable)
    assert list(teachers) == ["original", *cfg.roles()[1:]]
    unprimed = pipeline.Chain(pipeline.load_pipeline_config(None, [*base, "extra_proxies={p: x, p2: y, raw: z}"]))
    assert c.total == unprimed.total + 1  # one priming step announced, however many labels use it


def test_an_extra_proxy_has_its_own_calibrate_settings():
    from distillability.recipes import pipeline

    base = ["extra_proxies={adaptive: some/model, plain: other/model}", "calibrate.max_steps=7"]
    cfg = pipeline.load_pipeline_config(None, [*base, "extra_calibrate={adaptive: {proxy_updates: 4, "
                                                      "proxy_learning_rate: 5e-5}}"])
    a, p = cfg.calibrate_of("adaptive"), cfg.calibrate_of("plain")
    assert (a.proxy_updates, a.proxy_learning_rate, a.max_steps) == (4, 5e-5, 7)  # on top of `calibrate`
    assert p is cfg.calibrate and cfg.calibrate.proxy_updates == 0
    for bad, msg in (("{adaptive: {proxy_update: 4}}", "unknown config key 'extra_calibrate.adaptive.proxy_update' "
                                                      r"\(did you mean 'extra_calibrate.adaptive.proxy_updates'\?\)"),
                     ("{adaptive: {proxy_updates: many}}", "'extra_calibrate.adaptive.proxy_updates': expected an "
                                                           "integer"),
                     ("{adaptive: {eta: 2}}", r"'extra_calibrate.adaptive.eta': the pipeline sets it \(use "
                                              r"extra_etas.adaptive\)"),
                     ("{nobody: {beta: 0.1}}", "'extra_calibrate.nobody': no extra proxy has that label")):
        with pytest.raises(ConfigError, match=msg):
            pipeline.load_pipeline_config(None, [*base, f"extra_calibrate={bad}"])
