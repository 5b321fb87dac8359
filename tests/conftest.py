import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# bf16=auto resolves to float32 in the tests on every CPU: their numbers and thresholds do not depend on
# whether this machine has AMX (test_precision covers the resolution itself with faked hardware)
os.environ.setdefault("DISTILLABILITY_BF16", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_data(rel: str) -> Path:
    p = SHARED / rel
    if not p.exists():
        pytest.skip(f"{p} absent (../shared/data is optional)")
    return p


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    # keep each session's built worlds out of the user's cache, but reuse them within the session
    monkeypatch.setenv("DISTILLABILITY_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    """A tiny teacher (char tokenizer) and student (BPE tokenizer) SFT-trained briefly on the tiny world,
    saved as HF folders. Returns dict of paths."""
    from distillability.models import TinyModelSpec, build_tiny_model, save_model, train_tokenizer
    from distillability.tasks import world_splits
    from distillability.training import fit_lm

    root = tmp_path_factory.mktemp("models")
    train, _ = world_splits(400, 20, 0)
    corpus = [e.prompt + s for e in train for s in e.solutions.values()]
    out = {}
    for name, kind, vocab, size, steps in (("teacher", "char", 0, (64, 2, 128), 60), ("student", "bpe", 300, (32, 1, 64), 5),
                                           ("student_same", "char", 0, (32, 1, 64), 5)):
        tok = train_tokenizer(corpus, vocab, kind)
        model = build_tiny_model(TinyModelSpec(hidden_size=size[0], num_layers=size[1], num_heads=2,
                                               intermediate_size=size[2]), tok, seed=1)
        fit_lm(model, tok, [e.prompt for e in train], [e.solutions["worked"] for e in train], steps=steps,
               batch_size=16, lr=3e-3, progress=False)
        save_model(model, tok, root / name)
        out[name] = str(root / name)
    return out


# held-out drawn first: the split this test world was sized and its thresholds set on (with the iid split its
# 64 held-out prompts would be ~80% multiple choice, since 600 + 64 prompts exhaust the ~126 two-term chains)
SMALL_WORLD_TASK = ["task.num_train=600", "task.num_eval=64", "task.world_max_terms=2", "task.world_mc_share=0.5",
                    "task.world_heldout=first"]


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    """The tiny world at test size: 2-term sums and multiple choice, a teacher trained to be good at it,
    a proxy and a weak student base with their own tokenizers. Returns the model paths."""
    from distillability.config import TaskConfig, from_dict, parse_overrides
    from distillability.recipes.world import WorldConfig, build_world

    task = from_dict(TaskConfig, parse_overrides(SMALL_WORLD_TASK)["task"])
    world = WorldConfig(style_mix=[0.5, 0.25, 0.25], teacher_size=[128, 2, 384], proxy_size=[32, 1, 64], student_size=[48, 1, 128],
                        teacher_steps=900, proxy_steps=60, student_steps=25, batch_size=32, learning_rate=3e-3,
                        teacher_learning_rate=3e-3)
    old = os.environ.get("DISTILLABILITY_CACHE")
    os.environ["DISTILLABILITY_CACHE"] = str(tmp_path_factory.mktemp("world-cache"))
    try:
        return build_world(world, task, progress=False)
    finally:
        if old is None:
            del os.environ["DISTILLABILITY_CACHE"]
        else:
            os.environ["DISTILLABILITY_CACHE"] = old
