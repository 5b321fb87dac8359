"""The protection report: JSON/markdown/HTML from evaluation results, and the HTML rendered in headless
Chromium (Debian's `chromium`; .ci/run installs it, the test skips where it is absent)."""

import shutil
import subprocess

import pytest

from distillability.report.protection import TEACHERS, headline_table, ratios, write_report


def _fake_eval(acc):
    return {"greedy_accuracy": acc, "pass_at_k": {"1": acc, "4": min(1.0, acc + 0.2)},
            "failure_modes": {"degradation": 0.1, "self_correction": 0.0, "overconfident": 0.05, "wrong": 0.25,
                              "correct": 0.6},
            "D_to_proxy_per_char": 0.3, "wrong_trace_preference": {"model": {"rate": 0.4}, "proxy": {"rate": 0.5}},
            "by_family": {"math": {"num_prompts": 3, "greedy_accuracy": acc / 2}, "mc": {"num_prompts": 1, "greedy_accuracy": acc}}}


@pytest.fixture()
def report_dir(tmp_path):
    accs = {"original": 0.8, "control": 0.9, "distillable": 0.85, "undistillable": 0.82}
    students = {"original": 0.5, "control": 0.6, "distillable": 0.7, "undistillable": 0.2}
    evaluations = {"teachers": {t: _fake_eval(a) for t, a in accs.items()},
                   "students": {m: {t: _fake_eval(a) for t, a in students.items()} for m in ("sft", "kd", "gkd")},
                   "student_base": _fake_eval(0.4)}
    cards = {t: {"eta": e, "before_accuracy": 0.8, "after_accuracy": accs[t], "before_D_per_char": 0.3,
                 "after_D_per_char": 0.3 + e / 10} for t, e in (("control", 0.0), ("distillable", -1.0), ("undistillable", 1.0))}
    headline = headline_table(evaluations, seed=0, wall_seconds=1.0)
    write_report(tmp_path, headline, evaluations, cards)
    return tmp_path, headline


def test_headline_and_ratios(report_dir):
    _, headline = report_dir
    assert set(headline["teachers"]) == set(TEACHERS)
    r = ratios(headline, "control")
    assert r["sft"]["undistillable"] == pytest.approx(0.2 / 0.6) and r["kd"]["control"] == pytest.approx(1.0)
    md = (report_dir[0] / "report.md").read_text()
    assert "| student (gkd) | 0.500 | 0.600 | 0.700 | 0.200 |" in md
    assert headline["student_base"] == 0.4 and "before distillation (the base every student starts from): 0.400" in md
    # undistillable 0.2: / control 0.6, / original 0.5, / base 0.4
    assert "| kd | undistillable | 0.33 | 0.40 | 0.50 |" in md
    assert "| model | math | mc |" in md and "| kd ← undistillable | 0.100 | 0.200 |" in md and "| student base | 0.200 | 0.400 |" in md


def test_html_renders_in_headless_chromium(report_dir, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not browser:
        pytest.skip("no chromium on this machine (Debian package 'chromium'; .ci/run installs it)")
    page = (report_dir[0] / "report.html").resolve()
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert dom.count("<table") >= 4
    assert 'src="data:image/png;base64,' in dom
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,1600", page.as_uri()], capture_output=True,
                   timeout=120)
    assert shot.exists() and shot.stat().st_size > 10_000
    import matplotlib.image

    pixels = matplotlib.image.imread(str(shot))
    assert pixels.std() > 0.05  # not a blank page


def test_knob_seeds_table_pools_and_counts_targets():
    """bench/knob_seeds.py: per-seed ratios vs the control, pooled = ratio of the accuracies summed over seeds,
    and 'held in' counts the seeds that meet issue #11's thresholds."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "knob_seeds", Path(__file__).resolve().parents[1] / "bench" / "knob_seeds.py")
    ks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ks)
    heads = [{"teachers": {"original": 0.9, "control": 0.9, "distillable": 0.9, "undistillable": 0.8},
              "students": {"sft": {"original": 0.3, "control": 0.4, "distillable": 0.6, "undistillable": 0.2}},
              "student_base": 0.45},
             {"teachers": {"original": 0.9, "control": 1.0, "distillable": 0.95, "undistillable": 0.95},
              "students": {"sft": {"original": 0.3, "control": 0.1, "distillable": 0.09, "undistillable": 0.07}},
              "student_base": 0.5}]
    md, summary = ks.table([0, 1], heads)
    u = summary["sft_undistillable_vs_control"]
    assert u["values"] == pytest.approx([0.5, 0.7]) and u["held_in_seeds"] == 1
    assert u["pooled"] == pytest.approx(0.27 / 0.5) and u["mean"] == pytest.approx(0.6)
    d = summary["sft_distillable_vs_control"]
    assert d["values"] == pytest.approx([1.5, 0.9]) and d["held_in_seeds"] == 1 and d["target"] == ">= 1.0"
    t = summary["teacher_undistillable_vs_control"]
    assert t["values"] == pytest.approx([0.8 / 0.9, 0.95]) and t["held_in_seeds"] == 1
    assert "| student base (before distillation) | 0.45 | 0.50 |" in md
