"""The protection report: JSON/markdown/HTML from evaluation results, and the HTML rendered in headless
Chromium (Debian's `chromium`; .ci/run installs it, the test skips where it is absent)."""

import shutil
import subprocess

import pytest

from distillability.protection import relate
from distillability.recipes.attack import summarise
from distillability.report.protection import TEACHERS, gain_table, headline_table, write_report


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
    precision = {"device": "cpu", "cpu": "Test CPU", "amx": False, "avx512_bf16": True, "bf16": False,
                 "reason": "forced (bf16=false)"}
    cards = {t: {"eta": e, "before_accuracy": 0.8, "after_accuracy": accs[t], "before_D_per_char": 0.3,
                 "after_D_per_char": 0.3 + e / 10, "precision": precision}
             for t, e in (("control", 0.0), ("distillable", -1.0), ("undistillable", 1.0))}
    _stage_logs(tmp_path, cards)
    headline = headline_table(evaluations, seed=0, wall_seconds=1.0, cells=_cells(students, 0.4))
    facts = {"versions": {"torch": "2.13.0"}, "threads": 2,
             "stages": {"calibrate_control": {"reused": True, "wall_seconds": 0.0},
                        "distill_sft_control": {"reused": False, "wall_seconds": 12.0}}}
    write_report(tmp_path, headline, evaluations, cards, facts=facts)
    return tmp_path, headline


SPREAD = (-0.02, 0.0, 0.02)  # three students per cell around the cell's mean


def _cells(students: dict, base: float, prompts: int = 500) -> dict:
    """Cells of three students per method and teacher (as pipeline.student_cells builds them from distill cards)."""
    def card(acc):
        return {"student_accuracy": acc, "student_accuracy_before": base, "num_teacher_samples": 600,
                "settings": {"max_steps": 120, "num_prompts": 600, "eval_prompts": prompts}}

    cells = {m: {t: summarise([card(a + d) for d in SPREAD]) for t, a in students.items()} for m in ("sft", "kd", "gkd")}
    relate(cells, "control")
    return cells


def _stage_logs(root, cards):
    """What a pipeline run leaves for the report's curves and diagnose section: the stages' log.jsonl files and the
    diagnose plots."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for t, c in cards.items():
        (root / f"calibrate_{t}").mkdir()
        (root / f"calibrate_{t}" / "log.jsonl").write_text("".join(json.dumps(
            {"step": i, "task_reward": 0.5 + i / 20, "r_cal": c["eta"] * i / 10, "kl_ref": i / 100}) + "\n" for i in range(1, 11)))
        for m in ("sft", "kd", "gkd"):
            (root / f"distill_{m}_{t}").mkdir()
            (root / f"distill_{m}_{t}" / "log.jsonl").write_text("".join(json.dumps(
                {"step": i, "loss": 2.0 / i}) + "\n" for i in range(1, 11)))
    (root / "diagnose").mkdir()
    (root / "diagnose" / "diagnose.json").write_text("{}")
    for name in ("kl_estimates", "tail_noise", "sparsity"):
        fig, ax = plt.subplots(figsize=(4, 3))
        ax.plot([0, 1, 2], [1, 0, 1])
        fig.savefig(root / "diagnose" / f"{name}.png")
        plt.close(fig)


def _images(page: str) -> list:
    """The embedded PNGs of an HTML page, decoded."""
    import base64
    import io
    import re

    import matplotlib.image

    return [matplotlib.image.imread(io.BytesIO(base64.b64decode(b)), format="png")
            for b in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def test_headline_carries_gains_with_ses_from_the_spread_of_the_students(report_dir):
    _, headline = report_dir
    assert set(headline["teachers"]) == set(TEACHERS)
    g = headline["gains"]["sft"]
    # the undistillable cell: students 0.18, 0.20, 0.22 over a base of 0.4 read on 500 prompts
    spread_se = 0.02 / 3 ** 0.5
    binom_se = (0.2 * 0.8 / 1500) ** 0.5
    base_se = (0.4 * 0.6 / 500) ** 0.5
    u, c = g["undistillable"], g["control"]
    assert u["n_students"] == 3 and u["accuracy_se"] == pytest.approx(max(spread_se, binom_se))
    assert u["gain"] == pytest.approx(-0.2) and u["gain_se"] == pytest.approx((u["accuracy_se"] ** 2 + base_se ** 2) ** 0.5)
    assert c["gain"] == pytest.approx(0.2) and c["reference_teaches"] is True
    # share (a - b) / (r - b) = -1 with its delta-method SE
    s = -1.0
    want = (u["accuracy_se"] ** 2 + s ** 2 * c["accuracy_se"] ** 2 + (s - 1) ** 2 * base_se ** 2) ** 0.5 / 0.2
    assert u["gain_share"] == pytest.approx(-1.0) and u["gain_share_se"] == pytest.approx(want)
    assert headline["student_base"] == pytest.approx(0.4) and headline["student_base_se"] == pytest.approx(base_se)
    md = (report_dir[0] / "report.md").read_text()
    assert "| student (gkd) | 0.500 | 0.600 | 0.700 | 0.200 |" in md
    assert "before distillation (the base every student starts from): 0.400 ± 0.022" in md
    assert f"| kd | undistillable | 3 | 0.200 ± {u['accuracy_se']:.3f} | -0.200 ± {u['gain_se']:.3f} | -1.00 ± " in md
    assert "| model | math | mc |" in md and "| kd ← undistillable | 0.100 | 0.200 |" in md and "| student base | 0.200 | 0.400 |" in md


def test_the_report_opens_with_the_verdict_and_the_plot(report_dir):
    out, headline = report_dir
    md = (out / "report.md").read_text()
    lines = md.splitlines()
    # control students 0.6 over a base of 0.4: +0.2, taught; undistillable 0.2 (share -1.0), utility 0.82 / 0.90
    assert lines[2] == "## Verdict"
    assert lines[4].startswith("> Distilling the unprotected (control) teacher teaches this student: its students gain "
                               "+0.200 ± 0.")
    assert lines[5].startswith("> Protected: the undistillable teacher keeps 0.91x the control's accuracy (0.820 vs "
                               "0.900); its students keep -1.00 ± ")
    assert lines[6].startswith("> Easier to distill: the distillable teacher keeps 0.94x") and "+0.300 vs the control's +0.200" in lines[6]
    assert headline["verdict"][1] == lines[5][2:]
    first_table = next(i for i, x in enumerate(lines) if x.startswith("|"))
    assert lines.index("![headline](headline.png)") < first_table


def _head(control: float, undist: float, dist: float, base: float = 0.3, teacher_u: float = 0.95, prompts: int = 500,
          spread=SPREAD, extra: dict | None = None) -> dict:
    """A made-up headline (three students per cell) through the same code the pipeline uses. `extra`: more
    teachers by role -> (their students' accuracy, the teacher's)."""
    students = {"control": control, "undistillable": undist, "distillable": dist,
                **{t: a for t, (a, _) in (extra or {}).items()}}
    def card(acc):
        return {"student_accuracy": acc, "student_accuracy_before": base, "num_teacher_samples": 600,
                "settings": {"max_steps": 240, "num_prompts": 1200, "eval_prompts": prompts}}
    cells = {m: {t: summarise([card(a + d) for d in spread]) for t, a in students.items()} for m in ("sft", "gkd")}
    relate(cells, "control")
    ev = {"teachers": {"control": {"greedy_accuracy": 1.0}, "undistillable": {"greedy_accuracy": teacher_u},
                       "distillable": {"greedy_accuracy": 0.99},
                       **{t: {"greedy_accuracy": u} for t, (_, u) in (extra or {}).items()}},
          "students": {m: {t: {"greedy_accuracy": a} for t, a in students.items()} for m in ("sft", "gkd")}}
    attacker = {"student": {"params": 460928, "architecture": "qwen2", "tokenizer": "BPE", "vocab_size": 262,
                            "origin": "from_scratch", "how": "trained from scratch by the tiny world (200 SFT steps on "
                            "worked solutions)"}, "students_per_cell": len(spread),
                "budget": {"steps": 240, "prompts": 1200, "samples": 1200, "eval_prompts": prompts}}
    return headline_table(ev, seed=0, wall_seconds=1.0, cells=cells, attacker=attacker)


def test_the_verdict_follows_from_gain_over_base_in_every_case():
    # whom it measured, first: the student and the budget, never "an attacker" in general
    v = _head(0.6, 0.35, 0.7)["verdict"]
    assert v[0] == ("Measured against a 0.46M-parameter qwen2 (BPE tokenizer, 262 tokens), trained from scratch by the "
                    "tiny world (200 SFT steps on worked solutions), distilled on 1,200 teacher samples of 1,200 prompts "
                    "in 240 steps (the 1x budget), 3 students per cell, read on 500 held-out prompts. It speaks for "
                    "this student at this budget only.")
    # the control teaches (+0.3), the undistillable teacher's students keep 0.05/0.3 = 0.17 of it: protected
    assert v[1].startswith("Distilling the unprotected (control) teacher teaches this student: its students gain +0.300")
    assert v[2].startswith("Protected: the undistillable teacher keeps 0.95x") and "keep 0.17 ± " in v[2]
    assert v[3].startswith("Easier to distill: the distillable teacher") and "+0.400 vs the control's +0.300 (SFT)" in v[3]
    assert v[-1].startswith("(Gain: the students' accuracy minus the student base's")
    # keeps more than half of the gain: not protected; utility below 0.9x: not protected whatever the students do
    assert _head(0.6, 0.5, 0.7)["verdict"][2].startswith("Not protected") and "0.67" in _head(0.6, 0.5, 0.7)["verdict"][2]
    low = _head(0.6, 0.35, 0.7, teacher_u=0.85)["verdict"][2]
    assert low.startswith("Not protected: the undistillable teacher keeps 0.85x") and "below the 0.9x it must keep" in low
    # one method protected, the other not: partly, naming the least protected
    h = _head(0.6, 0.35, 0.7)
    h["gains"]["gkd"]["undistillable"]["gain_share"] = 0.8
    from distillability.report.verdict import verdict

    assert verdict(h)[2].startswith("Partly protected") and "least protected: GKD at 0.80" in verdict(h)[2]
    # the control's students end below the base: nothing to withhold, and eta > 0 is named harm, not protection
    v = _head(0.2, 0.1, 0.25)["verdict"]
    assert v[1] == ("Distillation from the unprotected (control) teacher does not teach this student at this budget: "
                    "protection cannot be measured here; its SFT students end 0.100 ± 0.024 below the base, its GKD "
                    "students end 0.100 ± 0.024 below the base (the base's 0.300 ± 0.020).")
    assert v[2].startswith("No protection to measure: the undistillable teacher keeps 0.95x") and v[2].endswith(
        "which is harm, not protection.")
    assert not any(line.startswith(("Protected", "Partly protected")) for line in v)
    # a gain of +0.04 (< 0.05) is no gain; +0.06 on 50 prompts is inside 2 SE: no gain either
    assert "does not teach" in _head(0.34, 0.3, 0.35)["verdict"][1]
    assert "does not teach" in _head(0.36, 0.3, 0.35, prompts=50)["verdict"][1]
    assert "does not teach" not in _head(0.36, 0.3, 0.35, prompts=5000)["verdict"][1]
    # easier to distill needs the difference beyond 2 SE: +0.01 is not
    assert _head(0.6, 0.35, 0.61)["verdict"][3].startswith("Not measurably easier to distill")
    # one student per cell: said, and the SE is the binomial one
    v = _head(0.6, 0.35, 0.7, spread=(0.0,))["verdict"]
    assert "one student per cell (a direction, not a result" in v[0]
    # a second proxy's undistillable teacher gets its own sentence by the same rule, after the first
    h = _head(0.6, 0.35, 0.7, extra={"undistillable@attacker": (0.54, 0.97)})
    assert list(h["teachers"]) == ["control", "distillable", "undistillable", "undistillable@attacker"]
    assert h["verdict"][2].startswith("Protected: the undistillable teacher keeps 0.95x")
    assert h["verdict"][3].startswith("Not protected: the undistillable@attacker teacher (its own proxy) keeps 0.97x")
    assert "keep 0.80 ± " in h["verdict"][3] and h["verdict"][4].startswith("Easier to distill")
    assert "| sft | undistillable@attacker | 3 |" in gain_table(h)


def test_verdict_names_the_shifted_split_only_when_measured():
    from distillability.report.verdict import verdict

    head = {"teachers": {"control": 1.0, "undistillable": 0.8},
            "students": {"sft": {"control": 0.5, "undistillable": 0.1}}, "student_base": 0.3}
    assert not any("shifted split" in line for line in verdict(head))  # not measured: not said
    head["teachers_shifted"] = {"control": 0.5, "undistillable": 0.45}
    assert ("On the shifted split (longer chains than any trained on): the undistillable teacher 0.90x (0.450 vs "
            "0.500) the control's accuracy.") in verdict(head)


def test_every_plot_is_embedded_and_no_markdown_leaks_into_the_html(report_dir):
    import re

    out, _ = report_dir
    md = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    wanted = re.findall(r"^!\[[^\]]*\]\(([^)]+)\)$", md, flags=re.M)
    assert {"headline.png", "calibration_curves.png", "student_losses.png", "diagnose/kl_estimates.png",
            "diagnose/tail_noise.png", "diagnose/sparsity.png"} <= set(wanted)
    images = _images(page)
    assert len(images) == len(wanted) and all(img.std() > 0.01 for img in images)  # every plot decodes, none blank
    text = re.sub(r'src="data:[^"]+"', "", page)
    for leak in ("](", "**", "|---", "`"):
        assert leak not in text, leak
    assert "<code>diagnose/summary.md</code>" in page and '<div class="verdict">' in page
    # every table is explained, and the run facts say where and how it ran
    for needle in ("control: the same starting teacher RL-tuned on the task alone", "D to proxy /char: mean",
                   "Wrong-trace preference: over prompts", "overconfident (a wrong answer",
                   "- device: cpu (Test CPU; AMX no, AVX512-BF16 yes); precision: float32 (forced (bf16=false))",
                   "- versions: torch 2.13.0", "torch threads 2", "- reused from an earlier run: calibrate_control",
                   "| distill_sft_control | 12 |"):
        assert needle in md, needle


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
    assert '<div class="verdict"><p>Distilling the unprotected (control) teacher teaches this student' in dom
    images = _images(dom)
    assert len(images) == 6 and all(img.std() > 0.01 for img in images)
    # a full-page screenshot (a window taller than the page): the content reaches at least as far down as the
    # embedded images stacked at their rendered size (max-width 1000 px), so nothing collapsed
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1300,12000", "--hide-scrollbars", page.as_uri()],
                   capture_output=True, timeout=120)
    import matplotlib.image

    pixels = matplotlib.image.imread(str(shot))[..., :3]
    assert pixels.std() > 0.05  # not a blank page
    rows = (pixels < 0.95).any(axis=(1, 2)).nonzero()[0]
    images_height = sum(img.shape[0] * min(1.0, 1000 / img.shape[1]) for img in images)
    assert rows[-1] > images_height + 200, (rows[-1], images_height)
    assert rows[-1] < pixels.shape[0] - 50  # the window was taller than the page: the whole page is in the shot


def test_gain_seeds_pools_the_seeds_and_says_by_how_much_a_target_is_missed():
    """bench/gain_seeds.py: per seed the claim's targets with their values, pooled gains over seeds (mean, spread
    / sqrt(seeds)) and the pooled gain share (pooled gain / the control's pooled gain)."""
    gs = _bench_module("gain_seeds")
    heads = {s: _head(c, u, d, base=0.2) for s, (c, u, d) in {3: (0.5, 0.25, 0.6), 4: (0.4, 0.3, 0.42)}.items()}
    heads[4]["teachers"]["undistillable"] = 0.9  # 0.9x the control: misses 0.95x by 0.05
    checks = {s: gs.checks(h) for s, h in heads.items()}
    assert checks[3]["control gain >= +0.15"]["sft"] == pytest.approx(0.3)
    assert checks[3]["undistillable gain share <= 0.3"]["gkd"] == pytest.approx(0.05 / 0.3)
    assert checks[4]["distillable gain >= 1.1x the control's"]["sft"] == pytest.approx(0.22 / 0.2)
    assert gs.met("undistillable gain share <= 0.3", 0.5) is False and gs.met("control gain >= +0.15", 0.2) is True
    import json as _json

    root = _bench_tmp(heads)
    res = gs.collect([3, 4], root)
    p = res["pooled"]["sft"]
    assert p["control"]["gain"] == pytest.approx(0.25) and p["control"]["gain_se_over_seeds"] == pytest.approx(0.05)
    assert p["undistillable"]["gain_share_pooled"] == pytest.approx(0.075 / 0.25)
    md = gs.markdown(_json.loads(_json.dumps(res)))
    assert "seed 4 all: 0.90 (missed by 0.05)" in md and "seed 3 sft: 0.30 (met)" in md


def _bench_tmp(heads: dict):
    import json as _json
    import tempfile
    from pathlib import Path

    root = Path(tempfile.mkdtemp())
    for s, h in heads.items():
        (root / f"seed{s}").mkdir()
        (root / f"seed{s}" / "headline.json").write_text(_json.dumps(h))
    return root


def test_knob_v2_marks_issue_28s_targets():
    """bench/knob_v2.py: 'teaches' (control SFT >= base + 0.10, distillable >= 1.1x), utility on the held-out and
    the shifted split, gain share <= 0.3 (met outright when the student gained nothing), ratio <= 0.5 at 1x and for
    the 1x-budget attackers, <= 0.6 at 4x / 10x; None where a cell did not run."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("knob_v2", Path(__file__).resolve().parents[1] / "bench" / "knob_v2.py")
    kv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kv)

    def c(acc, ratio=None, gain=None, share=None, base=0.4):
        return {"status": "ok", "accuracy": acc, "ratio": ratio, "gain": gain, "gain_share": share, "base": base}

    attack = {"cells": {
        "sft@1x": {"control": c(0.55, 1.0, 0.15), "distillable": c(0.62, 1.13, 0.22), "undistillable": c(0.2, 0.36, -0.2)},
        "sft@4x": {"control": c(0.7, 1.0, 0.3), "undistillable": c(0.46, 0.66, 0.06, 0.2)},
        "sft@10x": {"control": c(0.8, 1.0, 0.4), "undistillable": c(0.5, 0.62, 0.1, 0.25)},
        "sft-best-of-16": {"control": c(0.6, 1.0, 0.2), "undistillable": c(0.33, 0.55, 0.13, 0.65)},
        "kd@1x": {"control": c(0.5, 1.0, 0.1), "undistillable": {"status": "failed"}}}}
    head = {"teachers": {"control": 0.9, "distillable": 0.9, "undistillable": 0.85},
            "teachers_shifted": {"control": 0.5, "distillable": 0.46, "undistillable": 0.44}}
    got = kv.checks(attack, head)
    assert got["teaches: control SFT@1x >= base + 0.10"] is True
    assert got["teaches: distillable SFT@1x >= 1.1x control"] is True
    assert got["utility: undistillable >= 0.95x (held-out)"] is False  # 0.944
    assert got["utility: distillable >= 0.9x (shifted)"] is True and got["utility: undistillable >= 0.9x (shifted)"] is False
    assert got["sft@1x: gain share <= 0.3"] is True and got["sft@1x: ratio <= 0.5"] is True  # below its base
    assert got["sft@4x: gain share <= 0.3"] is True and got["sft@4x: ratio <= 0.6"] is False
    assert got["sft@10x: ratio <= 0.6"] is False
    assert got["sft-best-of-16: gain share <= 0.3"] is False and got["sft-best-of-16: ratio <= 0.5"] is False
    assert got["kd@1x: ratio <= 0.5"] is None and got["gkd@10x: gain share <= 0.3"] is None


def _bench_module(name: str):
    """A bench/ script imported as a module (bench/ is not a package)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _main_writes_png(module, out) -> None:
    """Run a plot script's main() with --out OUT: a PNG lands under its name and no temporary file is left."""
    import sys

    argv, sys.argv = sys.argv, [module.__name__ + ".py", "--out", str(out)]
    try:
        module.main()
    finally:
        sys.argv = argv
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(out.parent.glob("*.tmp.png"))


def test_plot_protection_reads_the_committed_results(tmp_path):
    """bench/plot_protection.py: the shipped world's curve is the mean (and min-max) over seeds of the undistillable
    teacher's SFT ratio per budget in results/attack_seeds.json; each knob-v2 variant's points are its cells' ratios,
    None where a budget did not run; the figure is written under its name only when complete."""
    import json
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench"
    pp = _bench_module("plot_protection")
    seeds = json.loads((bench / "results/attack_seeds.json").read_text())["seeds"]
    per_seed = [[s["cells"][f"sft@{b}x"]["undistillable"]["ratio"] for b in (1, 4, 10)] for s in seeds.values()]
    curves = pp.curves()
    shipped = next(v for k, v in curves.items() if k.startswith("shipped world"))
    assert shipped["mean"] == pytest.approx([sum(c) / len(c) for c in zip(*per_seed)])
    assert shipped["low"] == pytest.approx([min(c) for c in zip(*per_seed)])
    assert shipped["mean"][2] > 1.0  # the 10x inversion the README states (1.12x)
    seen = next(v for k, v in curves.items() if "not blind" in k)
    assert seen["mean"][0] == pytest.approx(0.152 / 0.206) and seen["mean"][2] is None
    _main_writes_png(pp, tmp_path / "p.png")


def test_plot_real_frontier_reads_the_committed_results(tmp_path):
    """bench/plot_real_frontier.py: one point per committed real-teacher run, the teacher's ratio to the control with
    its delta-method SE, the students' mean ratio over the 1x cells with their range; eta = 1 at 80 steps (0.897x,
    cells 0.38-0.42x) and eta = 0.75 (0.92x, KD 0.65x) each miss one target, as the README says."""
    import math

    pf = _bench_module("plot_real_frontier")
    pts = {(p["steps"], p["eta"], p["precision"]): p for p in pf.points()}
    eta1 = pts[(80, 1.0, "bf16")]
    assert eta1["teacher"] == pytest.approx(0.8667 / 0.9667, abs=1e-3)
    assert eta1["teacher_se"] == pytest.approx(eta1["teacher"] * math.hypot(0.0196 / 0.8667, 0.0104 / 0.9667),
                                               abs=1e-3)
    assert (eta1["low"], eta1["high"]) == pytest.approx((0.3766, 0.4228), abs=1e-3)
    assert eta1["meets"] is False and pts[(80, 0.75, "bf16")]["meets"] is False
    assert pts[(80, 0.75, "bf16")]["high"] == pytest.approx(0.647, abs=2e-3)
    fp32 = pts[(80, 0.85, "float32")]  # the shipped eta: the teacher holds, GKD's cell (0.63x) does not
    assert fp32["teacher"] == pytest.approx(0.870 / 0.950, abs=1e-3) and fp32["high"] == pytest.approx(0.630, abs=2e-3)
    assert fp32["meets"] is False
    assert [p["file"] for p in pf.points() if p["meets"]] == ["eta1_60steps_a"]  # one 60-step run
    _main_writes_png(pf, tmp_path / "f.png")


def test_the_readme_python_api_example_runs(tmp_path, monkeypatch):
    """The README's first Python example, as written, on the shipped world (a user's first API call)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.findall(r"```python\n(.*?)```", readme, flags=re.S)[0]
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - our own documentation's code
    card = scope["card"]
    assert 0 <= card["student_accuracy_before"] <= 1 and 0 <= card["student_accuracy"] <= 1
    assert (tmp_path / "runs" / "api_student" / "model" / "model.safetensors").exists()


def test_the_attacker_tables_eta_choice_reads_validation_only():
    """An eta sweep (teachers of one proxy at several etas) is chosen by the rule fixed before the run: the largest
    eta whose teacher keeps >= 0.9x the control on the validation slice; the test accuracy is never read."""
    table = _bench_module("attacker_table")

    def role(eta, val, test, proxy="p"):
        return {"eta": eta, "proxy": proxy, "accuracy": test, "validation": {"accuracy": val}}

    acc = {"control": {"eta": 0.0, "proxy": "w", "accuracy": 0.9, "validation": {"accuracy": 0.80}},
           "undistillable": role(0.85, 0.70, 0.1, proxy="w"),  # alone against its proxy: no sweep
           "undistillable@a": role(0.85, 0.76, 0.2), "undistillable@b": role(1.5, 0.72, 0.9),
           "undistillable@c": role(3.0, 0.60, 0.9)}
    (sweep,) = table.eta_choice(acc)
    assert [r["teacher"] for r in sweep["rows"]] == ["undistillable@a", "undistillable@b", "undistillable@c"]
    assert [round(r["ratio"], 3) for r in sweep["rows"]] == [0.95, 0.9, 0.75]
    assert sweep["chosen"] == "undistillable@b" and sweep["complete"]
    acc["undistillable@b"]["validation"]["accuracy"] = 0.71  # 0.8875x: below the bar
    assert table.eta_choice(acc)[0]["chosen"] == "undistillable@a"
    acc["undistillable@adaptive"] = {**role(1.5, 0.79, 0.9), "design": "adaptive proxy"}  # same proxy, other design
    (sweep,) = table.eta_choice(acc)  # alone in its design: no sweep, and never the sweep's choice
    assert [r["teacher"] for r in sweep["rows"]] == ["undistillable@a", "undistillable@b", "undistillable@c"]
    assert sweep["chosen"] == "undistillable@a"
    del acc["undistillable@c"]["validation"]
    assert not table.eta_choice(acc)[0]["complete"]


def test_the_attacker_tables_compact_rows_carry_gain_and_share():
    table = _bench_module("attacker_table")
    ok = {"status": "ok", "base": 0.1, "complete": True, "n_students": 3}
    res = {"teachers": ["control", "undistillable", "distillable"], "battery": ["a@1x", "a@4x"],
           "cells": {"a@1x": {"control": {**ok, "gain": 0.6, "gain_se": 0.07},
                              "undistillable": {**ok, "gain": 0.3, "gain_se": 0.05, "gain_share": 0.5,
                                                "gain_share_se": 0.1, "complete": False, "n_students": 1, "wanted": 3}}}}
    lines = table.compact_table(res).splitlines()
    assert lines[0] == "| attacker | base | control | undistillable |"  # a teacher with no cell gets no column
    assert lines[2] == "| a@1x | 0.100 | +0.600 ± 0.070 (3) | +0.300 ± 0.050, **0.50 ± 0.10** (1 of 3) |"
    assert len(lines) == 3  # an attacker with no cell gets no row
