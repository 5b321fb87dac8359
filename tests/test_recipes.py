"""The recipes on tiny models: calibrate (resume = uninterrupted), distill (each method, cross-tokenizer,
refusal), evaluate, diagnose, and the --quick pipeline end to end."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distillability.config import load_config
from distillability.errors import ConfigError, ModelError
from distillability.recipes import calibrate, diagnose, distill, evaluate

from .conftest import SMALL_WORLD_TASK

FAST = ["runtime.progress=false", "task.num_train=200", "task.num_eval=16"]


def test_calibrate_resume_equals_uninterrupted(tiny_pair, tmp_path):
    common = [f"model={tiny_pair['teacher']}", f"proxy={tiny_pair['student']}", "eta=1.0", "num_generations=2",
              "prompts_per_step=2", "max_completion_length=16", "eval_prompts=4", "eval_generations=1", *FAST]
    full = load_config(calibrate.CalibrateConfig, overrides=[*common, "max_steps=4", f"output_dir={tmp_path / 'a'}",
                                                             "save_steps=0"])
    card = calibrate.run(full)
    assert (tmp_path / "a" / "model" / "model.safetensors").exists()
    for key in ("eta", "beta", "before_accuracy", "after_accuracy", "before_D_per_char", "after_D_per_char"):
        assert key in card
    log = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 4 and {"task_reward", "r_cal", "kl_ref", "clip_frac", "tokens_per_s"} <= set(log[0])
    # "interrupted" after step 2 (a checkpoint at the end of a 2-step run), then resumed to 4 steps
    part = load_config(calibrate.CalibrateConfig, overrides=[*common, "max_steps=2", f"output_dir={tmp_path / 'b'}",
                                                             "save_steps=1"])
    calibrate.run(part)
    calibrate.run(load_config(calibrate.CalibrateConfig, overrides=[*common, "max_steps=4", "save_steps=1", "resume=true",
                                                                     f"output_dir={tmp_path / 'b'}"]))
    wa = load_file(str(tmp_path / "a" / "model" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_gradients_reach_only_the_policy(tiny_pair):
    from distillability.grpo import grpo_loss, per_token_logprobs
    from distillability.models import load_model

    policy, tok = load_model(tiny_pair["teacher"], device="cpu")
    proxy, _ = load_model(tiny_pair["student"], device="cpu")
    proxy.requires_grad_(False)
    ids = torch.tensor([tok("Q: 1+2=?\nA: #### 3")["input_ids"]])
    lp = per_token_logprobs(policy, ids, torch.ones_like(ids), False)
    import copy

    reference = copy.deepcopy(policy).requires_grad_(False)
    with torch.no_grad():
        ref = per_token_logprobs(reference, ids, torch.ones_like(ids), False)
    loss, _, _ = grpo_loss(lp, lp.detach(), ref, torch.tensor([1.0]), torch.ones_like(lp), 0.2, 0.1, "grpo", 8)
    loss.backward()
    assert all(p.grad is not None for p in policy.parameters() if p.requires_grad)
    assert all(p.grad is None for p in proxy.parameters())
    assert all(p.grad is None for p in reference.parameters())


@pytest.mark.parametrize("method,extra", [("sft", []), ("kd", []), ("gkd", ["lmbda=0.5"]),
                                          ("kd", ["teacher_top_k=5", "loss=jsd"])])
def test_distill_methods_same_vocabulary(tiny_pair, tmp_path, method, extra):
    cfg = load_config(distill.DistillConfig, overrides=[
        f"teacher={tiny_pair['teacher']}", f"student={tiny_pair['student_same']}", f"method={method}",
        "max_steps=3", "num_prompts=16", "per_device_train_batch_size=4", "max_new_tokens=16", "eval_prompts=4",
        f"output_dir={tmp_path}", *FAST, *extra])
    card = distill.run(cfg)
    _assert_trained(card, tmp_path, tiny_pair["student_same"], method, n_samples=16)


def _assert_trained(card: dict, out: Path, start: str, method: str, n_samples: int) -> None:
    """The card agrees with the log, the student moved from its start, and it learned from n_samples samples."""
    import math

    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and card["first_loss"] == rows[0]["loss"] > 0
    assert math.isfinite(card["final_loss"]) and card["final_loss"] == pytest.approx(sum(r["loss"] for r in rows) / 3)
    assert card["method"] == method and card["num_teacher_samples"] == n_samples
    assert len((out / "teacher_samples.jsonl").read_text().splitlines()) == n_samples
    a, b = load_file(str(Path(start) / "model.safetensors")), load_file(str(out / "model" / "model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a if k in b) > 1e-4


def test_kd_refuses_mismatched_tokenizers_naming_both(tiny_pair, tmp_path):
    cfg = load_config(distill.DistillConfig, overrides=[
        f"teacher={tiny_pair['teacher']}", f"student={tiny_pair['student']}", "method=kd", f"output_dir={tmp_path}", *FAST])
    with pytest.raises(ModelError, match=r"teacher's tokenizer .*tokens\) differs from the student's"):
        distill.run(cfg)


@pytest.mark.parametrize("method,xt", [("sft", "refuse"), ("kd", "char"), ("gkd", "uld")])
def test_distill_across_tokenizers(tiny_pair, tmp_path, method, xt):
    cfg = load_config(distill.DistillConfig, overrides=[
        f"teacher={tiny_pair['teacher']}", f"student={tiny_pair['student']}", f"method={method}", f"cross_tokenizer={xt}",
        "max_steps=3", "num_prompts=16", "per_device_train_batch_size=4", "max_new_tokens=16", "eval_prompts=4",
        f"output_dir={tmp_path}", *FAST])
    card = distill.run(cfg)
    _assert_trained(card, tmp_path, tiny_pair["student"], method, n_samples=16)
    assert card["cross_tokenizer"] == (None if method == "sft" else xt)


def test_evaluate_and_diagnose_write_their_files(tiny_pair, tmp_path):
    res = evaluate.run(load_config(evaluate.EvaluateConfig, overrides=[
        f"model={tiny_pair['teacher']}", f"proxy={tiny_pair['student']}", "eval_prompts=6", "num_generations=3", "k=[1,3]",
        "max_new_tokens=16", f"output_dir={tmp_path / 'e'}", *FAST]))
    assert 0 <= res["greedy_accuracy"] <= 1 and set(res["pass_at_k"]) == {"1", "3"}
    assert res["pass_at_k"]["3"] >= res["pass_at_k"]["1"]
    assert sum(res["failure_modes"].values()) == pytest.approx(1.0)
    assert (tmp_path / "e" / "eval.md").exists()
    # a validation slice: prompts 6-11, the greedy accuracy of exactly those (disjoint from the slice above)
    from distillability.evaluation import greedy_accuracy as _greedy

    val = evaluate.run(load_config(evaluate.EvaluateConfig, overrides=[
        f"model={tiny_pair['teacher']}", "eval_prompts=6", "eval_offset=6", "num_generations=1", "k=[1]",
        "max_new_tokens=16", f"output_dir={tmp_path / 'v'}", *FAST]))
    from distillability.models import load_model as _load

    m, t = _load(tiny_pair["teacher"], device="cpu")
    cfg0 = load_config(evaluate.EvaluateConfig, overrides=FAST)
    tk = cfg0.task.load()
    assert val["greedy_accuracy"] == pytest.approx(_greedy(m, t, tk, tk.eval[6:12], 16, False, False)[0])
    assert val["eval_offset"] == 6 and res["eval_offset"] == 0  # the report names a validation slice from it
    from distillability.report.protection import _slice_words

    assert _slice_words({"teachers": {"control": val}}).startswith("**Validation slice**: held-out prompts 6-11")
    assert _slice_words({"teachers": {"control": res}}) == ""
    with pytest.raises(ConfigError, match="'eval_offset'"):
        evaluate.run(load_config(evaluate.EvaluateConfig, overrides=[
            f"model={tiny_pair['teacher']}", "eval_prompts=6", f"eval_offset={cfg0.task.num_eval - 3}",
            f"output_dir={tmp_path / 'w'}", *FAST]))
    # D(model || proxy) is computed on the evaluation's own samples: the same as sampling them again
    from distillability.evaluation import mean_calibration_divergence
    from distillability.models import load_model

    model, tok = load_model(tiny_pair["teacher"], device="cpu")
    proxy, ptok = load_model(tiny_pair["student"], device="cpu")
    cfg = load_config(evaluate.EvaluateConfig, overrides=FAST)
    task = cfg.task.load()
    d = mean_calibration_divergence(model, tok, proxy, ptok, task.eval[:6], 16, 1.0, 3, seed=cfg.runtime.seed + 17)
    assert res["D_to_proxy_per_char"] == pytest.approx(d["per_char"], rel=1e-6)
    assert res["D_to_proxy_summed"] == pytest.approx(d["summed"], rel=1e-6)
    # the failure modes' answer confidences, batched, equal one scoring pass per response
    from distillability.scoring import sequence_logprobs

    items = [(e, f" {e.solution.split('####')[0]}#### {int(v) + 1}") for e, v in
             ((e, e.reference) for e in task.eval[:8] if e.family == "math")]
    batched = evaluate._answer_probs(model, tok, task, items, False)
    for (e, r), p in zip(items, batched):
        a = task.extract(e, r)
        cut = r.rfind(a)
        one = sequence_logprobs(model, tok, [e.prompt + r[:cut]], [a])["token_logprobs"][0].exp().mean().item()
        assert p == pytest.approx(one, rel=1e-4)
    assert len(batched) >= 3 and evaluate._answer_probs(model, tok, task, [(task.eval[0], " no answer")], False) == [None]
    rep = diagnose.run(load_config(diagnose.DiagnoseConfig, overrides=[
        f"teacher={tiny_pair['teacher']}", f"student={tiny_pair['student']}", "eval_prompts=4", "num_generations=2",
        "max_new_tokens=16", f"output_dir={tmp_path / 'd'}", *FAST]))
    out = Path(tmp_path / "d")
    assert json.loads((out / "diagnose.json").read_text())["kl"]["token_fkl_mean"] >= 0
    for p in rep["plots"]:
        assert (out / p).stat().st_size > 1000
    assert rep["kl"]["support"].startswith("next-character")


def test_demo_quick_end_to_end(tmp_path):
    from click.testing import CliRunner

    from distillability.cli import main

    r = CliRunner().invoke(main, ["demo", "--quick", "--output-dir", str(tmp_path / "run"), "progress=false"])
    assert r.exit_code == 0, r.output
    run = tmp_path / "run"
    headline = json.loads((run / "headline.json").read_text())
    assert set(headline["teachers"]) == {"original", "control", "distillable", "undistillable"}
    assert set(headline["students"]) == {"sft", "kd", "gkd"}
    for per in headline["students"].values():  # the original teacher is evaluated, not distilled (the preset)
        assert all(0 <= v <= 1 for v in per.values()) and set(per) == {"control", "distillable", "undistillable"}
    # the student base is evaluated on the same prompts as its distilled students
    base = json.loads((run / "eval" / "student_base" / "eval.json").read_text())
    assert headline["student_base"] == base["greedy_accuracy"] and base["num_prompts"] == 8
    for f in ("report.md", "report.html", "headline.png", "diagnose/diagnose.json", "evaluations.json",
              "calibrate_undistillable/calibration_card.json", "distill_gkd_control/distill_card.json"):
        assert (run / f).exists(), f
    assert "data:image/png;base64" in (run / "report.html").read_text()
    # the attack stage: the small battery against the control and undistillable teachers, its 1x cells read
    # from the distill stage (not retrained), an Attacks section with its plot in the report
    attacks = headline["attacks"]
    assert set(attacks["cells"]) == {"sft@1x", "sft@4x", "sft-best-of-4"}
    assert all(set(row) == {"control", "undistillable"} for row in attacks["cells"].values())
    one = json.loads((run / "attack" / "attack.json").read_text())["cells"]["sft@1x"]["control"]
    assert one["accuracy"] == headline["students"]["sft"]["control"] and not (run / "attack" / "cells" / "sft@1x").exists()
    cell = json.loads((run / "attack" / "cells" / "sft@4x" / "control" / "r0" / "distill_card.json").read_text())
    assert cell["settings"]["max_steps"] == 12 and cell["settings"]["num_prompts"] == 64
    report = (run / "report.md").read_text()
    assert "## Attacks" in report and "attack/attack_budget.png" in report
    # what the attacker pays and the strongest attack per budget, read from the same cells
    strong, u4 = attacks["strongest_attack"]["undistillable"], attacks["cells"]["sft@4x"]["undistillable"]
    if u4["status"] == "ok" and attacks["cells"]["sft@4x"]["control"]["status"] == "ok":
        assert strong["4x"]["attacker"] == "sft@4x" and strong["4x"]["accuracy"] == u4["accuracy"]
        assert set(attacks["cost_multiplier"]["undistillable"]["sft"]) == {"1x", "4x"}
        assert "What the attacker pays" in report and "The strongest attack per budget" in report
    # the report opens with the verdict, which says where the protection holds against the budget attackers (or
    # why there is no ratio to say it with)
    assert report.splitlines()[2] == "## Verdict" and f"> {attacks['summary']}" in report.splitlines()[4:12]
    assert "undistillable teacher" in attacks["summary"] and attacks["summary"] in headline["verdict"]
    assert "Verdict:" in r.output and headline["verdict"][0] in r.output
    # every saved model folder carries a Hugging Face model card saying what was done to it and what was measured
    from huggingface_hub import ModelCard

    card = ModelCard.load(run / "calibrate_undistillable" / "model" / "README.md")
    assert {"distillability", "calibrated-teacher", "eta-undistillable"} <= set(card.data.tags)
    assert "eta = +1" in card.text and "| proxy (the calibration's small model) |" in card.text
    assert "## Evaluation" in card.text and "| greedy accuracy | " in card.text.split("## Evaluation")[1]
    student = ModelCard.load(run / "distill_kd_control" / "model" / "README.md")
    assert "distilled-student" in student.data.tags and "by **KD**" in student.text
    # gains over the base with SEs, and a verdict that follows from them and first names whom it measured
    g = headline["gains"]["sft"]["control"]
    assert g["gain"] == pytest.approx(g["accuracy"] - headline["student_base"]) and g["gain_se"] > 0
    assert headline["verdict"][0].startswith("Measured against a ") and "trained from scratch" in headline["verdict"][0]
    teaches = [m for m, per in headline["gains"].items() if per["control"]["reference_teaches"]]
    assert ("does not teach" in headline["verdict"][1]) == (not teaches)
    assert not teaches or not any(x.startswith("No protection to measure") for x in headline["verdict"])
    assert "Gain over the student base" in r.output
    # a second run with the same config reuses every stage; a changed distill setting reruns the distillations
    # and the evaluations of the students they rewrote (not their cached numbers), and nothing upstream
    def stamps():
        return {str(f.relative_to(run)): f.stat().st_mtime_ns for f in run.rglob("*.json")
                if f.name in ("calibration_card.json", "distill_card.json", "eval.json")}

    first = stamps()
    r2 = CliRunner().invoke(main, ["demo", "--quick", "--output-dir", str(run), "progress=false"])
    assert r2.exit_code == 0 and stamps() == first
    r3 = CliRunner().invoke(main, ["demo", "--quick", "--output-dir", str(run), "progress=false", "distill.max_steps=4"])
    assert r3.exit_code == 0, r3.output
    changed = {k for k, v in stamps().items() if v != first[k]}
    students = {k for k in first if k.startswith(("distill_", "eval/student_", "attack/cells/"))
                and not k.startswith("eval/student_base/")}
    # 9 students, their 9 evaluations and every attack cell trained here (the 1x cells are the distill stage's;
    # a failed cell, e.g. no correct sample to keep, writes no card)
    cells = json.loads((run / "attack" / "attack.json").read_text())["cells"]
    trained = sum(c["status"] == "ok" for a in ("sft@4x", "sft-best-of-4") for c in cells[a].values())
    assert trained >= 2 and len(students) == 18 + trained
    assert changed == students, sorted(changed ^ students)  # the base is not rerun
    # the shifted split: every teacher also on chains one term longer than any it trained on (quick: 3 -> 4)
    # ... and two students per cell (SFT only): the second one of each teacher is distilled, the attack stage reads
    # both as its 1x cells and trains a second student for the others
    r4 = CliRunner().invoke(main, ["demo", "--quick", "--output-dir", str(run), "progress=false", "distill.max_steps=4",
                                   "shifted_terms=4", "students_per_cell=2", "methods=[sft]"])
    assert r4.exit_code == 0, r4.output
    head4 = json.loads((run / "headline.json").read_text())
    assert head4["gains"]["sft"]["control"]["n_students"] == 2 and set(head4["gains"]) == {"sft"}
    assert (run / "distill_sft_control_r1" / "distill_card.json").exists() and not (run / "attack" / "cells" / "sft@1x").exists()
    a4 = json.loads((run / "attack" / "attack.json").read_text())["cells"]
    assert a4["sft@1x"]["control"]["accuracies"] == head4["gains"]["sft"]["control"]["accuracies"]
    assert (run / "attack" / "cells" / "sft@4x" / "control" / "r1").exists()
    shifted = json.loads((run / "headline.json").read_text())["teachers_shifted"]
    assert set(shifted) == set(headline["teachers"]) and all(0 <= v <= 1 for v in shifted.values())
    ev = json.loads((run / "eval" / "teacher_control_shifted4" / "eval.json").read_text())
    assert ev["num_prompts"] == 8 and (ev["task"]["world_min_terms"], ev["task"]["world_max_terms"]) == (4, 4)
    assert ev["greedy_accuracy"] == shifted["control"]
    from distillability.config import TaskConfig, from_dict

    assert all(e.prompt.count("+") + e.prompt.count("-") == 3 for e in from_dict(TaskConfig, ev["task"]).load().eval)
    assert "teacher, shifted split" in (run / "report.md").read_text()


def test_trl_reward_adapter_equals_recipe_reward(tiny_pair):
    from distillability.grpo import calibration_reward
    from distillability.models import load_model
    from distillability.scoring import sequence_logprobs
    from distillability.trl_adapter import CalibrationReward

    policy, tok = load_model(tiny_pair["teacher"], device="cpu")
    proxy, ptok = load_model(tiny_pair["student"], device="cpu")
    prompts = ["Q: 1+2=?\nA:", "Q: 5-3=?\nA:"]
    completions = [" 1+2=3. #### 3", [{"role": "assistant", "content": " #### 2"}]]
    got = CalibrationReward(policy, tok, proxy, ptok)(prompts=prompts, completions=completions)
    texts = [" 1+2=3. #### 3", " #### 2"]
    own = sequence_logprobs(policy, tok, prompts, texts, True)
    prox = sequence_logprobs(proxy, ptok, prompts, texts, True)["logprob"]
    want = calibration_reward(own["logprob"], prox, texts, own["num_tokens"], "char", 5.0)
    assert torch.allclose(torch.tensor(got, dtype=torch.float64), want, atol=1e-9)
    # the cross-tokenizer reward equals the same-tokenizer reward when the tokenizers coincide: r_cal of a
    # model against itself is exactly 0
    self_r = CalibrationReward(policy, tok, policy, tok)(prompts=prompts, completions=texts)
    assert max(abs(x) for x in self_r) < 1e-9


def test_calibrate_logs_the_share_of_rewards_at_the_clip(tiny_pair, tmp_path):
    """r_cal_at_clip: with a clip far below any per-character log-ratio every response sits at it (1.0); with
    no clip none does (0.0)."""
    common = [f"model={tiny_pair['teacher']}", f"proxy={tiny_pair['student']}", "eta=1.0", "num_generations=2",
              "prompts_per_step=2", "max_completion_length=12", "eval_prompts=2", "eval_generations=1", "max_steps=1",
              "save_steps=0", *FAST]
    for clip, share in (("1e-9", 1.0), ("0", 0.0)):
        out = tmp_path / clip
        calibrate.run(load_config(calibrate.CalibrateConfig, overrides=[*common, f"cal_clip={clip}", f"output_dir={out}"]))
        log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
        assert log[0]["r_cal_at_clip"] == share


def test_calibrate_with_lora_saves_a_merged_plain_model(tiny_pair, tmp_path):
    from distillability.models import load_model

    card = calibrate.run(load_config(calibrate.CalibrateConfig, overrides=[
        f"model={tiny_pair['teacher']}", f"proxy={tiny_pair['student']}", "eta=-1.0", "use_peft=true", "lora_r=4",
        "learning_rate=1e-2", "num_generations=2", "prompts_per_step=2", "max_steps=2", "max_completion_length=12",
        "eval_prompts=2", "eval_generations=1", f"output_dir={tmp_path}", *FAST]))
    assert card["steps"] == 2
    merged, _ = load_model(str(tmp_path / "model"), device="cpu")
    base, _ = load_model(tiny_pair["teacher"], device="cpu")
    assert not any("lora" in k for k in merged.state_dict())
    diffs = [(a - b).abs().max().item() for a, b in zip(merged.state_dict().values(), base.state_dict().values())]
    assert max(diffs) > 0  # the adapters were trained and merged


def test_gkd_seq_kd_and_pipeline_stage_skips(tiny_pair, tmp_path):
    card = distill.run(load_config(distill.DistillConfig, overrides=[
        f"teacher={tiny_pair['teacher']}", f"student={tiny_pair['student_same']}", "method=gkd", "seq_kd=true",
        "lmbda=0.0", "max_steps=2", "num_prompts=8", "per_device_train_batch_size=2", "max_new_tokens=12",
        "eval_prompts=2", f"output_dir={tmp_path / 'g'}", *FAST]))
    assert card["settings"]["seq_kd"] is True
    from click.testing import CliRunner

    from distillability.cli import main

    r = CliRunner().invoke(main, ["demo", "--quick", "--output-dir", str(tmp_path / "skip"), "progress=false",
                                  "skip=[diagnose,calibrate,distill]"])
    assert r.exit_code == 0, r.output
    headline = json.loads((tmp_path / "skip" / "headline.json").read_text())
    assert set(headline["teachers"]) == {"original"} and headline["students"] == {} and "student_base" not in headline


def test_fused_kd_loss_equals_logits_loss(tiny_pair, monkeypatch):
    """distill's same-vocabulary token loss from hidden states + lm_head (chunked) equals the logits path."""
    from distillability import kd_loss
    from distillability.config import from_dict
    from distillability.models import load_model
    from distillability.recipes import distill

    teacher, ttok = load_model(tiny_pair["teacher"], device="cpu")
    student, stok = load_model(tiny_pair["student_same"], device="cpu")
    prompts, responses = ["Q: 1+2=?\nA:", "Q: 3+4+1=?\nA:"], [" 1+2=3. #### 3", " #### 8"]
    for kind, method in (("fkl", "kd"), ("jsd", "gkd")):
        cfg = from_dict(distill.DistillConfig, {"teacher": "t", "student": "s", "method": method, "chunk_size": 3,
                                                "runtime": {"bf16": False}})
        loss = kd_loss.token_loss(cfg, teacher, ttok, student, stok, kind)
        assert isinstance(loss, kd_loss.SameVocabLoss)
        fused = loss(prompts, responses, [True, True], False)
        monkeypatch.setattr(kd_loss, "lm_parts", lambda m: None)
        plain = loss(prompts, responses, [True, True], False)
        monkeypatch.undo()
        assert abs(fused.item() - plain.item()) < 1e-5 and fused.item() > 0


def test_distill_from_the_dataset_trains_on_reference_solutions(tiny_pair, tmp_path):
    """teacher=dataset: SFT on the task's own worked solutions (the real-model pipeline's teacher SFT stage)."""
    from distillability.errors import ConfigError
    from distillability.tasks import load_task

    card = distill.run(load_config(distill.DistillConfig, overrides=[
        "teacher=dataset", f"student={tiny_pair['student_same']}", "method=sft", "max_steps=4", "num_prompts=12",
        "per_device_train_batch_size=4", "max_new_tokens=16", "eval_prompts=4", "learning_rate=3e-3",
        "warmup_steps=0", f"output_dir={tmp_path}", *FAST]))
    rows = [json.loads(x) for x in (tmp_path / "teacher_samples.jsonl").read_text().splitlines()]
    train = load_task("tiny-world", num_train=200, num_eval=16, seed=0).train[:12]
    assert [r["response"] for r in rows] == [e.solution for e in train] and card["teacher_sample_accuracy"] == 1.0
    losses = [json.loads(x)["loss"] for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and losses[-1] < losses[0]
    with pytest.raises(ConfigError, match="'dataset' works with method=sft"):
        distill.run(load_config(distill.DistillConfig, overrides=[
            "teacher=dataset", f"student={tiny_pair['student_same']}", "method=kd", f"output_dir={tmp_path / 'x'}", *FAST]))


def test_distill_from_the_dataset_mixes_reference_styles(tiny_pair, tmp_path):
    """reference_styles: each prompt's response is one of the named styles (a seeded draw, both present);
    a style an example lacks is a one-line data error naming it."""
    from distillability.errors import DataError
    from distillability.tasks import load_task

    common = ["teacher=dataset", f"student={tiny_pair['student_same']}", "method=sft", "max_steps=1", "num_prompts=40",
              "per_device_train_batch_size=4", "max_new_tokens=16", "eval_prompts=2", *FAST]
    distill.run(load_config(distill.DistillConfig, overrides=[*common, "reference_styles=[worked,running]",
                                                               f"output_dir={tmp_path / 'a'}"]))
    rows = [json.loads(x) for x in (tmp_path / "a" / "teacher_samples.jsonl").read_text().splitlines()]
    train = load_task("tiny-world", num_train=200, num_eval=16, seed=0).train[:40]
    styles = [next(st for st in ("worked", "running") if e.solutions[st] == r["response"]) for e, r in zip(train, rows)]
    assert len(rows) == 40 and 10 <= styles.count("running") <= 30  # a fair coin per prompt
    with pytest.raises(DataError, match="none of the reference_styles \\['shown'\\]"):
        distill.run(load_config(distill.DistillConfig, overrides=[*common, "reference_styles=[shown]",
                                                                   f"output_dir={tmp_path / 'b'}"]))
    assert not (tmp_path / "b" / "model").exists()


def test_real_model_configs_load_without_typos():
    """configs/gemma270m-smollm2-{gsm,tinyworld}.yaml are valid pipeline configs (every key known, every value
    in range)."""
    import yaml

    from distillability.config import from_dict
    from distillability.recipes.pipeline import PipelineConfig, apply_preset

    root = Path(__file__).resolve().parents[1]
    data = yaml.safe_load((root / "configs" / "gemma270m-smollm2-gsm.yaml").read_text())
    cfg = from_dict(PipelineConfig, apply_preset(data, False))
    assert cfg.teacher == "packaged:gemma-3-270m" and cfg.teacher_sft_steps > 0 and cfg.calibrate.use_peft
    assert cfg.task.fallback == "gym:gsm_symbolic" and cfg.distill.cross_tokenizer == "char"
    assert cfg.calibrate.runtime.bf16 == "auto" and cfg.methods == ["sft", "gkd"]
    tw = from_dict(PipelineConfig, apply_preset(yaml.safe_load((root / "configs" / "gemma270m-smollm2-tinyworld.yaml")
                                                                .read_text()), False))
    assert tw.task.name == "tiny-world" and tw.teacher_sft.reference_styles == ["worked", "running"]
    assert tw.teacher == cfg.teacher and tw.student == cfg.student and tw.calibrate.use_peft


def test_the_attacker_config_has_the_tinyworld_teacher_and_three_attackers_at_two_budgets():
    """configs/smollm2-attacker.yaml: the same teacher as smollm2-tinyworld (SFT, calibration, world, eta), a second
    proxy (the attacker's base), primed pretrained attackers and the world's student at 1x and 4x."""
    from distillability.protection import budget_curves
    from distillability.recipes.pipeline import load_pipeline_config

    root = Path(__file__).resolve().parents[1]
    a = load_pipeline_config(str(root / "configs" / "smollm2-attacker.yaml"), None)
    t = load_pipeline_config(str(root / "configs" / "smollm2-tinyworld.yaml"), None)
    assert (a.teacher, a.teacher_sft, a.teacher_sft_steps, a.calibrate, a.world, a.eta_undistillable) == (
        t.teacher, t.teacher_sft, t.teacher_sft_steps, t.calibrate, t.world, t.eta_undistillable)
    assert a.extra_proxies["attacker"] == "packaged:smollm2-135m-instruct"
    # the second design: the primed attacker as proxy at three etas, the one the validation slice chose attacked
    sweep = {k: a.extra_etas[k] for k, v in a.extra_proxies.items() if v == "primed:smollm2"}
    assert sorted(sweep.values()) == [0.85, 1.5, 3.0] and "undistillable@primed1.5" in a.attack_teachers
    assert a.attack.prime.students == ["smollm2", "gemma"] and a.attack.prime.num_prompts <= 64
    curves = {k: [x.budget for x in v] for k, v in budget_curves(a.attack.battery).items()}
    assert curves == {"sft:smollm2": [1, 4], "kd:smollm2": [1, 4], "sft": [1, 4], "sft:gemma": [1, 4]}
    assert all((x.repeats or a.attack.repeats) >= (3 if x.budget == 1 else 2) for x in a.attack.battery)


@pytest.mark.slow
def test_gpu_knob_script_runs_at_small_size_and_refuses_without_a_gpu(tmp_path):
    """bench/gpu_knob.sh: --small runs the same chain at CPU smoke size and writes the headline table;
    the GPU size refuses in one line where there is no CUDA device."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(root / "bench" / "gpu_knob.sh"), "--small", str(tmp_path / "k"), "methods=[sft]",
                        "skip=[diagnose]"], cwd=root, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-2000:]
    table = (tmp_path / "k" / "headline.md").read_text()
    assert "| student (sft) |" in table and "CPU" in table.splitlines()[0]
    if not torch.cuda.is_available():
        r = subprocess.run(["bash", str(root / "bench" / "gpu_knob.sh"), str(tmp_path / "g")], cwd=root, env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "no CUDA device" in r.stderr


def test_calibrate_utility_guard_keeps_the_last_step_that_kept_accuracy(small_world, tmp_path):
    """min_accuracy_ratio: a destructive calibration (lr 0.02) loses the teacher's accuracy; the result is the
    last checked step whose validation accuracy (prompts held back from the training split) was >= ratio x
    the start's, and the saved model has exactly that accuracy."""
    from distillability.evaluation import greedy_accuracy
    from distillability.models import load_model

    cfg = load_config(calibrate.CalibrateConfig, overrides=[
        f"model={small_world['teacher']}", f"proxy={small_world['proxy']}", "eta=1.0", "num_generations=2",
        "prompts_per_step=4", "max_completion_length=24", "eval_prompts=4", "eval_generations=1", "learning_rate=0.02",
        "max_steps=6", "min_accuracy_ratio=0.9", "guard_steps=2", "guard_prompts=24", "guard_split=train", "save_steps=0",
        f"output_dir={tmp_path}", "runtime.progress=false", *SMALL_WORLD_TASK])
    card = calibrate.run(cfg)
    g = card["guard"]
    assert set(g["checks"]) == {"2", "4", "6"} and g["start_accuracy"] > 0.3
    passed = [int(s) for s, a in g["checks"].items() if a >= g["threshold"]]
    assert g["selected_step"] == max(passed, default=0)
    assert g["selected_step"] < 6  # the run did lose accuracy, and the guard stepped back
    model, tok = load_model(str(tmp_path / "model"), device="cpu")
    task = cfg.task.load()
    acc, _ = greedy_accuracy(model, tok, task, task.train[-24:], 24, autocast=cfg.runtime.autocast)
    assert acc == (g["checks"][str(g["selected_step"])] if g["selected_step"] else g["start_accuracy"])
    assert acc >= g["threshold"]
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r.get("guard_val_accuracy") is not None for r in log] == [False, True, False, True, False, True]


def test_calibrate_guard_on_held_out_prompts_uses_the_last_ones(small_world, tmp_path):
    """guard_split=held_out validates on the held-out split's *last* guard_prompts (so evaluations that take a
    shorter prefix never score the prompts that chose the checkpoint): its start accuracy is the teacher's
    greedy accuracy on exactly those prompts."""
    from distillability.evaluation import greedy_accuracy
    from distillability.models import load_model

    cfg = load_config(calibrate.CalibrateConfig, overrides=[
        f"model={small_world['teacher']}", f"proxy={small_world['proxy']}", "num_generations=2", "prompts_per_step=2",
        "max_completion_length=24", "eval_prompts=4", "eval_generations=1", "max_steps=1", "min_accuracy_ratio=0.5",
        "guard_prompts=20", "save_steps=0", f"output_dir={tmp_path}", "runtime.progress=false", *SMALL_WORLD_TASK])
    g = calibrate.run(cfg)["guard"]
    task = cfg.task.load()
    assert g["prompts"] == f"eval[{len(task.eval) - 20}:{len(task.eval)}]" and len(task.eval) == 64
    model, tok = load_model(small_world["teacher"], device="cpu")
    acc, _ = greedy_accuracy(model, tok, task, task.eval[-20:], 24, autocast=cfg.runtime.autocast)
    assert g["start_accuracy"] == acc  # (the small world scores ~0.05 here and ~0.4 on its memorised train tail)


def test_evaluate_reports_accuracy_by_task_family(tiny_pair):
    """A task with several families gets greedy accuracy per family: the families partition the prompts, their
    weighted mean is the overall accuracy, and each equals an evaluation of that family's prompts alone."""
    from distillability.models import load_model

    model, tok = load_model(tiny_pair["teacher"], device="cpu")
    cfg = load_config(evaluate.EvaluateConfig, overrides=[*FAST, "task.num_eval=24", "num_generations=1", "k=[1]", "max_new_tokens=16"])
    task = cfg.task.load()
    examples = task.eval[:24]
    assert {e.family for e in examples} == {"math", "mc"}
    res = evaluate.evaluate_model(model, tok, task, examples, cfg)
    by = res["by_family"]
    assert sum(v["num_prompts"] for v in by.values()) == 24
    assert sum(v["num_prompts"] * v["greedy_accuracy"] for v in by.values()) / 24 == pytest.approx(res["greedy_accuracy"])
    for fam, v in by.items():
        alone = evaluate.evaluate_model(model, tok, task, [e for e in examples if e.family == fam], cfg)
        assert alone["greedy_accuracy"] == pytest.approx(v["greedy_accuracy"]) and "by_family" not in alone


def test_pipeline_keeps_evaluations_off_the_guards_prompts():
    """With the utility guard on held-out prompts, a pipeline whose evaluation would score them is a one-line
    config error naming the key; enough held-out prompts pass."""
    from distillability.config import from_dict
    from distillability.errors import ConfigError
    from distillability.recipes.pipeline import PipelineConfig, apply_preset

    guard = {"min_accuracy_ratio": 0.95, "guard_prompts": 100}
    with pytest.raises(ConfigError, match="'evaluate.eval_prompts': 500 prompts reach into the utility guard's last 100 "
                                          "of task.num_eval=500"):
        from_dict(PipelineConfig, apply_preset({"calibrate": guard}, False))  # the default's 500 held-out prompts
    with pytest.raises(ConfigError, match="'distill.eval_prompts'"):
        from_dict(PipelineConfig, apply_preset({"calibrate": guard, "task": {"num_eval": 150}, "evaluate": {"eval_prompts": 50}},
                                                False))
    with pytest.raises(ConfigError, match="'calibrate.eval_prompts'"):
        from_dict(PipelineConfig, apply_preset({"calibrate": guard, "task": {"num_eval": 400}, "evaluate": {"eval_prompts": 300},
                                                "distill": {"eval_prompts": 300}}, False))
    ok = from_dict(PipelineConfig, apply_preset({"calibrate": {**guard, "eval_prompts": 300}, "task": {"num_eval": 400},
                                                 "evaluate": {"eval_prompts": 300}, "distill": {"eval_prompts": 300}}, False))
    assert ok.task.num_eval - ok.calibrate.guard_prompts == ok.evaluate.eval_prompts
    from_dict(PipelineConfig, apply_preset({"calibrate": {**guard, "guard_split": "train"}}, False))  # not held-out: no limit


def test_calibrate_guard_on_held_out_prompts_needs_enough_of_them(tiny_pair, tmp_path):
    """guard_split=held_out takes prompts disjoint from the card's eval_prompts; too few is a one-line config error."""
    from distillability.errors import ConfigError

    cfg = load_config(calibrate.CalibrateConfig, overrides=[
        f"model={tiny_pair['teacher']}", f"proxy={tiny_pair['student']}", "max_steps=1", "eval_prompts=10",
        "min_accuracy_ratio=0.9", "guard_prompts=8", f"output_dir={tmp_path}", *FAST])  # num_eval 16 < 10 + 8
    with pytest.raises(ConfigError, match="guard_prompts.*task.num_eval"):
        calibrate.run(cfg)
    assert not (tmp_path / "model").exists()


def test_the_embedded_default_comes_from_the_packaged_presets_and_uses_the_shipped_world():
    """`demo` reads presets/default.yaml (with --quick, quick.yaml over it); the default's world is the one shipped
    in the package (no build on the user's machine), the quick one is not."""
    from distillability.config import read_yaml
    from distillability.recipes.pipeline import PRESETS, load_pipeline_config
    from distillability.recipes.world import shipped_world

    preset = read_yaml(PRESETS / "default.yaml")
    cfg = load_pipeline_config(None, None)
    assert cfg.calibrate.max_steps == preset["calibrate"]["max_steps"] == 90
    assert cfg.task.num_eval == 500 and cfg.world.teacher_steps == 3000 and cfg.world.bf16 == "auto"
    root = shipped_world(cfg.world, dataclasses.replace(cfg.task, seed=cfg.seed))
    assert root is not None and (root / "teacher" / "model.safetensors").is_file()
    quick = load_pipeline_config(None, ["seed=0"], quick=True)
    assert quick.quick and quick.calibrate.max_steps == 2 and quick.calibrate.learning_rate == 1e-4
    assert shipped_world(quick.world, quick.task) is None
    # a world setting changed by the user is built, not answered by the shipped one
    other = load_pipeline_config(None, ["world.teacher_steps=2999"])
    assert shipped_world(other.world, dataclasses.replace(other.task, seed=0)) is None


def test_adaptive_proxy_learns_from_samples_and_leaves_the_frozen_proxy(tiny_pair):
    from distillability.adversary import AdaptiveProxy
    from distillability.models import load_model
    from distillability.scoring import sequence_logprobs
    from distillability.tasks import world_splits

    proxy, ptok = load_model(tiny_pair["student"], device="cpu")
    proxy.requires_grad_(False)
    before_w = {k: v.clone() for k, v in proxy.state_dict().items()}
    train, _ = world_splits(64, 4, 1)
    prompts, texts = [e.prompt for e in train], [e.solutions["running"] for e in train]  # a style it never saw

    def nll(model):
        lp = sequence_logprobs(model, ptok, prompts, texts, add_eos=True)
        return float(-lp["logprob"].sum() / lp["num_tokens"].sum())

    adv = AdaptiveProxy(proxy, ptok, learning_rate=3e-3, updates=30, batch_size=16)
    start = nll(adv.model)
    assert start == pytest.approx(nll(proxy))  # an exact copy to begin with
    loss = adv.learn(prompts, texts)
    assert loss is not None and adv.seen == len(prompts)
    assert nll(adv.model) < 0.7 * start  # it learnt the style (per-token NLL down by > 30%)
    assert all(torch.equal(before_w[k], v) for k, v in proxy.state_dict().items())  # the frozen proxy is untouched
    assert adv.learn([], []) is None


def test_calibrate_with_the_adversarial_proxy_logs_it_and_resumes_exactly(small_world, tmp_path):
    common = [f"model={small_world['teacher']}", f"proxy={small_world['proxy']}", "eta=1.0", "num_generations=2",
              "prompts_per_step=4", "max_completion_length=32", "eval_prompts=4", "eval_generations=1",
              "proxy_updates=2", "proxy_learning_rate=1e-2", "runtime.progress=false", *SMALL_WORLD_TASK]
    card = calibrate.run(load_config(calibrate.CalibrateConfig, overrides=[
        *common, "max_steps=4", f"output_dir={tmp_path / 'a'}", "save_steps=0"]))
    log = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    correct = sum(round(r["task_reward"] * 8) for r in log)  # 4 prompts x 2 responses per step
    assert card["adversary"] == {"proxy_updates": 2, "proxy_learning_rate": 1e-2, "responses_learned": correct}
    assert correct > 0 and all("proxy_loss" in r for r in log)
    assert all((r["proxy_loss"] is None) == (r["task_reward"] == 0) for r in log)
    # the adversary moved r_cal: the same run against the frozen proxy scores step 2 onwards differently
    frozen = calibrate.run(load_config(calibrate.CalibrateConfig, overrides=[
        *[c for c in common if not c.startswith("proxy_")], "max_steps=2", f"output_dir={tmp_path / 'f'}",
        "save_steps=0"]))
    flog = [json.loads(x) for x in (tmp_path / "f" / "log.jsonl").read_text().splitlines()]
    assert log[0]["r_cal"] == pytest.approx(flog[0]["r_cal"])  # step 1 is scored before the adversary learnt
    assert frozen["adversary"] is None
    assert any(abs(a["r_cal"] - b["r_cal"]) > 1e-6 for a, b in zip(log[1:], flog[1:]))
    # interrupted after step 2 and resumed: the same weights as the uninterrupted run (the adversary's state too)
    calibrate.run(load_config(calibrate.CalibrateConfig, overrides=[
        *common, "max_steps=2", f"output_dir={tmp_path / 'b'}", "save_steps=1"]))
    calibrate.run(load_config(calibrate.CalibrateConfig, overrides=[
        *common, "max_steps=4", "save_steps=1", "resume=true", f"output_dir={tmp_path / 'b'}"]))
    wa = load_file(str(tmp_path / "a" / "model" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "model" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_an_ensemble_of_proxies_keeps_the_least_favourable_r_cal(tiny_pair, tmp_path):
    base = [f"model={tiny_pair['teacher']}", f"proxy={tiny_pair['student']}", "num_generations=4", "prompts_per_step=2",
            "max_completion_length=16", "eval_prompts=2", "eval_generations=1", "max_steps=1", "save_steps=0",
            "wellformed_gate=off", *FAST]

    def r_cal(name: str, *extra: str) -> float:
        card = calibrate.run(load_config(calibrate.CalibrateConfig, overrides=[*base, *extra,
                                                                               f"output_dir={tmp_path / name}"]))
        return card, json.loads((tmp_path / name / "log.jsonl").read_text().splitlines()[0])["r_cal"]

    for eta in (1.0, -1.0):
        _, alone = r_cal(f"alone{eta}", f"eta={eta}")
        _, same = r_cal(f"same{eta}", f"eta={eta}", f"extra_proxies=[{tiny_pair['student']}]")
        card, two = r_cal(f"two{eta}", f"eta={eta}", f"extra_proxies=[{tiny_pair['student_same']}]")
        assert same == pytest.approx(alone, abs=1e-12)  # a proxy twice is the proxy
        # the same 8 samples (step 1 of the same policy), each scored by the proxy least favourable to eta:
        # the smallest divergence for eta > 0, the largest for eta < 0 (by a margin: the two proxies differ)
        assert (alone - two) * eta > 1e-3, (eta, alone, two)
        assert card["extra_proxies"] == [tiny_pair["student_same"]]


def test_pipeline_calibrates_on_calibration_terms_and_measures_the_unseen_length(tmp_path, monkeypatch):
    """calibration_terms=[2, 3]: each calibration gets the task filtered to those chains (the same splits,
    filtered), and shifted_terms=4 (inside the task, outside the calibration) evaluates every teacher on the
    task's own held-out 4-term chains, a split named as such in the headline's evaluations."""
    from distillability.config import from_dict
    from distillability.recipes import pipeline
    from distillability.tasks import chain_terms

    cfg = from_dict(pipeline.PipelineConfig, {"output_dir": str(tmp_path / "run"), "calibration_terms": [2, 3],
                                              "shifted_terms": 4, "task": {"num_train": 300, "num_eval": 60}})
    cfg.validate()
    seen = {}
    monkeypatch.setattr(pipeline.Chain, "stage", lambda self, name, c, marker, fn, under=None:
                        seen.setdefault(name, c) and {"greedy_accuracy": 0.5})
    c = pipeline.Chain(cfg)
    c.models = {"proxy": "p", "student": "s"}
    pipeline.calibrate_teachers(c, "t")
    full = c.task.load()
    for role in ("control", "distillable", "undistillable"):
        task = seen[f"calibrate_{role}"].task
        assert task.world_terms == [2, 3] and (task.num_train, task.num_eval) == (300, 60)
        calib = task.load()
        assert {e.prompt for e in calib.eval} == {e.prompt for e in full.eval if chain_terms(e) in (2, 3)}
        assert not {e.prompt for e in calib.train} & {e.prompt for e in full.eval}
    evaluations = pipeline.evaluate_all(c, {"control": "a", "undistillable": "b"}, {})
    shifted = seen["teacher_control_shifted4"].task.load()
    assert [e.prompt for e in shifted.eval] == [e.prompt for e in full.eval if chain_terms(e) == 4]
    assert not {e.prompt for e in shifted.eval} & {e.prompt for e in full.train}
    assert "never saw" in evaluations["shifted_split"] and "2, 3" in evaluations["shifted_split"]


def test_knob_seed_reseeds_the_knob_not_the_world_or_the_original_teacher(tmp_path, monkeypatch):
    """knob_seed=7 with seed=0: the teacher's SFT, its task and the world keep seed 0 (the same original teacher on
    the same split), every calibration and student runs at 7 (students at 7 + 1000 r); without it, all at seed."""
    from distillability.config import from_dict
    from distillability.recipes import pipeline

    def stages(extra):
        cfg = from_dict(pipeline.PipelineConfig, {"output_dir": str(tmp_path / f"run{len(extra)}"),
                                                  "teacher": "t", "proxy": "p", "student": "s",
                                                  "teacher_sft_steps": 5, "converge_steps": 0, "methods": ["sft"],
                                                  "students_per_cell": 2, "distill_teachers": ["control"], **extra})
        cfg.validate()
        seen = {}
        monkeypatch.setattr(pipeline.Chain, "stage", lambda self, name, c, marker, fn, under=None:
                            seen.setdefault(name, c) and {"greedy_accuracy": 0.5})
        c = pipeline.Chain(cfg)
        teachers, _ = pipeline.calibrate_teachers(c, pipeline.prepare_models(c))
        pipeline.distill_students(c, teachers)
        return c, {name: s.runtime.seed for name, s in seen.items()}

    c, seeds = stages({"knob_seed": 7})
    assert c.task.seed == 0 and seeds["teacher_sft"] == 0
    assert {seeds[f"calibrate_{r}"] for r in ("control", "distillable", "undistillable")} == {7}
    assert (seeds["distill_sft_control"], seeds["distill_sft_control_r1"]) == (7, 1007)
    c, seeds = stages({})
    assert set(seeds.values()) == {0, 1000} and c.task.seed == 0
