"""Attack calibrated teachers with a battery of attackers: every protection claim as a curve, not a point.

Each attacker is a distillation (distill.py) of one of the attacker students from a teacher, named in the battery
(a YAML list; add your own). The default battery:

1. budget: SFT, KD and GKD at 1x, 4x and 10x the base attacker's budget (`attacker`: its optimizer steps and
   its distinct training prompts scale together; the peak learning rate stays the base attacker's at every
   budget, as an attacker with more data trains longer rather than harder; warm-up and schedule are the base's);
2. filters: correct-only SFT; best-of-n likelihood-filtered SFT (n = 4, 16: of each prompt's n samples the
   verified-correct one the attacker's own student base finds most likely per character); low-temperature
   sampling (T = 0.3);
3. unseen students: SFT into a student of another architecture and tokenizer (`students.unseen`) and into one of
   the teacher's size (`students.large`). An attacker whose student is not given is reported as skipped.

Pretrained attackers: any attacker may name a student of `students` (e.g. a packaged SmolLM2 or Gemma), with its own
learning rate, batch and students per cell; `prime` first fine-tunes such a student on a few answer-only
references, and the primed model is its base. Plain attackers of one student at several budgets form that
student's budget curve (protection.budget_curves), read over its own base.

Defenses beside the knob: `defenses` turn a teacher into an output-level defended one (the control teacher with
its chain of thought removed, or answering with its least imitable correct sample under the defender's proxy),
attacked by the battery's SFT attackers (a text-only defense exposes no logits: KD/GKD cells are not run).

Each cell (attacker x teacher) is `repeats` students; it reports their held-out accuracy (mean, spread), the
ratio to the reference teacher's (control's) same attacker, the gain over the student base and that gain as a
share of the reference's gain, samples, steps and wall time. A cell that fails (e.g. a NaN loss) is reported as
failed with its error, not dropped. Cells are resumable: a killed battery continues at the next unfinished cell.
Writes attack.json, attack.md, attack_budget.png and attack_variants.png.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import numpy as np

from ..config import TaskConfig, opt, save_config, sub
from ..errors import ConfigError, UserError
from ..io import check_output_dir, load_json, versions, write_json
from ..protection import (
    binomial_se,
    cell_stats,
    cost_multiplier,
    curve_of,
    protected_budget,
    relate,
    strongest_attack,
)
from ..tasks import STYLES
from . import distill
from .stages import run_stage


@dataclasses.dataclass
class Attacker:
    name: str = opt("", "The attacker's name (a row of the table).")
    method: str = opt("sft", "How it distills.", choices=("sft", "kd", "gkd"))
    budget: float = opt(1.0, "Multiple of the base attacker's optimizer steps and distinct training prompts.",
                        min=0, min_exclusive=True)
    keep_correct_only: bool = opt(False, "Train only on verified-correct teacher samples.")
    best_of: int = opt(1, "Teacher samples per prompt; > 1 keeps the verified-correct one the attacker's student "
                       "finds most likely per character (adaptive best-of-n).", min=1)
    sample_temperature: float | None = opt(None, "Teacher sampling temperature (null = the base attacker's).", min=0)
    student: str = opt("default", "The attacker student: a key of `students`.")
    learning_rate: float | None = opt(None, "Peak learning rate (null = the base attacker's, at every budget).",
                                      min=0, min_exclusive=True)
    repeats: int | None = opt(None, "Students per cell of this attacker (null = the battery's `repeats`).", min=1)
    per_device_train_batch_size: int | None = opt(None, "Sequences per step (null = the base attacker's): with the "
                                                  "base's steps at each budget, the passes over the teacher's answers.",
                                                  min=1)

    def validate(self) -> None:
        if not self.name:
            raise ConfigError("config key 'battery[].name': every attacker needs a name")

    @property
    def is_budget(self) -> bool:
        """A plain attacker (only method and budget set): a point of the budget curve."""
        return (not self.keep_correct_only and self.best_of == 1 and self.sample_temperature is None
                and self.student == "default" and self.learning_rate is None and self.per_device_train_batch_size is None)


@dataclasses.dataclass
class Defense:
    name: str = opt("", "The defended teacher's name (a column of the table).")
    teacher: str = opt("control", "The teacher it defends (a key of `teachers`).")
    kind: str = opt("answer_only", "answer_only: the chain of thought removed; least_likely: the correct sample "
                    "the defender's `proxy` finds least likely per character.", choices=("answer_only", "least_likely"))
    generations: int = opt(4, "least_likely: samples drawn per prompt to choose from.", min=1)
    attackers: list[str] = opt([], "The battery's SFT attackers that attack this defense (names; [] = all of them).")

    def validate(self) -> None:
        if not self.name:
            raise ConfigError("config key 'defenses[].name': every defense needs a name")


def _budgets(method: str) -> list[Attacker]:
    return [Attacker(name=f"{method}@{b}x", method=method, budget=float(b)) for b in (1, 4, 10)]


FULL_BATTERY = [*_budgets("sft"), *_budgets("kd"), *_budgets("gkd"),
                Attacker(name="sft-correct", keep_correct_only=True),
                Attacker(name="sft-best-of-4", keep_correct_only=True, best_of=4),
                Attacker(name="sft-best-of-16", keep_correct_only=True, best_of=16),
                Attacker(name="sft-T0.3", sample_temperature=0.3),
                Attacker(name="sft-unseen-student", student="unseen"),
                Attacker(name="sft-large-student", student="large")]
SMALL_BATTERY = [Attacker(name="sft@1x", method="sft", budget=1.0), Attacker(name="sft@4x", method="sft", budget=4.0),
                 Attacker(name="sft-best-of-4", keep_correct_only=True, best_of=4)]
DEFENSES = [Defense(name="control+answer_only", teacher="control", kind="answer_only"),
            Defense(name="control+least_likely", teacher="control", kind="least_likely")]
BATTERIES = {"full": FULL_BATTERY, "small": SMALL_BATTERY}


@dataclasses.dataclass
class PrimeConfig:
    students: list[str] = opt([], "Attacker students (keys of `students`) primed on the task's answer format before "
                              "any attack: SFT on a few reference answers in `style`. The primed model is the base "
                              "every cell of that student starts from and reports its gain over (a pretrained LM "
                              "that has never seen the task's format would otherwise gain from the format alone).")
    num_prompts: int = opt(64, "Training prompts whose reference answers prime the student.", min=1)
    style: str = opt("direct", "The reference answers' style (tiny-world: direct = the answer only, no worked "
                     "solution; other tasks: each example's first solution).")
    max_steps: int = opt(16, "Optimizer steps of the priming SFT.", min=1)
    per_device_train_batch_size: int = opt(8, "Sequences per priming step.", min=1)
    learning_rate: float = opt(5e-5, "Peak learning rate of the priming SFT.", min=0, min_exclusive=True)


@dataclasses.dataclass
class AttackConfig:
    teachers: dict[str, str] = opt({}, "Teachers by role (e.g. {control: PATH, undistillable: PATH}).")
    reference: str = opt("control", "The teacher whose attackers are the reference of every ratio (a key of teachers).")
    students: dict[str, str] = opt({}, "Attacker student bases by name: `default` (required), and for the unseen "
                                   "attackers `unseen` (another architecture and tokenizer) and `large` (teacher-sized).")
    proxy: str = opt("", "The defender's small model (the least_likely defense).")
    battery: list[Attacker] = opt(FULL_BATTERY, "The attackers (a YAML list of {name, method, budget, ...}).")
    defenses: list[Defense] = opt(DEFENSES, "Output-level defenses of a teacher, attacked by the battery's SFT "
                                  "attackers ([] = none).")
    repeats: int = opt(1, "Students per cell (different seeds); the table reports their mean and spread.", min=1)
    prime: PrimeConfig = sub(PrimeConfig, "Priming of pretrained attacker students on the answer format.")
    reuse: dict[str, str] = opt({}, "Cells run elsewhere: 'ATTACKER/TEACHER' (repeat 0) or 'ATTACKER/TEACHER/rK' "
                                "(repeat K) -> a distill output folder whose distill_card.json is read instead of "
                                "training (the pipeline's 1x cells).")
    output_dir: str = opt("runs/attack", "Where the cells, attack.json, attack.md and the plots go.")
    attacker: distill.DistillConfig = sub(distill.DistillConfig, "The base attacker (budget 1x): its settings; "
                                          "teacher, student, method and output_dir are filled in per cell.")
    task: TaskConfig = sub(TaskConfig, "The task (prompts and verifier).")

    def validate(self) -> None:
        """What a partial config (e.g. the pipeline's `attack` section, whose models it fills in) can be checked
        for; `check_inputs` checks the rest before a run."""
        names = [a.name for a in self.battery] + [d.name for d in self.defenses]
        if len(set(names)) != len(names):
            raise ConfigError("config key 'battery'/'defenses': names must be unique")
        for key in self.reuse:
            if "/" not in key:
                raise ConfigError(f"config key 'reuse.{key}': expected 'ATTACKER/TEACHER'")
        if self.teachers:
            self.check_inputs()

    def check_inputs(self) -> None:
        if not self.teachers:
            raise ConfigError("config key 'teachers': give at least one teacher (e.g. teachers.control=PATH)")
        if self.reference not in self.teachers:
            raise ConfigError(f"config key 'reference': '{self.reference}' is not one of teachers "
                              f"({', '.join(self.teachers)})")
        if "default" not in self.students:
            raise ConfigError("config key 'students.default': the default attacker student is required")
        if self.prime.students and self.task.name == "tiny-world" and self.prime.style not in STYLES:
            raise ConfigError(f"config key 'prime.style': '{self.prime.style}' is not a tiny-world style "
                              f"({', '.join(STYLES)})")
        if unknown := [n for n in self.prime.students if n not in self.students]:
            raise ConfigError(f"config key 'prime.students': {unknown[0]!r} is not one of students "
                              f"({', '.join(self.students)})")
        for i, d in enumerate(self.defenses):
            if d.teacher not in self.teachers:
                raise ConfigError(f"config key 'defenses[{i}].teacher': '{d.teacher}' is not one of teachers")
            if unknown := [n for n in d.attackers if n not in {a.name for a in self.battery}]:
                raise ConfigError(f"config key 'defenses[{i}].attackers': {unknown[0]!r} is not an attacker of the "
                                  f"battery")
            if d.kind == "least_likely" and not self.proxy:
                raise ConfigError(f"config key 'proxy': defenses[{i}] (least_likely) needs the defender's model")

    @staticmethod
    def help_extra() -> str:
        """The default battery and defenses, one line each (shown by --help)."""
        def line(a: Attacker) -> str:
            what = [a.method, f"budget {a.budget:g}x"]
            if a.keep_correct_only:
                what.append("correct only")
            if a.best_of > 1:
                what.append(f"best of {a.best_of} by the student's likelihood")
            if a.sample_temperature is not None:
                what.append(f"T={a.sample_temperature:g}")
            if a.student != "default":
                what.append(f"student '{a.student}'")
            return f"  {a.name.ljust(20)} " + ", ".join(what)

        lines = ["The default battery (battery: a YAML list of these fields; the pipeline's small one: "
                 + ", ".join(a.name for a in SMALL_BATTERY) + "):", *map(line, FULL_BATTERY),
                 "", "The default defenses (each attacked by the battery's SFT attackers):"]
        lines += [f"  {d.name.ljust(20)} {d.kind} of the {d.teacher} teacher" for d in DEFENSES]
        return "\n".join(lines)

    def defenses_by_name(self) -> dict[str, Defense]:
        return {d.name: d for d in self.defenses}


def cell_config(cfg: AttackConfig, a: Attacker, teacher: str, repeat: int, folder: Path) -> distill.DistillConfig:
    """The distill config of one cell: the base attacker scaled by the budget and changed by the attacker."""
    base = cfg.attacker
    d = cfg.defenses_by_name().get(teacher)
    n_train = cfg.task.num_train
    return dataclasses.replace(
        base, teacher=cfg.teachers[d.teacher if d else teacher], student=cfg.students[a.student], method=a.method,
        max_steps=max(1, round(base.max_steps * a.budget)),
        num_prompts=max(1, min(n_train, round(base.num_prompts * a.budget))),
        keep_correct_only=a.keep_correct_only or base.keep_correct_only,
        num_generations=a.best_of if a.best_of > 1 else base.num_generations, keep_most_likely=a.best_of > 1,
        sample_temperature=base.sample_temperature if a.sample_temperature is None else a.sample_temperature,
        learning_rate=a.learning_rate or base.learning_rate,
        per_device_train_batch_size=a.per_device_train_batch_size or base.per_device_train_batch_size,
        teacher_defense=d.kind if d else "none", defense_model=cfg.proxy if d else "",
        defense_generations=d.generations if d else base.defense_generations,
        teacher_samples=None, resume=False, output_dir=str(folder), task=cfg.task,
        runtime=dataclasses.replace(base.runtime, seed=base.runtime.seed + 1000 * repeat))


def skip_reason(cfg: AttackConfig, a: Attacker, teacher: str) -> str | None:
    if a.student not in cfg.students:
        return f"no attacker student '{a.student}' (students.{a.student}=PATH)"
    d = cfg.defenses_by_name().get(teacher)
    if d is not None and a.method != "sft":
        return "a text-only defense exposes no logits (SFT attackers only)"
    if d is not None and d.attackers and a.name not in d.attackers:
        return f"not one of defenses[{d.name}].attackers"
    return None


def sampling_key(d: distill.DistillConfig) -> tuple | None:
    """What a cell's teacher samples depend on (None: a defended teacher, whose samples are never shared). Cells
    with one key (SFT, KD and GKD at one budget and repeat) train on the same samples, drawn once, as the
    pipeline's distill stage does: the methods are compared on the same data, and the teacher samples once."""
    if d.teacher_defense != "none":
        return None
    return (d.teacher, d.num_prompts, d.num_generations, d.keep_correct_only, d.keep_most_likely,
            d.student if d.keep_most_likely else None, d.sample_temperature, d.max_new_tokens, d.runtime.seed)


def _reused_sampling_key(folder: Path) -> tuple | None:
    """The sampling_key of a distill run elsewhere (its config.yaml), None if it has no samples or config."""
    from ..config import load_config

    if not (folder / "teacher_samples.jsonl").exists() or not (folder / "config.yaml").exists():
        return None
    try:
        return sampling_key(load_config(distill.DistillConfig, str(folder / "config.yaml")))
    except UserError:
        return None


def run_cell(cfg: AttackConfig, a: Attacker, teacher: str, repeat: int, log: dict, samples: dict) -> dict:
    """One student of one cell: reused (cfg.reuse, or an earlier run of the same cell), else trained, on the
    teacher samples of an earlier cell with the same sampling_key when there is one (`samples`: key -> JSONL). A
    failure is returned as {'failed': message}."""
    key = f"{a.name}/{teacher}" + (f"/r{repeat}" if repeat else "")
    out = Path(cfg.output_dir)
    name = f"cells/{a.name}/{teacher}/r{repeat}"
    dcfg = cell_config(cfg, a, teacher, repeat, out / name)
    skey = sampling_key(dcfg)
    if key in cfg.reuse:  # its teacher samples serve the later cells of the same sampling key too
        reused = Path(cfg.reuse[key])
        if skey is not None and skey not in samples and _reused_sampling_key(reused) == skey:
            samples[skey] = str(reused / "teacher_samples.jsonl")
        return {**load_json(reused / "distill_card.json"), "reused_from": cfg.reuse[key]}
    if skey is not None and skey in samples:
        dcfg = dataclasses.replace(dcfg, teacher_samples=samples[skey])
    try:
        card = run_stage(out, name, dcfg, "distill_card.json", distill.run, log)
    except UserError as e:  # e.g. a NaN loss, no correct samples: the cell failed, the battery goes on
        return {"failed": str(e)}
    if skey is not None and skey not in samples and (out / name / "teacher_samples.jsonl").exists():
        samples[skey] = str(out / name / "teacher_samples.jsonl")
    acc = card.get("student_accuracy")
    if acc is None or not math.isfinite(acc):
        return {"failed": f"student accuracy is {acc}"}
    return card


def summarise(cards: list[dict]) -> dict:
    """A cell's numbers from its students' cards: accuracy with its SE (docs/method.md §6, "Gain over base"), the
    base with its binomial SE, samples, steps, wall time."""
    ok = [c for c in cards if "failed" not in c]
    if not ok:
        return {"status": "failed", "errors": [c["failed"] for c in cards]}
    settings = ok[0].get("settings", {})
    n = settings.get("eval_prompts")
    stats = cell_stats([float(c["student_accuracy"]) for c in ok], n)
    base = float(np.mean([c["student_accuracy_before"] for c in ok]))
    return {"status": "ok" if len(ok) == len(cards) else "partial", **stats,
            "base": base, "base_se": binomial_se(base, n) if n else None, "gain": stats["accuracy"] - base,
            "samples": int(np.mean([c.get("num_teacher_samples", 0) for c in ok])),
            "steps": settings.get("max_steps"), "prompts": settings.get("num_prompts"),
            "eval_prompts": settings.get("eval_prompts"),
            "teacher_sample_accuracy": ok[0].get("teacher_sample_accuracy"),
            "wall_seconds": float(sum(c.get("wall_seconds", 0.0) for c in ok if "reused_from" not in c)),
            "errors": [c["failed"] for c in cards if "failed" in c]}


def prime_student(cfg: AttackConfig, name: str, out: Path, log: dict) -> str:
    """The primed copy of attacker student `name` (a cached stage under primed/NAME: SFT on the reference answers
    of the first prime.num_prompts training prompts in prime.style); its folder."""
    p, base = cfg.prime, cfg.attacker
    folder = f"primed/{name}"
    pcfg = dataclasses.replace(
        base, teacher="dataset", student=cfg.students[name], method="sft",
        reference_styles=[p.style] if cfg.task.name == "tiny-world" else [],
        num_prompts=p.num_prompts, max_steps=p.max_steps, learning_rate=p.learning_rate,
        per_device_train_batch_size=p.per_device_train_batch_size, warmup_steps=min(base.warmup_steps, p.max_steps // 4),
        num_generations=1, keep_correct_only=False, keep_most_likely=False, teacher_defense="none",
        teacher_samples=None, use_peft=False, save_steps=0, resume=False, output_dir=str(out / folder), task=cfg.task)
    def prime(c):
        print(f"attack: priming the attacker student '{name}' on {p.num_prompts} {p.style} answers", flush=True)
        return distill.run(c)

    run_stage(out, folder, pcfg, "distill_card.json", prime, log)
    return str(out / folder / "model")


def describe_students(cfg: AttackConfig, given: dict[str, str], out: Path) -> dict[str, dict]:
    """Whom each attacker student is (models.describe_model), and for a primed one its pretrained origin and the
    priming (answers, style, accuracy before and after)."""
    from ..models import describe_model

    used = {a.student for a in cfg.battery} & set(given)
    desc = {}
    for name in sorted(used):
        d = describe_model(given[name])
        if name in cfg.prime.students and (out / "primed" / name / "distill_card.json").exists():
            card = load_json(out / "primed" / name / "distill_card.json")
            d["primed"] = {"answers": cfg.prime.num_prompts, "style": cfg.prime.style, "steps": cfg.prime.max_steps,
                           "accuracy_before": card.get("student_accuracy_before"),
                           "accuracy_after": card.get("student_accuracy")}
        desc[name] = d
    return desc


def run(cfg: AttackConfig) -> dict:
    """Run the battery against every teacher (and defended teacher); write attack.json, attack.md, the plots."""
    from ..report.attack import write_attack_report

    t0 = time.time()
    cfg.check_inputs()
    out = check_output_dir(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "attack_config.yaml")
    columns = list(cfg.teachers) + [d.name for d in cfg.defenses]
    log: dict = {"_root": out}
    cells: dict = {}
    samples: dict = {}  # sampling_key -> the teacher samples a cell drew (shared with the cells after it)
    given = dict(cfg.students)
    for a in cfg.battery:
        if a.student in cfg.prime.students and cfg.students[a.student] == given[a.student]:
            # primed when its first attacker comes (a battery cut before it never pays for it)
            cfg = dataclasses.replace(cfg, students={**cfg.students, a.student: prime_student(cfg, a.student, out, log)})
        cells[a.name] = {}
        for teacher in columns:
            if (why := skip_reason(cfg, a, teacher)) is not None:
                cells[a.name][teacher] = {"status": "skipped", "reason": why}
                continue
            print(f"attack: {a.name} on the {teacher} teacher ({time.time() - t0:.0f}s elapsed)", flush=True)
            cells[a.name][teacher] = summarise([run_cell(cfg, a, teacher, r, log, samples)
                                                for r in range(a.repeats or cfg.repeats)])
    relate(cells, cfg.reference)
    on_curve = curve_of(cfg.battery)
    others = [t for t in columns if t != cfg.reference]
    result = {"reference": cfg.reference, "teachers": columns, "repeats": cfg.repeats,
              "battery": [dataclasses.asdict(a) | {"is_budget": a.is_budget, "curve": on_curve.get(a.name)}
                          for a in cfg.battery],
              "students": describe_students(cfg, given, out),
              "defenses": [dataclasses.asdict(d) for d in cfg.defenses], "cells": cells,
              "protection": {t: protected_budget(cells, cfg.battery, t) for t in others},
              "cost_multiplier": {t: cost_multiplier(cells, cfg.battery, t, cfg.reference) for t in others},
              "strongest_attack": {t: strongest_attack(cells, cfg.battery, t, cfg.reference) for t in others},
              "wall_seconds": time.time() - t0, "versions": versions(),
              "precision": cfg.attacker.runtime.precision()}
    write_attack_report(out, result)  # (adds the plots' names)
    write_json(out / "attack.json", result)
    return result
