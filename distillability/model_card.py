"""Hugging Face model cards (README.md with YAML front matter) for every model folder the recipes save: what was
done to the model (calibrated with eta against a proxy; distilled by a method from a teacher; trained from scratch by
the tiny world), from which base, and what was measured (accuracy, D/char, wrong-trace preference). Loadable with
`huggingface_hub.ModelCard.load`; the evaluate recipe adds its measurements to a card it finds."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from .io import write_text
from .report.numbers import fmt as _fmt

PACKAGE = Path(__file__).resolve().parent
EVAL_START, EVAL_END = "<!-- distillability:evaluation -->", "<!-- /distillability:evaluation -->"


def _base_model(spec: str) -> str | None:
    """A base_model the Hub understands: a hub id or packaged model's name; a local folder is not one."""
    if spec.startswith("packaged:"):
        return {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
                "gemma-3-270m": "google/gemma-3-270m"}.get(spec.split(":", 1)[1])
    if spec.count("/") == 1 and not Path(spec).exists() and not spec.startswith((".", "/", "~")):
        return spec
    return None


def _front(tags: list[str], base: str | None, task: dict | None) -> str:
    meta = {"library_name": "transformers", "pipeline_tag": "text-generation",
            "tags": ["distillability", *tags]}
    if base:
        meta["base_model"] = base
    if task:
        meta["datasets"] = [task.get("path") or task.get("name")]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def calibrated_card(card: dict) -> str:
    """A calibrated teacher: eta, proxy, base model, steps, accuracy and D/char before and after."""
    eta = card["eta"]
    kind = "undistillable" if eta > 0 else "distillable" if eta < 0 else "control"
    what = {"undistillable": "harder to distill (eta > 0: its outputs pushed away from what the proxy finds likely, "
                             "the task reward keeping it correct)",
            "distillable": "easier to distill (eta < 0: its outputs pulled towards what the proxy finds likely)",
            "control": "the control: RL on the task reward alone (eta = 0), the fair baseline of a calibrated teacher"}[kind]
    body = [f"# A {kind} teacher, calibrated with distillability", "",
            f"This model is `{card['model']}` fine-tuned by reinforcement learning (GRPO, `{card.get('loss_type')}`) on "
            f"the task reward plus eta x a calibration reward, with **eta = {eta:+g}**, so that it is {what}.", "",
            "| setting | value |", "|---|---|", f"| eta | {eta:+g} |", f"| proxy (the calibration's small model) | "
            f"`{card['proxy']}` |", f"| base model | `{card['model']}` |", f"| RL steps | {card.get('steps')} |",
            f"| KL anchor beta | {card.get('beta')} |", f"| r_cal normalisation | {card.get('cal_normalization')} |",
            f"| seed | {card.get('seed')} |", "", "## Measured (held-out prompts of the task)", "",
            "| | before | after |", "|---|---|---|",
            f"| greedy accuracy | {_fmt(card.get('before_accuracy'))} | {_fmt(card.get('after_accuracy'))} |",
            f"| D(model ‖ proxy) per character | {_fmt(card.get('before_D_per_char'), '.4f')} | "
            f"{_fmt(card.get('after_D_per_char'), '.4f')} |", "",
            "D per character: the mean of log p_model(y|x) - log p_proxy(y|x) per character of the model's own "
            "samples (higher: harder for a small model to imitate). Method: "
            "https://arxiv.org/abs/2604.18963 and distillability's docs/method.md."]
    return _front(["calibrated-teacher", f"eta-{kind}"], _base_model(card["model"]), card.get("task")) + "\n".join(body) + "\n"


def distilled_card(card: dict) -> str:
    """A distilled student: method, teacher, student base, budget, accuracy before and after."""
    s = card.get("settings", {})
    body = [f"# A student distilled with distillability ({card['method'].upper()})", "",
            f"This model is `{card['student']}` distilled from the teacher `{card['teacher']}` by "
            f"**{card['method'].upper()}** (loss: {card.get('loss')}"
            + (f", cross-tokenizer `{card['cross_tokenizer']}`" if card.get("cross_tokenizer") else "") + ").", "",
            "| setting | value |", "|---|---|", f"| method | {card['method']} |", f"| teacher | `{card['teacher']}` |",
            f"| student base | `{card['student']}` |", f"| optimizer steps | {s.get('max_steps')} |",
            f"| teacher samples | {card.get('num_teacher_samples')} |", f"| seed | {card.get('seed')} |", "",
            "## Measured (held-out prompts of the task)", "", "| | accuracy |", "|---|---|",
            f"| the student base, before | {_fmt(card.get('student_accuracy_before'))} |",
            f"| this student | {_fmt(card.get('student_accuracy'))} |",
            f"| the teacher's samples it learned from | {_fmt(card.get('teacher_sample_accuracy'))} |"]
    base = None if card["student"] == "dataset" else _base_model(card["student"])
    tags = ["distilled-student", card["method"]] if card["teacher"] != "dataset" else ["sft", "task-sft"]
    return _front(tags, base, card.get("task")) + "\n".join(body) + "\n"


def world_card(name: str, info: dict, world: dict) -> str:
    """A model of the tiny world, trained from scratch."""
    role = {"teacher": "the teacher", "proxy": "the calibration proxy", "student": "the student base"}.get(name, name)
    body = [f"# The tiny world's {name}, trained from scratch", "",
            f"{role.capitalize()} of distillability's tiny world (arithmetic chains of single-digit terms): "
            f"{info.get('params', '?'):,} parameters, its own tokenizer ({info.get('vocab', '?')} tokens), "
            f"{info.get('steps', '?')} SFT steps on {info.get('examples', '?')} examples; seed {world.get('seed')}."]
    return _front(["tiny-world", name], None, world.get("task")) + "\n".join(body) + "\n"


def add_evaluation(model_dir: str | Path, result: dict) -> bool:
    """Put an evaluation's numbers into the model's card (a distillability card in a writable folder outside the
    package); replaces an earlier evaluation section. Returns whether it wrote."""
    path = Path(model_dir) / "README.md"
    try:
        if not path.exists() or PACKAGE in path.resolve().parents:
            return False
        text = path.read_text(encoding="utf-8")
    except OSError:
        return False
    front = text.split("---", 2)[1] if text.startswith("---") else ""
    if "distillability" not in front:
        return False
    wtp = result.get("wrong_trace_preference", {}).get("model", {})
    rows = [EVAL_START, "## Evaluation", "", f"On {result.get('num_prompts', '?')} held-out prompts:", "",
            "| metric | value |", "|---|---|", f"| greedy accuracy | {_fmt(result.get('greedy_accuracy'))} |"]
    rows += [f"| pass@{k} | {_fmt(v)} |" for k, v in result.get("pass_at_k", {}).items()]
    if "D_to_proxy_per_char" in result:
        rows.append(f"| D(model ‖ proxy) per character | {_fmt(result['D_to_proxy_per_char'], '.4f')} |")
    if wtp:
        rows.append(f"| wrong-trace preference | {_fmt(wtp.get('rate'))} ({wtp.get('pairs')} pairs) |")
    block = "\n".join(rows) + "\n" + EVAL_END
    text = re.sub(re.escape(EVAL_START) + ".*?" + re.escape(EVAL_END), "", text, flags=re.S).rstrip() + "\n\n" + block + "\n"
    try:
        write_text(path, text)
    except OSError:
        return False
    return True
