"""Reliability: resume after a real SIGKILL, NaN losses, bad input through the CLI, property tests."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from distillability.divergences import divergence_rows, topk_accumulated_kl
from distillability.tasks.verifiers import extract_choice, extract_math_answer, parse_number

CLI = [sys.executable, "-m", "distillability.cli"]


def _distill_args(tiny_pair, out, steps):
    return ["distill", f"teacher={tiny_pair['teacher']}", f"student={tiny_pair['student_same']}", "method=kd",
            f"max_steps={steps}", "num_prompts=16", "per_device_train_batch_size=4", "max_new_tokens=16",
            "eval_prompts=2", "save_steps=1", "warmup_steps=0", f"output_dir={out}", "runtime.progress=false",
            "task.num_train=200", "task.num_eval=16", "runtime.threads=1"]


def _calibrate_args(tiny_pair, out, steps):
    return ["calibrate", f"model={tiny_pair['teacher']}", f"proxy={tiny_pair['student']}", "eta=1",
            f"max_steps={steps}", "num_generations=2", "prompts_per_step=2", "max_completion_length=12",
            "eval_prompts=2", "eval_generations=1", "save_steps=1", "warmup_steps=0", f"output_dir={out}",
            "runtime.progress=false", "task.num_train=200", "task.num_eval=16", "runtime.threads=1"]


@pytest.mark.parametrize("recipe", ["distill", "calibrate"])
def test_sigkill_then_resume_gives_the_uninterrupted_weights(tiny_pair, tmp_path, recipe):
    make_args = _distill_args if recipe == "distill" else _calibrate_args
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    steps = 14
    subprocess.run(CLI + make_args(tiny_pair, tmp_path / "full", steps), check=True, env=env, capture_output=True)
    killed_at = []
    for target in (3, 8):  # kill at two different points of one run, resuming each time
        proc = subprocess.Popen(CLI + make_args(tiny_pair, tmp_path / "killed", steps) + (["resume=true"] if killed_at else []),
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        log = tmp_path / "killed" / "log.jsonl"
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if log.exists() and len(log.read_text().splitlines()) >= target:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_at.append(len(log.read_text().splitlines()) if log.exists() else 0)
    subprocess.run(CLI + make_args(tiny_pair, tmp_path / "killed", steps) + ["resume=true"], check=True, env=env,
                   capture_output=True)
    assert killed_at[0] < steps, killed_at  # it really was interrupted
    a = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(x) for x in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))


def test_nan_loss_stops_with_the_step_and_exit_2(tiny_pair, tmp_path):
    from distillability.models import load_model, save_model

    model, tok = load_model(tiny_pair["student_same"], device="cpu")
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    save_model(model, tok, tmp_path / "nan_student")
    args = _distill_args(tiny_pair, tmp_path / "out", 3)
    args[2] = f"student={tmp_path / 'nan_student'}"
    r = subprocess.run(CLI + args, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2
    assert "step 1" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out" / "model").exists()  # no half-written output


BAD_INPUT = [
    (["evaluate", "model=/nope"], "/nope"),
    (["distill", "teacher=T", "student=S", "methd=kd"], "methd"),
    (["calibrate", "model=a", "proxy=b", "num_generations=1"], "num_generations"),
    (["calibrate", "model=a", "proxy=b", "learning_rate=-0.1"], "learning_rate"),
    (["evaluate", "model=a", "num_generations=2", "k=[4]"], "k"),
    (["evaluate", "--config", "/no/such.yaml"], "/no/such.yaml"),
    (["diagnose", "teacher=a", "student=b", "task.name=gsm8k", "task.path=/no/data.jsonl"], None),
]


@pytest.mark.parametrize("args,needle", BAD_INPUT)
def test_bad_input_is_one_line_exit_2(args, needle, tmp_path):
    r = subprocess.run(CLI + args, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                       cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr
    if needle:
        assert needle in lines[0]


def _prepare(tmp: Path) -> dict[str, str]:
    """Files the config-level bad-input cases point at."""
    (tmp / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    (tmp / "latin1.yaml").write_bytes(b"eta: 1  # caf\xe9\n")
    (tmp / "malformed.yaml").write_text("calibrate:\n  eta: [1,\n  beta: 0.1\n")
    (tmp / "list.yaml").write_text("- eta\n- beta\n")
    (tmp / "typo.yaml").write_text("calibrate:\n  max_stepz: 3\n")
    (tmp / "nan.yaml").write_text("eta: .nan\n")
    (tmp / "a_folder.yaml").mkdir()
    (tmp / "taken").write_text("a user's file\n")
    return {"taken": str(tmp / "taken"), "under": str(tmp / "taken" / "run")}


CONFIG_CASES = [  # (args, text the one-line error must name); every recipe and demo; no models are loaded
    (["pipeline", "--config", "binary.yaml"], "binary.yaml"),
    (["demo", "--config", "binary.yaml"], "binary.yaml"),
    (["calibrate", "--config", "binary.yaml"], "binary.yaml"),
    (["evaluate", "--config", "latin1.yaml"], "latin1.yaml"),
    (["pipeline", "--config", "malformed.yaml"], "malformed.yaml:"),
    (["demo", "--config", "malformed.yaml"], "malformed.yaml:"),
    (["distill", "--config", "malformed.yaml"], "malformed.yaml:"),
    (["pipeline", "--config", "list.yaml"], "list.yaml"),
    (["diagnose", "--config", "a_folder.yaml"], "a_folder.yaml"),
    (["demo", "--config", "typo.yaml"], "calibrate.max_stepz"),
    (["calibrate", "--config", "nan.yaml", "model=a", "proxy=b"], "'eta'"),
    (["calibrate", "model=a", "proxy=b", "eta=nan"], "'eta'"),
    (["calibrate", "model=a", "proxy=b", "eta=inf"], "'eta'"),
    (["pipeline", "eta_undistillable=.inf"], "eta_undistillable"),
    (["distill", "teacher=a", "student=b", "learning_rate=NaN"], "learning_rate"),
    (["evaluate", "model=a", "temperature=-inf"], "temperature"),
    (["diagnose", "teacher=a", "student=b", "temperature=nan"], "temperature"),
    (["demo", "world.style_mix=[nan,0.5,0]"], "world.style_mix[0]"),
    (["demo", "calibrate.beta=inf"], "calibrate.beta"),
    (["evaluate", "model=a", "output_dir={taken}"], "output_dir"),
    (["distill", "teacher=a", "student=b", "output_dir={taken}"], "output_dir"),
    (["calibrate", "model=a", "proxy=b", "output_dir={taken}"], "output_dir"),
    (["diagnose", "teacher=a", "student=b", "output_dir={taken}"], "output_dir"),
    (["pipeline", "output_dir={taken}"], "output_dir"),
    (["demo", "--output-dir", "{taken}"], "output_dir"),
    (["evaluate", "model=a", "output_dir={under}"], "output_dir"),
    (["pipeline", "calibrate.task.num_eval=10"], "calibrate.task"),
    (["demo", "distill.teacher=x"], "distill.teacher"),
    (["pipeline", "evaluate.runtime.seed=3"], "evaluate.runtime.seed"),
    (["pipeline", "teacher=/some/model"], "teacher"),
    (["pipeline", "teacher=/some/model", "proxy=world"], "teacher"),
    (["pipeline", "teacher=world", "proxy=world", "student=world", "task.name=gsm8k"], "task.name"),
    (["pipeline", "shifted_terms=3"], "shifted_terms"),
    (["pipeline", "calibration_terms=[2,3]", "shifted_terms=3"], "shifted_terms"),
    (["pipeline", "calibration_terms=[5]"], "calibration_terms"),
    (["pipeline", "task.world_terms=[1]"], "task.world_terms"),
    (["calibrate", "model=/m", "proxy=/p", "proxy_updates=-1"], "proxy_updates"),
    (["pipeline", "methods=[sft,dpo]"], "methods"),
    (["evaluate", "model"], "model"),
    (["distill", "teacher=dataset", "student=b", "method=kd"], "teacher"),
    (["attack", "--config", "binary.yaml"], "binary.yaml"),
    (["attack", "--config", "malformed.yaml"], "malformed.yaml:"),
    (["attack", "teachers.control=a", "students.default=b", "proxy=c", "reference=ctrl"], "'reference'"),
    (["attack", "teachers.control=a", "students.default=b", "proxy=c", "battery=[{{name: x, budget: nan}}]"], "battery[0].budget"),
    (["attack", "teachers.control=a", "students.default=b", "proxy=c", "battery=[{{name: x, methd: sft}}]"], "battery[0].methd"),
    (["attack", "teachers.control=a", "students.default=b", "proxy=c", "output_dir={taken}"], "output_dir"),
    (["attack", "teachers.control=a"], "students.default"),
    (["pipeline", "attack_battery=huge"], "attack_battery"),
    (["demo", "attack.teachers.control=x"], "attack.teachers"),
    (["attack", "students.default=b"], "'teachers'"),
]


@pytest.mark.parametrize("args,needle", CONFIG_CASES, ids=[" ".join(a) for a, _ in CONFIG_CASES])
def test_bad_config_is_one_line_exit_2_and_writes_nothing(args, needle, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from distillability.cli import main

    monkeypatch.chdir(tmp_path)
    paths = _prepare(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    r = CliRunner().invoke(main, [a.format(**paths) for a in args])
    assert not r.exception or isinstance(r.exception, SystemExit), repr(r.exception)  # no traceback
    lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert r.exit_code == 2 and len(lines) == 1, r.stderr
    assert needle in lines[0], lines[0]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written
    assert (tmp_path / "taken").read_text() == "a user's file\n"


def _bad_case(name: str, tiny_pair, tmp: Path) -> tuple[list[str], str]:
    """(CLI args, text the one-line error must contain) for a bad-input case needing models or files."""
    teacher, data = tiny_pair["teacher"], tmp / "data.jsonl"
    gsm = ["task.name=gsm8k", f"task.path={data}"]
    ev = ["evaluate", f"model={teacher}", f"output_dir={tmp / 'out'}", "eval_prompts=2", "num_generations=1", "k=[1]"]
    if name == "empty file":
        data.write_text("")
        return ev + gsm, "data.jsonl"
    if name == "not utf-8":
        data.write_bytes(b'{"question": "caf\xe9", "answer": "#### 1"}\n')
        return ev + gsm, "data.jsonl"
    if name == "missing field":
        data.write_text('{"question": "q"}\n')
        return ev + gsm, "'answer'"
    if name == "wrong type":
        data.write_text('{"question": 5, "answer": "#### 1"}\n')
        return ev + gsm, "'question'"
    if name == "prompt longer than context":
        data.write_text(json.dumps({"question": "1+" * 200 + "1", "answer": "#### 201"}) + "\n")
        return ev + gsm + ["task.num_eval=1"], "context"
    if name == "empty JSON list":
        (tmp / "data.json").write_text("[]")
        return ev + ["task.name=gsm8k", f"task.path={tmp / 'data.json'}"], "data.json: no examples"
    if name == "data path is a folder":
        (tmp / "dir.jsonl").mkdir()
        return ev + ["task.name=gsm8k", f"task.path={tmp / 'dir.jsonl'}"], "dir.jsonl"
    if name == "answer without ####":
        data.write_text('{"question": "q", "answer": "42"}\n')
        return ev + gsm, "####"
    if name == "not a causal LM":
        (tmp / "vit").mkdir()
        (tmp / "vit" / "config.json").write_text(json.dumps({"model_type": "vit"}))
        return ["evaluate", f"model={tmp / 'vit'}", f"output_dir={tmp / 'out'}"], "not a causal LM"
    if name == "tokenizer without eos":
        shutil.copytree(teacher, tmp / "noeos")
        for fname in ("tokenizer_config.json", "special_tokens_map.json"):
            f = tmp / "noeos" / fname
            if f.exists():
                cfg = json.loads(f.read_text())
                cfg.pop("eos_token", None)
                f.write_text(json.dumps(cfg))
        tj = tmp / "noeos" / "tokenizer.json"
        tok = json.loads(tj.read_text())
        tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != "<|endoftext|>"]
        tj.write_text(json.dumps(tok))
        return ["evaluate", f"model={tmp / 'noeos'}", f"output_dir={tmp / 'out'}"], "eos"
    if name == "vocabulary mismatch":
        return ["distill", f"teacher={teacher}", f"student={tiny_pair['student']}", "method=kd",
                f"output_dir={tmp / 'out'}", "task.num_train=50", "task.num_eval=8"], "vocabular"
    if name == "nothing left after filtering":
        return ["distill", f"teacher={teacher}", f"student={tiny_pair['student_same']}", "method=sft",
                "keep_correct_only=true", "num_prompts=4", "max_new_tokens=4", f"output_dir={tmp / 'out'}",
                "task.num_train=50", "task.num_eval=8", "eval_prompts=2"], "no teacher samples left"
    raise AssertionError(name)


BAD_CASES = ["empty file", "not utf-8", "missing field", "wrong type", "prompt longer than context", "not a causal LM",
             "tokenizer without eos", "vocabulary mismatch", "nothing left after filtering", "empty JSON list",
             "data path is a folder", "answer without ####"]
# every case through the CLI's entry point in one child process (one import of torch and transformers, not
# twelve): the exit code each command asks for, and what it wrote to stderr, including any traceback
_DRIVER = """
import contextlib, io, json, os, sys, traceback
from distillability.cli import main
cases, out = json.loads(sys.argv[1]), {}
for name, case in cases.items():
    os.chdir(case["tmp"])
    err, code = io.StringIO(), 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main.main(args=case["args"], standalone_mode=False)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
    out[name] = {"code": code, "stderr": err.getvalue()}
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def bad_runs(tiny_pair, tmp_path_factory):
    cases = {}
    for name in BAD_CASES:
        tmp = tmp_path_factory.mktemp("bad")
        args, needle = _bad_case(name, tiny_pair, tmp)
        cases[name] = {"args": args, "needle": needle, "tmp": str(tmp)}
    r = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(cases)], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    assert r.returncode == 0 and lines, r.stderr[-3000:]
    results = json.loads(lines[-1][7:])
    return {name: {**cases[name], **results[name]} for name in BAD_CASES}


@pytest.mark.parametrize("name", BAD_CASES)
def test_bad_input_with_models_is_one_line_exit_2(bad_runs, name):
    run = bad_runs[name]
    lines = [x for x in run["stderr"].splitlines() if x.startswith("error:")]
    assert run["code"] == 2 and len(lines) == 1 and "Traceback" not in run["stderr"], run["stderr"][-2000:]
    assert run["needle"] in lines[0], lines[0]
    out = Path(run["tmp"]) / "out"
    assert not (out / "model").exists() and not (out / "eval.json").exists()


def test_bad_data_file_through_the_cli(tiny_pair, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{oops\n')
    r = subprocess.run(CLI + ["evaluate", f"model={tiny_pair['teacher']}", "task.name=gsm8k", f"task.path={bad}"],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and "bad.jsonl:2" in r.stderr


logits = st.lists(st.floats(-20, 20, allow_nan=False), min_size=2, max_size=12)


@settings(max_examples=60, deadline=None)
@given(logits, st.data())
def test_divergence_properties(s_row, data):
    t_row = data.draw(st.lists(st.floats(-20, 20, allow_nan=False), min_size=len(s_row), max_size=len(s_row)))
    s = torch.tensor([s_row], dtype=torch.float64)
    t = torch.tensor([t_row], dtype=torch.float64)
    for kind in ("fkl", "rkl", "jsd", "tvd", "skl", "srkl"):
        v = divergence_rows(s, t, kind, beta=0.5).item()
        assert v >= -1e-9
        assert abs(divergence_rows(s, s, kind).item()) < 1e-5  # zero iff equal (the "if" direction)
    jsd = divergence_rows(s, t, "jsd", beta=0.5).item()
    assert jsd <= 0.6932  # JSD_0.5 is bounded by log 2
    assert abs(jsd - divergence_rows(t, s, "jsd", beta=0.5).item()) < 1e-5  # symmetric at beta = 0.5
    acc = topk_accumulated_kl(t, s, [1, 2, 4, 8, 64])[0]
    full = divergence_rows(s, t, "fkl").item()
    assert abs(acc[-1].item() - full) < 1e-6


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_answer_extraction_never_crashes(text):
    extract_math_answer(text)
    extract_math_answer(text, strict=True)
    extract_choice(text)
    parse_number(text)


def test_help_shows_the_defaults_a_run_uses():
    """`demo --help` / `pipeline --help` show the values of a run with no options (the embedded default preset
    applied), not the dataclasses' own; keys the pipeline fills in itself are not offered."""
    import dataclasses
    import re

    from click.testing import CliRunner

    from distillability.cli import main
    from distillability.recipes.pipeline import load_pipeline_config

    cfg = load_pipeline_config(None, {})
    for command in ("demo", "pipeline"):
        text = CliRunner().invoke(main, [command, "--help"], terminal_width=400).output
        rows = re.findall(r"^  (\S+) .*\[[^\]\[]*?, default (.*)\]$", text, flags=re.M)
        assert len(rows) > 100
        for key, shown in rows:
            value = cfg
            for part in key.split("."):
                value = getattr(value, part)
            if isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
                want = "[" + ", ".join(v.name for v in value) + "]"
            else:
                want = repr(value)
            assert shown == want, key
        keys = dict(rows)
        assert keys["calibrate.max_steps"] == "90" and keys["task.num_train"] == "20000"
        assert keys["distill.max_steps"] == "240" and "distill.task.num_train" not in keys
        assert "attack.attacker.max_steps" not in keys and "calibrate.runtime.seed" not in keys


def _interrupt_when(proc, path: Path, ready, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and ready(path):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)


def test_ctrl_c_names_the_last_checkpoint_and_the_command_that_continues(tiny_pair, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = _distill_args(tiny_pair, tmp_path / "run", 40)
    proc = subprocess.Popen(CLI + args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _interrupt_when(proc, tmp_path / "run" / "checkpoints" / "last" / "state.json", lambda p: True)
    err = proc.communicate(timeout=120)[1].strip().splitlines()
    assert proc.returncode == 130 and "Traceback" not in "\n".join(err)
    step = json.loads((tmp_path / "run" / "checkpoints" / "last" / "state.json").read_text())["step"]
    assert err[-1].startswith(f"interrupted: the last checkpoint kept is {tmp_path / 'run' / 'checkpoints' / 'last'} "
                              f"(step {step}). Continue with: distillability distill ")
    assert err[-1].endswith(" resume=true")
    # the printed command continues the run: its log goes on from the checkpoint to the last step
    cmd = err[-1].split("Continue with: ", 1)[1].split()[1:]
    subprocess.run(CLI + cmd, check=True, env=env, capture_output=True)
    rows = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 41))


def test_ctrl_c_in_the_pipeline_then_the_same_command_continues_the_cut_stage(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DISTILLABILITY_BF16": "false"}
    run = tmp_path / "run"
    cmd = CLI + ["demo", "--quick", "--output-dir", str(run), "progress=false", "skip=[diagnose,attack,distill]",
                 "calibrate.max_steps=30", "calibrate.save_steps=1", "threads=1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = run / "calibrate_control" / "log.jsonl"
    _interrupt_when(proc, log, lambda p: len(p.read_text().splitlines()) >= 3, timeout=400)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err
    assert "finished stages are kept. The same command continues" in err.strip().splitlines()[-1]
    assert "calibrate_control/checkpoints/last" in err
    cut_at = len(log.read_text().splitlines())
    assert cut_at < 30
    again = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "calibrate_control: continuing from its last checkpoint" in again.stdout
    rows = [json.loads(x)["step"] for x in log.read_text().splitlines()]
    assert rows == list(range(1, 31))  # the cut stage went on where it stopped, no step twice


@pytest.fixture()
def small_disk(tmp_path):
    """A 64 MB tmpfs mounted under tmp_path (root only; skipped where mounting is not allowed), and a function
    that fills it to all but `free` bytes."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")

    def fill(free: int = 4096) -> None:
        filler = disk / "filler"
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * (1 << 20))
                    f.flush()
            except OSError:
                pass
        with open(filler, "wb") as f:  # (rewritten smaller: the exact free space, page-aligned)
            pass
        total = os.statvfs(disk)
        avail = total.f_bavail * total.f_frsize
        with open(filler, "wb") as f:
            f.write(b"\0" * max(0, avail - free))

    yield disk, fill
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.mark.parametrize("writer", ["json", "jsonl_append", "figure", "model", "checkpoint", "report"])
def test_a_full_disk_is_one_line_and_leaves_no_partial_file(writer, small_disk, tiny_pair):
    """A real full disk (a small tmpfs) under each writer: it raises OutputError naming the folder and the file,
    and the folder keeps the previous complete output (or none), never a partial one nor a temporary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from distillability import io
    from distillability.errors import OutputError

    disk, fill = small_disk
    folder = disk / "out"
    folder.mkdir()
    target = {"json": folder / "card.json", "jsonl_append": folder / "log.jsonl", "figure": folder / "plot.png",
              "model": folder / "model", "checkpoint": folder / "checkpoints" / "last",
              "report": folder / "report.html"}[writer]

    def do_write(tag):
        if writer == "json":
            io.write_json(target, {"tag": tag, "pad": "x" * 20000})
        elif writer == "jsonl_append":
            io.append_jsonl(target, {"tag": tag, "pad": "x" * 20000})
        elif writer == "figure":
            fig, ax = plt.subplots()
            ax.plot(range(200), [i % 7 for i in range(200)])
            ax.set_title(tag)
            io.save_figure(fig, target)
        elif writer == "report":
            from distillability.report.protection import to_html

            io.write_text(target, to_html(f"# {tag}\n\n" + "word " * 5000, folder))
        else:
            from distillability.models import load_model, save_model
            from distillability.training import save_checkpoint

            model, tok = load_model(tiny_pair["student"])
            if writer == "model":
                save_model(model, tok, target)
            else:
                opt = torch.optim.AdamW(model.parameters())
                sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
                save_checkpoint(folder / "checkpoints", 1, model, opt, sched)

    do_write("first")
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    fill(4096)
    with pytest.raises(OutputError) as e:
        do_write("second")
    msg = str(e.value)
    assert "\n" not in msg and "no space left" in msg and target.name in msg and str(target.parent) in msg
    after = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert after == before  # the last complete output, untouched
    assert not [p for p in folder.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


def test_sigkill_between_the_temporary_write_and_the_rename_leaves_the_old_file(tmp_path):
    """A process killed inside atomic_path (after writing the temporary, before the rename) leaves the previous
    complete file and no partial one under its name."""
    target = tmp_path / "card.json"
    target.write_text('{"tag": "old"}\n')
    code = ("import os, signal, sys\nfrom distillability.io import atomic_path\n"
            f"with atomic_path({str(target)!r}) as tmp:\n"
            "    tmp.write_text('{\"tag\": \"new\"}')\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert json.loads(target.read_text()) == {"tag": "old"}


def test_a_full_disk_through_the_cli_is_one_line_exit_1(tiny_pair, tmp_path, monkeypatch):
    """distill on a disk that fills while it writes its outputs: one line naming the folder, exit 1."""
    import errno

    from click.testing import CliRunner

    from distillability import io
    from distillability.cli import main

    real = io._fsync_tree

    def full(target):  # the disk fills when the first output is flushed
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io, "_fsync_tree", full)
    out = tmp_path / "run"
    r = CliRunner().invoke(main, _distill_args(tiny_pair, out, 2)[0:1] + _distill_args(tiny_pair, out, 2)[1:])
    monkeypatch.setattr(io, "_fsync_tree", real)
    assert r.exit_code == 1, r.output
    lines = [x for x in r.output.strip().splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "no space left on the device while writing" in lines[0] and "Traceback" not in r.output
    assert not (out / "model" / "model.safetensors").exists()


def test_report_to_trackio_and_tensorboard_log_every_scalar_and_read_back(tiny_pair, tmp_path):
    """distill with runtime.report_to=[trackio,tensorboard]: the scalars of log.jsonl, read back through each
    library's own reader (TensorBoard's EventAccumulator, trackio's SQLite storage), step for step."""
    pytest.importorskip("trackio")
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRACKIO_DIR": str(tmp_path / "trackio")}
    r = subprocess.run(CLI + _distill_args(tiny_pair, out, 4) + ["runtime.report_to=[trackio,tensorboard]"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    read = ("import json, sys\n"
            "from tensorboard.backend.event_processing.event_accumulator import EventAccumulator\n"
            "from trackio.sqlite_storage import SQLiteStorage\n"
            f"ea = EventAccumulator({str(out / 'tensorboard')!r}); ea.Reload()\n"
            "tb = {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()['scalars']}\n"
            f"tr = SQLiteStorage.get_logs('distillability', {out.name!r})\n"
            "print(json.dumps({'tb': tb, 'trackio': tr, 'runs': SQLiteStorage.get_runs('distillability')}, default=str))\n")
    got = json.loads(subprocess.run([sys.executable, "-c", read], env=env, capture_output=True, text=True,
                                    check=True).stdout.strip().splitlines()[-1])
    assert [s for s, _ in got["tb"]["loss"]] == [1, 2, 3, 4]
    assert [v for _, v in got["tb"]["loss"]] == pytest.approx([row["loss"] for row in rows], rel=1e-6)
    assert got["runs"] == [out.name]
    tr = {x["step"]: x for x in got["trackio"]}
    assert [tr[s]["loss"] for s in (1, 2, 3, 4)] == pytest.approx([row["loss"] for row in rows], rel=1e-9)
    assert "s_step" in tr[1] and "on_policy" not in tr[1]  # scalars only (a bool is not one)
