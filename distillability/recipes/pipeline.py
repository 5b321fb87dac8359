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
from typing import Any

from ..config import TaskConfig, from_dict, load_data, merge, opt, read_yaml, save_config, sub
from ..errors import ConfigError
from ..io import check_output_dir, versions, write_json
from ..protection import TEACHERS
from ..report.protection import headline_table, write_report
from . import attack, calibrate, diagnose, distill, evaluate
from .stages import run_stage
from .world import WorldConfig, build_attacker_students, build_world


@dataclasses.dataclass
class PipelineConfig:
    output_dir: str = opt("runs/demo", "Run folder: models, cards, reports, headline.json.")
    seed: int = opt(0, "Seed of the whole run (world, sampling, training).")
    knob_seed: int | None = opt(None, "Seed of everything after the original teacher (calibrations, students, "
                                "evaluations, attacks); null = seed. Another knob_seed with the same seed replicates "
                                "the knob on the same world, task split and original teacher.")
    quick: bool = opt(False, "Tiny settings for a smoke run of the whole chain (minutes).")
    teacher: str = opt("", "Teacher model; empty (all three empty) or `world` = the tiny world's teacher.")
    proxy: str = opt("", "Calibration proxy; empty (all three empty) or `world` = the tiny world's proxy.")
    student: str = opt("", "Student base; empty (all three empty) or `world` = the tiny world's student (e.g. a "
                       "real teacher against the world's small models: teacher=packaged:..., proxy=world, "
                       "student=world).")
    teacher_sft_steps: int = opt(0, "SFT steps on the task's reference solutions (teacher=dataset) that make a "
                                 "pretrained teacher competent on the task before anything else; 0 = skip.", min=0)
    converge_steps: int = opt(25, "RL steps on task reward alone that make the teacher 'converged' "
                              "(the released-instruct-model role) before anything else; 0 = skip.", min=0)
    eta_distillable: float = opt(-1.0, "eta of the distillable calibration (< 0).", max=0)
    eta_undistillable: float = opt(1.0, "eta of the undistillable calibration (> 0).", min=0)
    methods: list[str] = opt(["sft", "kd", "gkd"], "Distillation methods.", choices=("sft", "kd", "gkd"))
    extra_proxies: dict[str, str] = opt({}, "More calibration proxies by label (e.g. {attacker: "
                                        "packaged:smollm2-135m-instruct}, the attacker's own base): each calibrates "
                                        "one more teacher at eta_undistillable, the role `undistillable@LABEL`, "
                                        "evaluated, distilled and attacked beside the others. `primed:NAME` = the "
                                        "attack's student NAME after its priming (attack.prime): the proxy of an "
                                        "attacker who has already fine-tuned on the answer format.")
    extra_etas: dict[str, float] = opt({}, "eta of `undistillable@LABEL` by label (default eta_undistillable): an "
                                       "eta sweep of one proxy is one label per eta (choose among them on "
                                       "evaluate.eval_offset's validation prompts, not the reported ones).")
    extra_calibrate: dict[str, dict[str, Any]] = opt({}, "Calibrate settings of `undistillable@LABEL` by label, on "
                                                     "top of `calibrate` (e.g. {adaptive: {proxy_updates: 4}}: an "
                                                     "adversarial proxy for that teacher only).")
    distill_teachers: list[str] = opt([], "The teachers the distill stage distills students from ([] = every teacher; "
                                      "the control is always included: it is the reference of every gain share): "
                                      "original, control, distillable, undistillable, undistillable@LABEL.")
    students_per_cell: int = opt(1, "Students distilled per teacher and method (seeds S, S+1000, ...): the students' "
                                 "gain over the base is their mean, its SE from their spread (one student: the "
                                 "binomial SE only, a direction, not a result); the attack stage reuses them as its "
                                 "1x cells and runs at least as many per cell.", min=1)
    skip: list[str] = opt([], "Stages to skip.", choices=("diagnose", "calibrate", "distill", "attack"))
    attack_battery: str = opt("small", "The attack stage's battery: small (SFT at 1x and 4x the distill budget and "
                              "best-of-4, against the control and undistillable teachers), full (the whole battery "
                              "of `distillability attack --help` against every teacher, with the defenses and the "
                              "unseen students), custom (attack.battery and attack.defenses as given).",
                              choices=("small", "full", "custom"))
    shifted_terms: int = opt(0, "Utility on a shifted split (tiny-world): every teacher is also evaluated on held-out "
                             "chains of exactly this many terms: a length longer than any in the task (e.g. "
                             "task.world_max_terms + 1: neither the world nor the calibration saw it), or, with "
                             "calibration_terms, a length of the task the calibration did not see (the task's "
                             "held-out chains of that length); headline.json's teachers_shifted. 0 = off.", min=0)
    calibration_terms: list[int] = opt([], "tiny-world: the calibrations' prompts (and their cards) are only the "
                                       "task's chains of these many terms (task.world_terms for the calibrate "
                                       "stage; the splits stay the task's, filtered); [] = the whole task.")
    attack_teachers: list[str] = opt([], "The teachers the attack stage attacks ([] = control and undistillable for "
                                     "the small battery, every teacher for full and custom; the control is always "
                                     "included: it is the reference of every ratio), in the order the attack "
                                     "runs them: original, control, distillable, undistillable, undistillable@LABEL.")
    threads: int = opt(2, "torch CPU threads.", min=0)
    report_to: list[str] = opt(["none"], "Trackers for every stage's logged scalars (TRL's report_to): none, trackio "
                               "(one local project for the run, <output_dir>/trackio, a run per stage), tensorboard "
                               "(event files in each stage's folder), all, or a list.",
                               choices=("none", "trackio", "tensorboard", "all"))
    progress: bool = opt(True, "Progress bars.")
    teacher_sft: distill.DistillConfig = sub(distill.DistillConfig, "Settings of the teacher's SFT stage "
                                             "(teacher_sft_steps > 0; models, method and steps are filled in).")
    world: WorldConfig = sub(WorldConfig, "The tiny world (used when teacher/proxy/student are empty).")
    task: TaskConfig = sub(TaskConfig, "The task (tiny-world by default).")
    diagnose: diagnose.DiagnoseConfig = sub(diagnose.DiagnoseConfig, "Diagnose settings (models are filled in).")
    calibrate: calibrate.CalibrateConfig = sub(calibrate.CalibrateConfig, "Calibration settings (eta, models filled in).")
    distill: distill.DistillConfig = sub(distill.DistillConfig, "Distillation settings (method, models filled in).")
    evaluate: evaluate.EvaluateConfig = sub(evaluate.EvaluateConfig, "Evaluation settings.")
    attack: attack.AttackConfig = sub(attack.AttackConfig, "Attack stage settings (repeats; battery and defenses "
                                      "with attack_battery=custom; teachers, students and the base attacker are "
                                      "filled in: the base attacker is the distill stage's).")

    def calibrate_of(self, label: str) -> calibrate.CalibrateConfig:
        """The calibrate settings of extra proxy `label`: `calibrate` with its extra_calibrate entry on top."""
        extra = self.extra_calibrate.get(label)
        return from_dict(calibrate.CalibrateConfig, extra, prefix=f"extra_calibrate.{label}.",
                         base=self.calibrate) if extra else self.calibrate

    def roles(self) -> list[str]:
        """Every teacher role this config can produce, in report order."""
        return [*TEACHERS, *(f"undistillable@{label}" for label in self.extra_proxies)]

    def validate(self) -> None:
        for key in ("distill_teachers", "attack_teachers"):
            if unknown := [t for t in getattr(self, key) if t not in self.roles()]:
                raise ConfigError(f"config key '{key}': {unknown[0]!r} is not a teacher role "
                                  f"({', '.join(self.roles())})")
        for label, spec in self.extra_proxies.items():
            if not label or "/" in label or label in ("world",):
                raise ConfigError(f"config key 'extra_proxies.{label}': a label is a plain name (e.g. attacker)")
            if (name := primed_name(spec)) is not None and name not in self.attack.prime.students:
                raise ConfigError(f"config key 'extra_proxies.{label}': {spec!r} names no primed attack student "
                                  f"(attack.prime.students: {self.attack.prime.students})")
        for key in ("extra_calibrate", "extra_etas"):
            if unknown := [label for label in getattr(self, key) if label not in self.extra_proxies]:
                raise ConfigError(f"config key '{key}.{unknown[0]}': no extra proxy has that label "
                                  f"({', '.join(self.extra_proxies) or 'extra_proxies is empty'})")
        for label, settings in self.extra_calibrate.items():
            if set_here := [k for k in settings if k in FILLED_IN["calibrate"]]:
                raise ConfigError(f"config key 'extra_calibrate.{label}.{set_here[0]}': the pipeline sets it"
                                  + (f" (use extra_etas.{label})" if set_here[0] == "eta" else ""))
            self.calibrate_of(label)  # an unknown or ill-typed key: its one-line error now
        for label, eta in self.extra_etas.items():
            if eta <= 0:
                raise ConfigError(f"config key 'extra_etas.{label}': {eta} is not > 0 (an undistillable teacher)")
        given = [bool(self.teacher), bool(self.proxy), bool(self.student)]
        if any(given) and not all(given):
            raise ConfigError("config keys 'teacher', 'proxy', 'student': give all three (a model, or `world` for the "
                              "tiny world's) or none (the tiny world's three)")
        if self.shifted_terms and self.task.name != "tiny-world":
            raise ConfigError("config key 'shifted_terms': a shifted split of chain lengths needs task tiny-world")
        if self.calibration_terms and self.task.name != "tiny-world":
            raise ConfigError("config key 'calibration_terms': chain lengths need task tiny-world")
        task_lengths = range(self.task.world_min_terms, self.task.world_max_terms + 1)
        if any(n not in task_lengths for n in self.calibration_terms):
            raise ConfigError(f"config key 'calibration_terms': {self.calibration_terms} must be among the task's "
                              f"chain lengths ({task_lengths.start}-{task_lengths.stop - 1} terms)")
        if 0 < self.shifted_terms < self.task.world_min_terms:
            raise ConfigError(f"config key 'shifted_terms': {self.shifted_terms} terms is below the task's shortest "
                              f"chain (task.world_min_terms={self.task.world_min_terms})")
        if self.shifted_terms in self.calibration_terms or (self.shifted_terms in task_lengths
                                                            and not self.calibration_terms):
            seen = self.calibration_terms or list(task_lengths)
            raise ConfigError(f"config key 'shifted_terms': the calibration sees chains of {self.shifted_terms} terms "
                              f"(it sees {seen[0]}-{seen[-1]}); use a longer chain, or calibration_terms without it")
        if (not any(given) or "world" in (self.teacher, self.proxy, self.student)) and self.task.name != "tiny-world":
            raise ConfigError(f"config key 'task.name': the tiny world's models (teacher/proxy/student empty or "
                              f"`world`) are trained on task tiny-world, not '{self.task.name}'")
        c = self.calibrate
        if c.min_accuracy_ratio > 0 and c.guard_split == "held_out":
            # the guard selects checkpoints on the held-out split's last guard_prompts: no reported number may
            # score them
            free = self.task.num_eval - c.guard_prompts
            for key, n in (("evaluate.eval_prompts", self.evaluate.eval_prompts),
                           ("distill.eval_prompts", self.distill.eval_prompts), ("calibrate.eval_prompts", c.eval_prompts)):
                if n > free:
                    raise ConfigError(f"config key '{key}': {n} prompts reach into the utility guard's last "
                                      f"{c.guard_prompts} of task.num_eval={self.task.num_eval}; raise task.num_eval "
                                      f"to >= {n + c.guard_prompts} or lower {key}")


def _with(cfg, **changes):
    return dataclasses.replace(cfg, **changes)


class Chain:
    """One pipeline run: its folder, its task, the models so far, the progress counter and the stage log."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg, self.t0 = cfg, time.time()
        self.out = check_output_dir(cfg.output_dir)
        self.task = _with(cfg.task, seed=cfg.seed)
        n_teachers = 1 if "calibrate" in cfg.skip else len(set(cfg.distill_teachers or cfg.roles()) | {"control"})
        self.total = (1 + (1 if cfg.teacher_sft_steps else 0) + (0 if "diagnose" in cfg.skip else 1)
                      + (0 if "calibrate" in cfg.skip else 3 + len(cfg.extra_proxies)
                         + len({primed_name(p) for p in cfg.extra_proxies.values()} - {None}))
                      + (0 if "distill" in cfg.skip else n_teachers * len(cfg.methods) * cfg.students_per_cell) + 1
                      + (0 if "attack" in cfg.skip or "calibrate" in cfg.skip else 1))
        self.done = 0
        self.log: dict = {"_root": self.out}
        self.models: dict[str, str] = {}
        self.primed: dict[str, str] = {}  # attack students primed as extra proxies: their folders

    def announce(self, what: str) -> None:
        self.done += 1
        print(f"[{self.done}/{self.total}] {what}  ({time.time() - self.t0:.0f}s elapsed)", flush=True)

    def runtime(self, sub_cfg, original: bool = False):
        """A stage's runtime: the pipeline's threads, progress and trackers; `seed` for the stages that make the
        original teacher, knob_seed (when set) for everything after it."""
        seed = self.cfg.seed if original or self.cfg.knob_seed is None else self.cfg.knob_seed
        return _with(sub_cfg.runtime, seed=seed, threads=self.cfg.threads, progress=self.cfg.progress,
                     report_to=list(self.cfg.report_to))

    def stage(self, name: str, cfg, marker: str, fn, under: Path | None = None):
        return run_stage(under or self.out, name, cfg, marker, fn, self.log)

    def stages(self) -> dict:
        return {k: v for k, v in self.log.items() if k != "_root"}


def prepare_models(c: Chain) -> str:
    """The teacher, proxy and student base (given, or the tiny world's), and the original teacher: after the
    optional SFT on the task's reference solutions and the RL that makes it 'converged'."""
    cfg, out = c.cfg, c.out
    c.announce("models: build or load the teacher, proxy and student base")
    given = {"teacher": cfg.teacher, "proxy": cfg.proxy, "student": cfg.student}
    from_world = {role for role, spec in given.items() if spec in ("", "world")}
    world = build_world(cfg.world, c.task, progress=cfg.progress) if from_world else {}
    c.models = {role: world[role] if role in from_world else spec for role, spec in given.items()}
    original = c.models["teacher"]
    if cfg.teacher_sft_steps:
        c.announce(f"teacher SFT: {cfg.teacher_sft_steps} steps on the task's reference solutions")
        scfg = _with(cfg.teacher_sft, teacher="dataset", student=original, method="sft", max_steps=cfg.teacher_sft_steps,
                     teacher_samples=None, output_dir=str(out / "teacher_sft"), task=c.task,
                     runtime=c.runtime(cfg.teacher_sft, original=True))
        c.stage("teacher_sft", scfg, "distill_card.json", distill.run)
        original = str(out / "teacher_sft" / "model")
    if cfg.converge_steps:
        conv = _with(cfg.calibrate, model=original, proxy=c.models["proxy"], eta=0.0, max_steps=cfg.converge_steps,
                     output_dir=str(out / "teacher_converged"), task=c.task,
                     runtime=c.runtime(cfg.calibrate, original=True))
        c.stage("teacher_converged", conv, "calibration_card.json", calibrate.run)
        original = str(out / "teacher_converged" / "model")
    return original


def calibrate_teachers(c: Chain, original: str) -> tuple[dict, dict]:
    """Calibrate three times from the same start for the same steps: (teachers by role, calibration cards)."""
    cfg, teachers, cards = c.cfg, {"original": original}, {}
    calibrations = [] if "calibrate" in cfg.skip else [
        ("control", 0.0), ("distillable", cfg.eta_distillable), ("undistillable", cfg.eta_undistillable)]
    proxies = {name: c.models["proxy"] for name, _ in calibrations}
    settings = {name: cfg.calibrate for name, _ in calibrations}
    if "calibrate" not in cfg.skip:
        for label, spec in cfg.extra_proxies.items():
            calibrations.append((f"undistillable@{label}", cfg.extra_etas.get(label, cfg.eta_undistillable)))
            name = primed_name(spec)
            proxies[f"undistillable@{label}"] = spec if name is None else primed_student(c, name)
            settings[f"undistillable@{label}"] = cfg.calibrate_of(label)
    for name, eta in calibrations:
        c.announce(f"calibrate: {name} (eta={eta:+g})")
        task = _with(c.task, world_terms=list(cfg.calibration_terms)) if cfg.calibration_terms else c.task
        ccfg = _with(settings[name], model=original, proxy=proxies[name], eta=eta,
                     output_dir=str(c.out / f"calibrate_{name}"), task=task, runtime=c.runtime(settings[name]))
        cards[name] = c.stage(f"calibrate_{name}", ccfg, "calibration_card.json", calibrate.run)
        teachers[name] = str(c.out / f"calibrate_{name}" / "model")
    return teachers, cards


def distill_students(c: Chain, teachers: dict) -> tuple[dict, dict]:
    """Students from each teacher by each method, students_per_cell of each (repeat r: seed S + 1000 r, the attack
    battery's convention), every method of one repeat on the same teacher samples (sampled once): (the first
    student's folder per (method, teacher), every repeat's distill folder per (method, teacher))."""
    cfg, students, folders = c.cfg, {}, {}
    wanted = set(cfg.distill_teachers or cfg.roles()) | {"control"}
    for tname in ([] if "distill" in cfg.skip else [t for t in cfg.roles() if t in teachers and t in wanted]):
        for r in range(cfg.students_per_cell):
            shared_samples = None
            for method in cfg.methods:
                who = f" (student {r + 1} of {cfg.students_per_cell})" if cfg.students_per_cell > 1 else ""
                c.announce(f"distill: {method} from the {tname} teacher{who}")
                folder = f"distill_{method}_{tname}" + (f"_r{r}" if r else "")
                rt = c.runtime(cfg.distill)
                tcfg = _with(cfg.distill, teacher=teachers[tname], student=c.models["student"], method=method,
                             output_dir=str(c.out / folder), task=c.task, runtime=_with(rt, seed=rt.seed + 1000 * r),
                             teacher_samples=shared_samples)
                c.stage(folder, tcfg, "distill_card.json", distill.run)
                folders.setdefault((method, tname), []).append(str(c.out / folder))
                if r == 0:
                    students[(method, tname)] = str(c.out / folder / "model")
                shared_samples = shared_samples or str(c.out / folder / "teacher_samples.jsonl")
    return students, folders


def student_cells(folders: dict) -> dict:
    """Per method and teacher: the cell of its students (attack.summarise of their distill cards: accuracy, SE from
    their spread, base), related to the control's cell (gain, gain share, both with SEs)."""
    from ..io import load_json
    from ..protection import relate

    cells: dict = {}
    for (method, tname), paths in folders.items():
        cells.setdefault(method, {})[tname] = attack.summarise([load_json(Path(p) / "distill_card.json") for p in paths])
    relate(cells, "control")
    return cells


def attacker_facts(c: Chain, folders: dict) -> dict:
    """Whom the distill stage measured: the student (describe_model), the budget, students per cell."""
    from ..io import load_json
    from ..models import describe_model

    first = next(iter(folders.values()), [])
    card = load_json(Path(first[0]) / "distill_card.json") if first else {}
    settings = card.get("settings", {})
    return {"student": describe_model(c.models["student"]), "students_per_cell": c.cfg.students_per_cell,
            "budget": {"steps": settings.get("max_steps"), "prompts": settings.get("num_prompts"),
                       "samples": card.get("num_teacher_samples"), "eval_prompts": settings.get("eval_prompts")}}


def evaluate_all(c: Chain, teachers: dict, students: dict) -> dict:
    """Every teacher (with D to the proxy) and student, and the student base: the floor every student is read
    against (a distilled student below it learned nothing usable from its teacher)."""
    cfg = c.cfg
    # a validation slice (evaluate.eval_offset) gets its own folder: the reported one is never overwritten by it
    where = c.out / ("eval" if not cfg.evaluate.eval_offset else f"eval_from{cfg.evaluate.eval_offset}")
    c.announce("evaluate: every teacher and student; write the report")

    def one(name: str, model: str, proxy: str | None, task=c.task) -> dict:
        ecfg = _with(cfg.evaluate, model=model, proxy=proxy, output_dir=str(where / name), task=task,
                     runtime=c.runtime(cfg.evaluate))
        return c.stage(name, ecfg, "eval.json", evaluate.run, under=where)

    evaluations = {"teachers": {t: one(f"teacher_{t}", path, c.models["proxy"]) for t, path in teachers.items()},
                   "students": {}}
    if cfg.shifted_terms:
        n = cfg.shifted_terms
        if n <= c.task.world_max_terms:  # a length of the task the calibration did not see: its held-out chains
            shifted = _with(c.task, world_terms=[n])
        else:
            shifted = _with(c.task, num_train=1, world_min_terms=n, world_max_terms=n, world_mc_share=0.0,
                            world_heldout="iid")
        evaluations["teachers_shifted"] = {t: one(f"teacher_{t}_shifted{n}", path, None, shifted)
                                           for t, path in teachers.items()}
        evaluations["shifted_split"] = shifted_split_name(cfg)
    for (method, tname), path in students.items():
        evaluations["students"].setdefault(method, {})[tname] = one(f"student_{method}_{tname}", path, None)
    if students:
        evaluations["student_base"] = one("student_base", c.models["student"], None)
    return evaluations


def shifted_split_name(cfg: PipelineConfig) -> str:
    """What the shifted split is, in words (the report and headline.json name it)."""
    n = cfg.shifted_terms
    if n > cfg.task.world_max_terms:
        return f"held-out chains of {n} terms, longer than any the world or the calibration saw"
    seen = cfg.calibration_terms
    return (f"the task's held-out chains of {n} terms: the world's models trained on this length, the calibration "
            f"(chains of {', '.join(map(str, seen))} terms) never saw it")


def attack_roles(cfg: PipelineConfig, teachers: dict) -> list[str]:
    """The teachers the attack stage attacks: in report order, or the control (the reference, always) and then
    attack_teachers in its order."""
    full = cfg.attack_battery != "small"
    if not cfg.attack_teachers:
        return [t for t in cfg.roles() if t in teachers and (full or t in ("control", "undistillable"))]
    return [t for t in dict.fromkeys(["control", *cfg.attack_teachers]) if t in teachers]


def attack_teachers(c: Chain, teachers: dict, folders: dict) -> dict | None:
    """The attack battery against the calibrated teachers; the 1x cells that the distill stage already ran are
    read from it (same settings and seed), not retrained."""
    cfg = c.cfg
    if "attack" in cfg.skip or "control" not in teachers:
        return None
    c.announce(f"attack: the {cfg.attack_battery} battery")
    battery = {"small": attack.SMALL_BATTERY, "full": attack.FULL_BATTERY}.get(cfg.attack_battery, cfg.attack.battery)
    defenses = {"small": [], "full": attack.DEFENSES}.get(cfg.attack_battery, cfg.attack.defenses)
    roles = attack_roles(cfg, teachers)
    pool = {"default": c.models["student"], **cfg.attack.students}
    if cfg.student in ("", "world") and any(a.student in ("unseen", "large") for a in battery):
        pool = {**build_attacker_students(cfg.world, c.task, progress=cfg.progress), **pool}
    reuse = {f"{a.name}/{t}" + (f"/r{r}" if r else ""): folder for a in battery for t in roles
             if a.is_budget and a.budget == 1.0 for r, folder in enumerate(folders.get((a.method, t), []))}
    acfg = _with(attack_config(c), teachers={t: teachers[t] for t in roles}, reference="control", students=pool,
                 repeats=max(cfg.attack.repeats, cfg.students_per_cell), battery=battery, defenses=defenses,
                 reuse=reuse)
    return c.stage("attack", acfg, "attack.json", attack.run)


def attack_config(c: Chain) -> attack.AttackConfig:
    """The attack stage's settings that every use of it shares (its folder, proxy and base attacker)."""
    cfg = c.cfg
    return _with(cfg.attack, proxy=c.models["proxy"], output_dir=str(c.out / "attack"), task=c.task,
                 attacker=_with(cfg.distill, task=c.task, runtime=c.runtime(cfg.distill)))


def primed_name(spec: str) -> str | None:
    """The attack student an extra proxy `primed:NAME` names (None: the proxy is a model itself)."""
    return spec.removeprefix("primed:") if spec.startswith("primed:") else None


def primed_student(c: Chain, name: str) -> str:
    """The attack's student `name` after its priming, primed now (before the calibration that uses it as a proxy)
    in the attack stage's own cached folder, so the attack reuses it."""
    if name not in c.primed:
        c.announce(f"attack: prime the student '{name}' (an extra proxy)")
        c.primed[name] = attack.prime_student(attack_config(c), name, c.out / "attack", None)
    return c.primed[name]


def run(cfg: PipelineConfig) -> dict:
    from ..training import set_threads

    set_threads(cfg.threads)  # from the start: the world's build runs before any stage sets it
    c = Chain(cfg)
    if set(cfg.report_to) & {"trackio", "all"}:
        import os

        os.environ.setdefault("TRACKIO_DIR", str(Path(cfg.output_dir).resolve() / "trackio"))
    c.out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, c.out / "pipeline_config.yaml")
    original = prepare_models(c)
    if "diagnose" not in cfg.skip:
        c.announce("diagnose: teacher vs student")
        dcfg = _with(cfg.diagnose, teacher=original, student=c.models["student"], output_dir=str(c.out / "diagnose"),
                     task=c.task, runtime=c.runtime(cfg.diagnose))
        c.stage("diagnose", dcfg, "diagnose.json", diagnose.run)
    teachers, cards = calibrate_teachers(c, original)
    students, folders = distill_students(c, teachers)
    attacks = attack_teachers(c, teachers, folders)
    evaluations = evaluate_all(c, teachers, students)
    cells = student_cells(folders) if folders else None
    headline = headline_table(evaluations, cfg.seed, time.time() - c.t0, attacks, cells=cells,
                              attacker=attacker_facts(c, folders) if folders else None)
    if cfg.knob_seed is not None:
        headline["knob_seed"] = cfg.knob_seed
    write_json(c.out / "headline.json", headline)
    write_json(c.out / "evaluations.json", {"evaluations": evaluations, "calibration_cards": cards,
                                            "models": c.models, "teachers": teachers, "stages": c.stages(),
                                            "versions": versions()})
    write_report(c.out, headline, evaluations, cards, attacks,
                 facts={"versions": versions(), "threads": cfg.threads, "stages": c.stages()})
    return headline


PRESETS = Path(__file__).resolve().parent.parent / "presets"
# what the pipeline fills into each stage's config itself: a user value there would be silently replaced
FILLED_IN = {
    "teacher_sft": ("teacher", "student", "method", "max_steps", "teacher_samples", "output_dir", "task"),
    "diagnose": ("teacher", "student", "output_dir", "task"),
    "calibrate": ("model", "proxy", "eta", "output_dir", "task"),
    "distill": ("teacher", "student", "method", "output_dir", "task", "teacher_samples"),
    "evaluate": ("model", "proxy", "output_dir", "task"),
    "attack": ("teachers", "reference", "proxy", "reuse", "attacker", "output_dir", "task"),
}
FILLED_IN_RUNTIME = ("seed", "threads", "progress", "report_to")
SET_BY = {"report_to": "report_to", "attacker": "distill.* (the base attacker is the distill stage's)", "task": "task.*", "eta": "eta_distillable / eta_undistillable", "max_steps": "teacher_sft_steps",
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
