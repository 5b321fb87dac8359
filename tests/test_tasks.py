"""Task loaders on real rows, their verifiers, and data-file errors."""

import collections
import dataclasses

import pytest

from distillability.errors import DataError
from distillability.io import load_records
from distillability.tasks import load_task

from .conftest import shared_data


def test_tiny_world_verifier_and_held_out_split():
    task = load_task("tiny-world", num_train=200, num_eval=50, seed=3)
    assert not {e.prompt for e in task.train} & {e.prompt for e in task.eval}
    assert {"math", "mc"} <= set(task.families)
    for e in task.train[:50]:
        for style, sol in e.solutions.items():
            assert task.score(e, sol) == 1.0, (style, sol)
        assert task.score(e, " #### 999") == 0.0
        assert task.score(e, e.solutions["worked"].split("####")[0]) == 0.0  # strict: no marker, no credit


def test_gsm8k_rows_score_right_and_wrong():
    path = shared_data("gsm8k/test.jsonl")
    task = load_task("gsm8k", str(path), num_train=20, num_eval=10)
    for e in task.eval:
        assert task.score(e, e.solution) == 1.0
        assert task.score(e, "#### 123456789") == 0.0
        assert e.prompt.startswith("Question:") and "<<" not in e.solution


def test_bigbench_rows_score_right_and_wrong():
    path = shared_data("bigbench/social_iqa")
    task = load_task("bigbench", str(path), num_train=20, num_eval=10)
    for e in task.eval:
        assert task.score(e, e.solution) == 1.0
        wrong = "A" if e.reference != "A" else "B"
        assert task.score(e, f"#### {wrong}") == 0.0


def test_reasoning_gym_generator():
    pytest.importorskip("reasoning_gym")
    task = load_task("gym:chain_sum", num_train=10, num_eval=5, seed=1)
    for e in task.eval:
        assert task.score(e, f"#### {e.reference}") == 1.0
        assert task.score(e, "#### 987654") == 0.0


def test_plain_mc_and_open_jsonl(tmp_path):
    mc = tmp_path / "mc.jsonl"
    mc.write_text('{"question": "2+2?", "choices": ["3", "4"], "answer": "B"}\n'
                  '{"question": "sky?", "choices": ["blue", "red"], "answer": 0}\n' * 3)
    task = load_task("mc", str(mc), num_train=0, num_eval=6)
    assert all(task.score(e, f"#### {e.reference}") == 1.0 for e in task.eval)
    op = tmp_path / "open.jsonl"
    op.write_text('{"instruction": "Say hi", "input": "", "output": "hello there friend"}\n' * 4)
    task = load_task("open", str(op), num_train=0, num_eval=4)
    assert task.score(task.eval[0], "hello there friend") == pytest.approx(1.0)
    assert 0 < task.score(task.eval[0], "hello friend") < 1


def test_data_file_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q2", "answer": \n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: malformed JSON"):
        load_records(bad)
    missing = tmp_path / "m.jsonl"
    missing.write_text('{"question": "q"}\n')
    with pytest.raises(DataError, match=r"m.jsonl:1: missing field 'answer'"):
        load_task("gsm8k", str(missing))
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        load_task("gsm8k", str(empty))
    binary = tmp_path / "b.jsonl"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataError, match="not UTF-8"):
        load_task("gsm8k", str(binary))
    with pytest.raises(DataError, match="not found"):
        load_task("gsm8k", str(tmp_path / "nope.jsonl"))
    wrong_type = tmp_path / "w.jsonl"
    wrong_type.write_text('{"question": 5, "answer": "#### 1"}\n')
    with pytest.raises(DataError, match="field 'question' should be str"):
        load_task("gsm8k", str(wrong_type))


def test_gym_worked_solutions_and_fallback_task(tmp_path):
    pytest.importorskip("reasoning_gym")
    from distillability.config import TaskConfig

    task = load_task("gym:gsm_symbolic", num_train=6, num_eval=3, seed=0)
    for e in task.train:
        assert len(e.solution) > 40 and "\n#### " in e.solution  # worked steps, then the marked answer
        assert task.score(e, e.solution) == 1.0
    # a config that names a data file still runs where the file is absent, on its fallback task
    cfg = TaskConfig(name="gsm8k", path=str(tmp_path / "absent.jsonl"), fallback="gym:chain_sum", num_train=4, num_eval=2)
    assert cfg.load().name == "gym:chain_sum"
    with pytest.raises(DataError):
        TaskConfig(name="gsm8k", path=str(tmp_path / "absent.jsonl"), num_train=4, num_eval=2).load()


def test_world_cache_key_tracks_every_setting_and_the_resolved_precision():
    """Every world setting, the task and the precision the world is built in give another key; whether the
    shipped world is consulted does not."""
    from distillability.config import TaskConfig
    from distillability.recipes.world import WorldConfig, world_key

    task = TaskConfig(num_train=3000, num_eval=100, seed=0, world_max_terms=3)
    base = world_key(WorldConfig(), task, bf16=True)
    assert base == world_key(WorldConfig(), task, bf16=True) and len(base) == 16
    assert world_key(WorldConfig(shipped=False), task, bf16=True) == base
    keys = {world_key(WorldConfig(teacher_learning_rate=1e-3), task, True), world_key(WorldConfig(), task, False),
            world_key(WorldConfig(teacher_steps=3000), task, True), world_key(WorldConfig(), TaskConfig(seed=1), True),
            world_key(WorldConfig(), dataclasses.replace(task, world_heldout="first"), True),
            world_key(WorldConfig(bf16="false"), task, True)}
    # bf16 setting vs resolved: the key follows what the world is built in, not how that was asked for
    assert world_key(WorldConfig(bf16="false"), task, True) == base
    assert len(keys) == 6 and base in keys
    # task.world_terms (added later): at its default the key of a world built before it; set, another world
    assert world_key(WorldConfig(), dataclasses.replace(task, world_terms=[2]), True) != base


def test_a_stage_saved_before_a_later_key_is_reused(tmp_path):
    """A stage's saved config leaves out keys added later at their defaults (task.world_terms), so a stage run
    before the key existed is reused; the key set to another value reruns it."""
    import yaml

    from distillability.config import TaskConfig, to_dict
    from distillability.recipes.evaluate import EvaluateConfig
    from distillability.recipes.stages import run_stage, stage_config_text

    cfg = EvaluateConfig(model="m", task=TaskConfig())
    old = to_dict(cfg)
    del old["task"]["world_terms"]  # the config as a version without the key saved it
    del old["runtime"]["report_to"]  # (nor the trackers, which never enter a stage's key)
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "stage_config.yaml").write_text(yaml.safe_dump(old, sort_keys=True)
                                                      + yaml.safe_dump({"inputs": {}}, sort_keys=True))
    (tmp_path / "s" / "eval.json").write_text('{"saved": 1}')
    ran = []
    assert run_stage(tmp_path, "s", cfg, "eval.json", lambda c: ran.append(c) or {"new": 1}) == {"saved": 1}
    assert "world_terms" not in stage_config_text(cfg) and not ran
    changed = dataclasses.replace(cfg, task=TaskConfig(world_terms=[3]))
    assert run_stage(tmp_path, "s", changed, "eval.json", lambda c: ran.append(c) or {"new": 1}) == {"new": 1}
    assert "world_terms" in stage_config_text(changed) and len(ran) == 1
    # the threads and the progress bars do not change what a stage computes: a stage saved with threads=1 (as
    # versions that kept them in the key saved it) is reused at threads=2, without progress bars
    (tmp_path / "t").mkdir()
    saved = to_dict(cfg)
    saved["runtime"]["threads"] = 1
    (tmp_path / "t" / "stage_config.yaml").write_text(yaml.safe_dump(saved, sort_keys=True)
                                                      + yaml.safe_dump({"inputs": {}}, sort_keys=True))
    (tmp_path / "t" / "eval.json").write_text('{"saved": 2}')
    rt = dataclasses.replace(cfg.runtime, threads=2, progress=False)
    assert run_stage(tmp_path, "t", dataclasses.replace(cfg, runtime=rt), "eval.json",
                     lambda c: ran.append(c) or {"new": 2}) == {"saved": 2} and len(ran) == 1
    assert "threads" not in stage_config_text(cfg) and "progress" not in stage_config_text(cfg)


def _terms(examples):
    return collections.Counter(e.prompt.count("+") + e.prompt.count("-") + 1 for e in examples)


def test_world_iid_heldout_follows_the_training_distribution():
    """The default split: the held-out prompts are a random sample of the world's distinct prompts, so each
    chain length has the same share in both splits; the legacy `first` split (held-out drawn first) takes
    most two-term chains (96 of the world's ~126 here) and leaves training 30."""
    from distillability.tasks import WorldSpec, world_splits

    spec = WorldSpec(max_terms=4, mc_share=0.0)
    train, held = world_splits(20000, 500, 2, spec)
    assert len(train) == 20000 and len(held) == 500 and not {e.prompt for e in train} & {e.prompt for e in held}
    tr, he = _terms(train), _terms(held)
    for n in (2, 3, 4):  # binomial: 500 * share +- 4 sd
        share = tr[n] / len(train)
        assert abs(he[n] - 500 * share) <= 4 * (500 * share * (1 - share)) ** 0.5 + 1, (n, tr, he)
    assert world_splits(20000, 500, 2, spec)[1] == held  # deterministic in the seed
    train_f, held_f = world_splits(20000, 500, 2, dataclasses.replace(spec, heldout="first"))
    assert (_terms(held_f)[2], _terms(train_f)[2]) == (96, 30)
    assert not {e.prompt for e in train_f} & {e.prompt for e in held_f}


def test_style_of_reads_back_every_reference_style():
    from distillability.tasks.world import STYLES, WorldSpec, generate_world, style_of

    examples = generate_world(60, seed=3, spec=WorldSpec(mc_share=0.5))
    assert {e.family for e in examples} == {"math", "mc"}
    for e in examples:
        assert [style_of(e.solutions[s]) for s in STYLES] == list(STYLES), e.prompt


def test_world_too_small_for_the_split_is_a_config_error():
    """Two-term chains have ~130 distinct prompts: asking for more is the user's config, named in one line."""
    from distillability.errors import ConfigError
    from distillability.tasks import WorldSpec, world_splits

    for heldout in ("iid", "first"):
        with pytest.raises(ConfigError, match="task.num_train"):
            world_splits(400, 16, 0, WorldSpec(max_terms=2, mc_share=0.0, heldout=heldout))
    assert len(world_splits(100, 16, 0, WorldSpec(max_terms=2, mc_share=0.0))[0]) == 100


def test_world_keys_of_the_later_options_and_the_disjoint_student_prompts():
    from distillability.config import TaskConfig
    from distillability.recipes.world import WorldConfig, student_examples, world_key

    task = TaskConfig(num_train=300, num_eval=40, world_max_terms=3, world_mc_share=0.0)
    base = world_key(WorldConfig(), task, True)
    # at their defaults the later keys leave a world's key as it was (the shipped world keeps its folder)
    assert world_key(WorldConfig(proxy_style_mix=[1.0, 0.0, 0.0], student_prompts="train"), task, True) == base
    assert world_key(WorldConfig(proxy_style_mix=[0.5, 0.5, 0.0]), task, True) != base
    assert world_key(WorldConfig(student_prompts="disjoint"), task, True) != base
    split = task.load()
    assert student_examples(WorldConfig(), task, split.train) is split.train
    other = student_examples(WorldConfig(student_prompts="disjoint"), task, split.train)
    assert len(other) == 300 and len({e.prompt for e in other}) == 300
    assert not {e.prompt for e in other} & {e.prompt for e in split.train + split.eval}
    assert [e.prompt for e in other] == [e.prompt for e in student_examples(WorldConfig(student_prompts="disjoint"),
                                                                            task, split.train)]  # deterministic


def test_world_terms_filter_the_full_worlds_splits():
    """task.world_terms keeps only chains of those lengths, as subsets of the full world's splits (so a
    calibration on short chains never sees a held-out prompt, and the held-out long chains were never trained
    on); chain_terms counts a chain's numbers (not a modulus; 0 for multiple choice)."""
    from distillability.config import TaskConfig
    from distillability.errors import ConfigError
    from distillability.tasks import chain_terms

    full = TaskConfig(num_train=600, num_eval=90, seed=4).load()
    assert collections.Counter(chain_terms(e) for e in full.eval).keys() == {0, 2, 3, 4}
    for terms in ([2, 3], [4]):
        part = TaskConfig(num_train=600, num_eval=90, seed=4, world_terms=terms).load()
        assert {chain_terms(e) for e in part.train} == {chain_terms(e) for e in part.eval} == set(terms)
        assert [e.prompt for e in part.train] == [e.prompt for e in full.train if chain_terms(e) in terms]
        assert [e.prompt for e in part.eval] == [e.prompt for e in full.eval if chain_terms(e) in terms]
        assert all(e.solutions["worked"].count("=") == chain_terms(e) - 1 for e in part.eval)
    modular = TaskConfig(num_train=50, num_eval=20, world_modulus=7, world_terms=[3]).load()
    assert all(" mod 7=?" in e.prompt and e.solutions["worked"].count("=") == 2 for e in modular.eval)
    with pytest.raises(ConfigError, match="task.world_terms"):
        TaskConfig(num_train=10, num_eval=2, world_mc_share=1.0, world_terms=[2]).load()


def _gsm_rows(n: int = 12) -> list[dict]:
    return [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(n)]


def test_hugging_face_datasets_folders_and_parquet_run_the_evaluate_recipe(tiny_pair, tmp_path):
    """task.path takes a `save_to_disk` folder (a Dataset or a DatasetDict) and a parquet file, read through the
    same field checks as JSONL; the evaluate recipe runs on each and scores the same rows alike."""
    import datasets

    from distillability.config import load_config
    from distillability.recipes import evaluate

    rows = _gsm_rows()
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd"))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "gsm.parquet"))
    (tmp_path / "gsm.jsonl").write_text("".join(__import__("json").dumps(r) + "\n" for r in rows))
    results = {}
    for name in ("ds", "dd", "gsm.parquet", "gsm.jsonl"):
        task = load_task("gsm8k", str(tmp_path / name), num_train=6, num_eval=6, seed=0)
        assert [e.reference for e in task.eval] and task.eval[0].prompt.startswith("Question: What is")
        cfg = load_config(evaluate.EvaluateConfig, overrides=[
            f"model={tiny_pair['teacher']}", "task.name=gsm8k", f"task.path={tmp_path / name}", "task.num_train=6",
            "task.num_eval=6", "eval_prompts=6", "num_generations=1", "k=[1]", "max_new_tokens=8",
            f"output_dir={tmp_path / ('eval_' + name)}", "runtime.progress=false"])
        results[name] = evaluate.run(cfg)["greedy_accuracy"]
    assert len(set(results.values())) == 1  # the same rows, split alike, scored alike whatever the format


def test_dataset_and_parquet_errors_name_the_file_row_and_field(tmp_path):
    import datasets

    bad = _gsm_rows(5)
    bad[3] = {"question": "q", "reply": "no answer field"}
    datasets.Dataset.from_list(bad).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(DataError, match=r"bad\.parquet:4: missing field 'answer'"):
        load_task("gsm8k", str(tmp_path / "bad.parquet"), num_train=2, num_eval=2, seed=0)
    datasets.Dataset.from_list(bad).save_to_disk(str(tmp_path / "bad_ds"))
    with pytest.raises(DataError, match=r"bad_ds:4: missing field 'answer'"):
        load_task("gsm8k", str(tmp_path / "bad_ds"), num_train=2, num_eval=2, seed=0)
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"broken\.parquet: not readable as a parquet file"):
        load_records(tmp_path / "broken.parquet")
    datasets.DatasetDict({"a": datasets.Dataset.from_list(_gsm_rows(3)),
                          "b": datasets.Dataset.from_list(_gsm_rows(3))}).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(DataError, match="give one split's folder"):
        load_records(tmp_path / "two")
