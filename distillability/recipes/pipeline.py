"""The end-to-end pipeline (the project's main job): build or load the models, diagnose, calibrate
the teacher with eta = 0 (control), eta < 0 (distillable) and eta > 0 (undistillable), distil a
student from every teacher by SFT, KD and GKD, evaluate everything, write the protection report.

`distillability demo` runs it on the embedded default: the tiny world (tasks and three small models
with three different tokenizers, built from scratch and cached). Each stage writes its outputs under
`output_dir/<stage>/` with the config it ran with; a stage whose outputs exist and whose config and
input models are unchanged is not rerun, so an interrupted pipeline resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import yaml

from ..config import TaskConfig, from_dict, load_data, merge, opt, read_yaml, save_config, sub, to_dict
from ..errors import ConfigError
from ..io import check_output_dir, versions, write_json
from ..report.protection import headline_table, write_report
from . import calibrate, diagnose, distill, evaluate
from .world import WorldConfig, build_world

TEACHERS = ("original", "control", "distillable", "undistillable")


@dataclasses.dataclass
class PipelineConfig:
    output_dir: str = opt("runs/demo", "Run folder: models, cards, reports, headline.json.")
    seed: int = opt(0, "Seed of the whole run (world, sampling, training).")
    quick: bool = opt(False, "Tiny settings for a smoke run of the whole chain (minutes).")
    teacher: str = opt("", "Teacher model; empty = build the tiny world's teacher.")
    proxy: str = opt("", "Calibration proxy; empty = the tiny world's proxy.")
    student: str = opt("", "Student base; empty = the tiny world's student.")
    teacher_sft_steps: int = opt(0, "SFT steps on the task's reference solutions (teacher=dataset) that make a "
                                 "pretrained teacher competent on the task before anything else; 0 = skip.", min=0)
    converge_steps: int = opt(25, "RL steps on task reward alone that make the teacher 'converged' "
                              "(the released-instruct-model role) before anything else; 0 = skip.", min=0)
    eta_distillable: float = opt(-1.0, "eta of the distillable calibration (< 0).", max=0)
    eta_undistillable: float = opt(1.0, "eta of the undistillable calibration (> 0).", min=0)
    methods: list[str] = opt(["sft", "kd", "gkd"], "Distillation methods.", choices=("sft", "kd", "gkd"))
    skip: list[str] = opt([], "Stages to skip.", choices=("diagnose", "calibrate", "distill"))
    threads: int = opt(2, "torch CPU threads.", min=0)
    progress: bool = opt(True, "Progress bars.")
    teacher_sft: distill.DistillConfig = sub(distill.DistillConfig, "Settings of the teacher's SFT stage "
                                             "(teacher_sft_steps > 0; models, method and steps are filled in).")
    world: WorldConfig = sub(WorldConfig, "The tiny world (used when teacher/proxy/student are empty).")
    task: TaskConfig = sub(TaskConfig, "The task (tiny-world by default).")
    diagnose: diagnose.DiagnoseConfig = sub(diagnose.DiagnoseConfig, "Diagnose settings (models are filled in).")
    calibrate: calibrate.CalibrateConfig = sub(calibrate.CalibrateConfig, "Calibration settings (eta, models filled in).")
    distill: distill.DistillConfig = sub(distill.DistillConfig, "Distillation settings (method, models filled in).")
    evaluate: evaluate.EvaluateConfig = sub(evaluate.EvaluateConfig, "Evaluation settings.")

    def validate(self) -> None:
        if bool(self.teacher) != bool(self.proxy) or bool(self.teacher) != bool(self.student):
            raise ConfigError("config keys 'teacher', 'proxy', 'student': give all three or none (tiny world)")
        c = self.calibrate
        if c.min_accuracy_ratio > 0 and c.guard_split == "held_out":
            # the guard selects checkpoints on the held-out split's last guard_prompts: no reported number may
            # score them
            free = self.task.num_eval - c.guard_prompts
            for key, n in (("evaluate.num_prompts", self.evaluate.num_prompts),
                           ("distill.eval_prompts", self.distill.eval_prompts), ("calibrate.eval_prompts", c.eval_prompts)):
                if n > free:
                    raise ConfigError(f"config key '{key}': {n} prompts reach into the utility guard's last "
                                      f"{c.guard_prompts} of task.num_eval={self.task.num_eval}; raise task.num_eval "
                                      f"to >= {n + c.guard_prompts} or lower {key}")


def _inputs(cfg) -> dict:
    """Size and mtime of every model folder or file the stage's config points at (other than its own output
    folder): a stage whose input an upstream stage rewrote (e.g. a distilled student after a distill setting
    changed) is rerun, not answered from its cache."""
    found = {}

    def walk(value, key):
        if isinstance(value, dict):
            for k, v in value.items():
                if k != "output_dir":
                    walk(v, f"{key}.{k}" if key else k)
        elif isinstance(value, str) and value and (p := Path(value)).exists():
            files = [p] if p.is_file() else sorted(p.glob("*.safetensors")) or sorted(p.glob("*/*.safetensors"))
            found[key] = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]

    walk(to_dict(cfg), "")
    return found


def _stage(out: Path, name: str, cfg, marker: str, fn):
    """Run fn(cfg) unless out/name holds `marker` from a run with the same config and the same inputs."""
    folder = out / name
    saved = folder / "stage_config.yaml"
    current = yaml.safe_dump(to_dict(cfg), sort_keys=True) + yaml.safe_dump({"inputs": _inputs(cfg)}, sort_keys=True)
    if (folder / marker).exists() and saved.exists() and saved.read_text() == current:
        import json

        return json.loads((folder / marker).read_text())
    result = fn(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    saved.write_text(current)
    return result


def _with(cfg, **changes):
    return dataclasses.replace(cfg, **changes)


def run(cfg: PipelineConfig) -> dict:
    t0 = time.time()
    out = check_output_dir(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "pipeline_config.yaml")
    n_teachers = 1 if "calibrate" in cfg.skip else len(TEACHERS)
    stages_total = (1 + (1 if cfg.teacher_sft_steps else 0) + (0 if "diagnose" in cfg.skip else 1) + (0 if "calibrate" in cfg.skip else 3)
                    + (0 if "distill" in cfg.skip else n_teachers * len(cfg.methods)) + 1)
    done = [0]

    def announce(what: str) -> None:
        done[0] += 1
        print(f"[{done[0]}/{stages_total}] {what}  ({time.time() - t0:.0f}s elapsed)", flush=True)

    def runtime(sub_cfg):
        return _with(sub_cfg.runtime, seed=cfg.seed, threads=cfg.threads, progress=cfg.progress)

    # 1. models
    announce("models: build or load the teacher, proxy and student base")
    if cfg.teacher:
        models = {"teacher": cfg.teacher, "proxy": cfg.proxy, "student": cfg.student}
    else:
        models = build_world(cfg.world, _with(cfg.task, seed=cfg.seed), progress=cfg.progress)
    task = _with(cfg.task, seed=cfg.seed)
    original = models["teacher"]
    if cfg.teacher_sft_steps:
        announce(f"teacher SFT: {cfg.teacher_sft_steps} steps on the task's reference solutions")
        scfg = _with(cfg.teacher_sft, teacher="dataset", student=original, method="sft", max_steps=cfg.teacher_sft_steps,
                     teacher_samples=None, output_dir=str(out / "teacher_sft"), task=task, runtime=runtime(cfg.teacher_sft))
        _stage(out, "teacher_sft", scfg, "distill_card.json", distill.run)
        original = str(out / "teacher_sft" / "model")
    if cfg.converge_steps:
        conv = _with(cfg.calibrate, model=original, proxy=models["proxy"], eta=0.0, max_steps=cfg.converge_steps,
                     output_dir=str(out / "teacher_converged"), task=task, runtime=runtime(cfg.calibrate))
        _stage(out, "teacher_converged", conv, "calibration_card.json", calibrate.run)
        original = str(out / "teacher_converged" / "model")
    teachers = {"original": original}

    # 2. diagnose teacher vs student
    if "diagnose" not in cfg.skip:
        announce("diagnose: teacher vs student")
        dcfg = _with(cfg.diagnose, teacher=original, student=models["student"], output_dir=str(out / "diagnose"),
                     task=task, runtime=runtime(cfg.diagnose))
        _stage(out, "diagnose", dcfg, "diagnose.json", diagnose.run)

    # 3. calibrate three times from the same start for the same steps
    cards = {}
    calibrations = [] if "calibrate" in cfg.skip else [
        ("control", 0.0), ("distillable", cfg.eta_distillable), ("undistillable", cfg.eta_undistillable)]
    for name, eta in calibrations:
        announce(f"calibrate: {name} (eta={eta:+g})")
        ccfg = _with(cfg.calibrate, model=original, proxy=models["proxy"], eta=eta, output_dir=str(out / f"calibrate_{name}"),
                     task=task, runtime=runtime(cfg.calibrate))
        cards[name] = _stage(out, f"calibrate_{name}", ccfg, "calibration_card.json", calibrate.run)
        teachers[name] = str(out / f"calibrate_{name}" / "model")

    # 4. distil a student from each teacher by each method
    students = {}
    for tname in ([] if "distill" in cfg.skip else [t for t in TEACHERS if t in teachers]):
        shared_samples = None  # every method learns from the same teacher samples (sampled once)
        for method in cfg.methods:
            announce(f"distill: {method} from the {tname} teacher")
            tcfg = _with(cfg.distill, teacher=teachers[tname], student=models["student"], method=method,
                         output_dir=str(out / f"distill_{method}_{tname}"), task=task, runtime=runtime(cfg.distill),
                         teacher_samples=shared_samples)
            _stage(out, f"distill_{method}_{tname}", tcfg, "distill_card.json", distill.run)
            students[(method, tname)] = str(out / f"distill_{method}_{tname}" / "model")
            shared_samples = shared_samples or str(out / f"distill_{method}_{tname}" / "teacher_samples.jsonl")

    # 5. evaluate every teacher and student; the report
    announce("evaluate: every teacher and student; write the report")
    evaluations = {"teachers": {}, "students": {}}
    for tname, path in teachers.items():
        ecfg = _with(cfg.evaluate, model=path, proxy=models["proxy"], output_dir=str(out / "eval" / f"teacher_{tname}"),
                     task=task, runtime=runtime(cfg.evaluate))
        evaluations["teachers"][tname] = _stage(out / "eval", f"teacher_{tname}", ecfg, "eval.json", evaluate.run)
    for (method, tname), path in students.items():
        ecfg = _with(cfg.evaluate, model=path, proxy=None, output_dir=str(out / "eval" / f"student_{method}_{tname}"),
                     task=task, runtime=runtime(cfg.evaluate))
        evaluations["students"].setdefault(method, {})[tname] = _stage(
            out / "eval", f"student_{method}_{tname}", ecfg, "eval.json", evaluate.run)

    if students:
        # the student before any distillation: the floor every student is read against (a distilled student
        # below it learned nothing usable from its teacher)
        ecfg = _with(cfg.evaluate, model=models["student"], proxy=None, output_dir=str(out / "eval" / "student_base"),
                     task=task, runtime=runtime(cfg.evaluate))
        evaluations["student_base"] = _stage(out / "eval", "student_base", ecfg, "eval.json", evaluate.run)
    headline = headline_table(evaluations, cfg.seed, time.time() - t0)
    write_json(out / "headline.json", headline)
    write_json(out / "evaluations.json", {"evaluations": evaluations, "calibration_cards": cards,
                                          "models": models, "teachers": teachers, "versions": versions()})
    write_report(out, headline, evaluations, cards)
    return headline


PRESETS = Path(__file__).resolve().parent.parent / "presets"
# what the pipeline fills into each stage's config itself: a user value there would be silently replaced
FILLED_IN = {
    "teacher_sft": ("teacher", "student", "method", "max_steps", "teacher_samples", "output_dir", "task"),
    "diagnose": ("teacher", "student", "output_dir", "task"),
    "calibrate": ("model", "proxy", "eta", "output_dir", "task"),
    "distill": ("teacher", "student", "method", "output_dir", "task", "teacher_samples"),
    "evaluate": ("model", "proxy", "output_dir", "task"),
}
FILLED_IN_RUNTIME = ("seed", "threads", "progress")
SET_BY = {"task": "task.*", "eta": "eta_distillable / eta_undistillable", "max_steps": "teacher_sft_steps",
          "seed": "seed", "threads": "threads", "progress": "progress", "method": "methods"}


def refuse_filled_in(data: dict) -> None:
    """A ConfigError for a stage key the pipeline overwrites (e.g. calibrate.task.num_eval), naming the key to use."""
    for section, keys in FILLED_IN.items():
        sub_data = data.get(section)
        if not isinstance(sub_data, dict):
            continue
        for key in keys:
            if key in sub_data:
                use = SET_BY.get(key, "the pipeline's own keys (teacher, proxy, student, output_dir)")
                raise ConfigError(f"config key '{section}.{key}': the pipeline sets it for every stage; use {use}")
        rt = sub_data.get("runtime")
        for key in FILLED_IN_RUNTIME if isinstance(rt, dict) else ():
            if key in rt:
                raise ConfigError(f"config key '{section}.runtime.{key}': the pipeline sets it for every stage; use {key}")


def apply_preset(data: dict, quick: bool) -> dict:
    """The embedded default (presets/default.yaml; with --quick presets/quick.yaml over it) under the user's
    config, after refusing the stage keys the pipeline fills in itself."""
    refuse_filled_in(data)
    base = read_yaml(PRESETS / "default.yaml")
    if quick:
        base = merge(base, read_yaml(PRESETS / "quick.yaml"))
    return merge(base, data)


def load_pipeline_config(path: str | None, overrides: list[str] | dict | None, quick: bool | None = None):
    """The pipeline's config: the embedded default, the YAML file, the overrides (`quick`: the preset; None =
    the config's own `quick` key)."""
    data = load_data(path, overrides)
    if quick:
        data["quick"] = True
    return from_dict(PipelineConfig, apply_preset(data, bool(data.get("quick", False))))
