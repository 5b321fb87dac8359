"""`distillability <recipe> [--config FILE.yaml] [key=value | --key value ...]`

A thin layer: parse a config, call the recipe. Errors a user can cause print one line and exit 2.
"""

from __future__ import annotations

import os
import sys

import click

from .config import describe, load_config, parse_overrides
from .errors import OutputError, UserError

RECIPES = {
    "diagnose": ("distillability.recipes.diagnose", "DiagnoseConfig", "Measure the distillation traps between a teacher and a student."),
    "calibrate": ("distillability.recipes.calibrate", "CalibrateConfig", "RL-calibrate a teacher's distillability with the knob eta."),
    "distill": ("distillability.recipes.distill", "DistillConfig", "Distill a student from a teacher by SFT, KD or GKD."),
    "evaluate": ("distillability.recipes.evaluate", "EvaluateConfig", "Accuracy, pass@k, failure modes and causal metrics of a model."),
    "attack": ("distillability.recipes.attack", "AttackConfig", "Attack teachers with a battery of attackers: the protection curve."),
    "pipeline": ("distillability.recipes.pipeline", "PipelineConfig", "Run the whole chain end to end and write the report."),
}


def _load(name: str):
    import importlib

    module_name, cls_name, _ = RECIPES[name]
    module = importlib.import_module(module_name)
    return module, getattr(module, cls_name)


def help_defaults(name: str):
    """The config whose values --help shows as defaults: what a run with no options uses (the pipeline's with the
    embedded default preset applied)."""
    if name == "pipeline":
        from .recipes.pipeline import load_pipeline_config

        return load_pipeline_config(None, {})
    return None


def _help_text(name: str) -> str:
    _, cls = _load(name)
    rows = describe(cls, default=help_defaults(name))
    if name == "pipeline":  # keys the pipeline fills into each stage itself are refused in a config: not options
        from .recipes.pipeline import FILLED_IN, FILLED_IN_RUNTIME

        filled = tuple(f"{sec}.{k}" for sec, keys in FILLED_IN.items() for k in keys) + tuple(
            f"{sec}.runtime.{k}" for sec in FILLED_IN for k in FILLED_IN_RUNTIME)
        rows = [r for r in rows if not any(r[0] == f or r[0].startswith(f + ".") for f in filled)]
    width = max(len(r[0]) for r in rows)
    lines = [f"  {key.ljust(width)}  {meaning} [{typ}, default {default}]" for key, typ, default, meaning in rows]
    text = "Options (as key=value or --key value; sections with dots, e.g. task.name=gsm8k):\n\n" + "\n".join(lines)
    if hasattr(cls, "help_extra"):
        text += "\n\n" + cls.help_extra()
    return text


class RecipeCommand(click.Command):
    def format_help(self, ctx, formatter):
        super().format_help(ctx, formatter)
        formatter.write("\n" + _help_text(self.recipe) + "\n")


RUNNING: dict = {}  # the recipe and output folder of the run in progress (what Ctrl-C reports)


def _run(recipe: str, config_path: str | None, extra: list[str], preset_quick: bool | None = None) -> None:
    module, cls = _load(recipe)
    overrides = parse_overrides(extra)
    if recipe == "pipeline":
        from .recipes.pipeline import load_pipeline_config

        cfg = load_pipeline_config(config_path, overrides, preset_quick)
    else:
        cfg = load_config(cls, config_path, overrides)
    RUNNING.update(recipe=recipe, output_dir=getattr(cfg, "output_dir", None))
    result = module.run(cfg)
    if recipe == "pipeline":
        from .report.protection import gain_table, markdown_table

        click.echo("\nHeadline (greedy accuracy on held-out prompts; students: the mean of each cell's):\n"
                   + markdown_table(result))
        if gains := gain_table(result):
            click.echo("\nGain over the student base (± SE) and the share of the control teacher's students' gain:\n"
                       + gains)
        click.echo("\nVerdict:\n" + "\n".join(f"- {line}" for line in result.get("verdict", [])))
        click.echo(f"\nReport: {cfg.output_dir}/report.html")
    elif isinstance(result, dict) and result:  # (empty on non-main processes of a multi-process run)
        keys = [k for k in result if isinstance(result[k], (int, float)) and not isinstance(result[k], bool)]
        click.echo(" ".join(f"{k}={result[k]:.4g}" for k in keys[:12]))


def _guarded(fn, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo(interrupted_message(RUNNING.get("recipe"), RUNNING.get("output_dir"), sys.argv), err=True)
        sys.exit(130)
    except OutputError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)


def interrupted_message(recipe: str | None, output_dir: str | None, argv: list[str]) -> str:
    """What Ctrl-C leaves and how to go on: the newest checkpoint under the run folder, and the command."""
    import json
    import shlex
    from pathlib import Path

    if not recipe or not output_dir:
        return "interrupted (nothing was written yet)"
    states = sorted(Path(output_dir).rglob("checkpoints/last/state.json"), key=lambda p: p.stat().st_mtime)
    kept = "no checkpoint was written yet"
    if states:
        step = json.loads(states[-1].read_text()).get("step", "?")
        kept = f"the last checkpoint kept is {states[-1].parent} (step {step})"
    command = shlex.join(["distillability", *argv[1:]])
    if recipe == "pipeline":
        return (f"interrupted: {kept}; finished stages are kept. The same command continues (finished stages reused, "
                f"the cut stage from its last checkpoint): {command}")
    again = command if any(a in ("resume=true", "--resume") for a in argv) else f"{command} resume=true"
    return f"interrupted: {kept}. Continue with: {again}"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="distillability")
def main() -> None:
    """distillability: measure and control how well a teacher LLM can be distilled."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _make(name: str) -> None:
    @main.command(name=name, cls=RecipeCommand, help=RECIPES[name][2],
                  context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    @click.option("--config", "config_path", type=str, default=None, help="YAML config file.")
    @click.pass_context
    def cmd(ctx, config_path):
        _guarded(_run, name, config_path, list(ctx.args))

    cmd.recipe = name


for _name in RECIPES:
    _make(_name)


@main.command(name="demo", cls=RecipeCommand, context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
              help="The pipeline on the embedded default (tiny world, offline). Same options as `pipeline`.")
@click.option("--config", "config_path", type=str, default=None, help="YAML config file.")
@click.option("--quick", is_flag=True, help="Tiny settings: the whole chain in a few minutes.")
@click.option("--output-dir", type=str, default=None, help="Run folder (default runs/demo).")
@click.option("--seed", type=int, default=None, help="Seed of the run.")
@click.pass_context
def demo(ctx, config_path, quick, output_dir, seed):
    extra = list(ctx.args)
    if output_dir:
        extra.append(f"output_dir={output_dir}")
    if seed is not None:
        extra.append(f"seed={seed}")
    _guarded(_run, "pipeline", config_path, extra, preset_quick=quick)


demo.recipe = "pipeline"

if __name__ == "__main__":
    main()
