"""Build the tiny world's three models from scratch, with three different tokenizers:
a teacher (character tokenizer), a weaker calibration proxy (byte-level BPE) and a weak student base
(another byte-level BPE with a different vocabulary size and training text). Cached by config + seed."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from pathlib import Path

from ..config import TaskConfig, opt
from ..io import write_json
from ..models import (
    TinyModelSpec,
    build_tiny_model,
    cache_dir,
    num_params,
    pick_device,
    save_model,
    train_tokenizer,
)
from ..training import fit_lm, seed_everything


@dataclasses.dataclass
class WorldConfig:
    style_mix: list[float] = opt([0.5, 0.5, 0.0], "Teacher SFT mix of solution styles worked, running, direct "
                                 "(running: accurate for the teacher, not learnable by the student from its samples).")
    teacher_size: list[int] = opt([192, 3, 512], "Teacher hidden size, layers, MLP size (4 heads).")
    proxy_size: list[int] = opt([96, 2, 256], "Proxy hidden size, layers, MLP size.")
    student_size: list[int] = opt([128, 2, 384], "Student hidden size, layers, MLP size.")
    teacher_steps: int = opt(2000, "Teacher SFT steps.", min=1)
    proxy_steps: int = opt(400, "Proxy SFT steps (worked style only).", min=1)
    student_steps: int = opt(400, "Student base SFT steps (worked style only): a competent base.", min=1)
    batch_size: int = opt(48, "SFT batch size.", min=1)
    learning_rate: float = opt(3e-3, "Proxy and student base SFT learning rate.", min=0, min_exclusive=True)
    teacher_learning_rate: float = opt(3e-3, "Teacher SFT learning rate. The demo's world sets 1e-3 (with 3000 steps "
                                       "and bf16: a 0.94-0.99 teacher); 3e-3 with 2000 steps in fp32 is the 3-term "
                                       "world of sessions 5-10, whose teacher is weak (0.51-0.71; bench/README.md, knob).",
                                       min=0, min_exclusive=True)
    bf16: bool = opt(False, "Train the world's models under bf16 autocast: 2.2x faster on a CPU with AMX (on a GPU "
                     "the build always uses it); the demo's world sets it, off rebuilds the worlds of sessions 5-10.")
    proxy_vocab: int = opt(300, "Proxy BPE vocabulary size.", min=260)
    student_vocab: int = opt(420, "Student BPE vocabulary size.", min=260)


def world_key(cfg: WorldConfig, task: TaskConfig) -> str:
    d = dataclasses.asdict(cfg)
    # teacher_learning_rate and bf16 (added later) enter the key only where they change the build, so the worlds
    # built before them (and the numbers measured on them) keep their key
    if d["teacher_learning_rate"] == d["learning_rate"]:
        d.pop("teacher_learning_rate")
    if not d["bf16"]:
        d.pop("bf16")
    t = dataclasses.asdict(task)
    if t["world_heldout"] == "first":  # the split every world had before the option: those keep their key
        t.pop("world_heldout")
    blob = json.dumps({**d, "task": t, "v": 2}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_world(cfg: WorldConfig, task: TaskConfig, progress: bool = True, cache: bool = True) -> dict[str, str]:
    """Paths of the teacher, proxy and student base folders (built once per config + task + seed),
    trained on the task's training split only (its held-out prompts are never seen)."""
    seed = task.seed
    root = cache_dir() / "worlds" / world_key(cfg, task)
    paths = {name: str(root / name) for name in ("teacher", "proxy", "student")}
    if cache and all((Path(p) / "config.json").exists() for p in paths.values()):
        return paths
    seed_everything(seed)
    device = pick_device()  # a GPU when there is one (the CPU path is unchanged)
    train = task.load().train
    rng = random.Random(seed)
    styles = ["worked", "running", "direct"]
    corpus = [e.prompt + s for e in train for s in e.solutions.values()]
    # teacher: mixture of styles (its correct modes include ones a weak model cannot imitate)
    t_tok = train_tokenizer(corpus, 0, "char")
    p_tok = train_tokenizer(corpus[::2], cfg.proxy_vocab, "bpe")
    s_tok = train_tokenizer(corpus[1::3], cfg.student_vocab, "bpe")
    plan = {
        "teacher": (t_tok, cfg.teacher_size, cfg.teacher_steps, cfg.style_mix, "llama", cfg.teacher_learning_rate),
        "proxy": (p_tok, cfg.proxy_size, cfg.proxy_steps, [1.0, 0.0, 0.0], "llama", cfg.learning_rate),
        "student": (s_tok, cfg.student_size, cfg.student_steps, [1.0, 0.0, 0.0], "qwen2", cfg.learning_rate),
    }
    info = {}
    for i, (name, (tok, size, steps, mix, arch, lr)) in enumerate(plan.items()):
        h, layers, mlp = size
        model = build_tiny_model(TinyModelSpec(hidden_size=h, num_layers=layers, num_heads=4, intermediate_size=mlp,
                                               architecture=arch), tok, seed=seed + i).to(device)
        chosen = [rng.choices(styles, weights=mix)[0] for _ in train]
        losses = fit_lm(model, tok, [e.prompt for e in train], [e.solutions[s] for e, s in zip(train, chosen)],
                        steps=steps, batch_size=cfg.batch_size, lr=lr, seed=seed + i,
                        desc=f"world: {name} SFT", progress=progress, autocast=cfg.bf16 or device.type == "cuda")
        save_model(model, tok, paths[name])
        info[name] = {"params": num_params(model), "vocab": len(tok), "final_loss": losses[-1], "steps": steps}
    write_json(root / "world.json", {"config": dataclasses.asdict(cfg), "seed": seed, "models": info})
    return paths
