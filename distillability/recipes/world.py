"""Build the tiny world's three models from scratch, with three different tokenizers:
a teacher (character tokenizer), a weaker calibration proxy (byte-level BPE) and a weak student base
(another byte-level BPE with a different vocabulary size and training text). Cached by config + seed."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from pathlib import Path

from ..config import TaskConfig, opt, without_later_keys
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
    teacher_learning_rate: float = opt(3e-3, "Teacher SFT learning rate (a large teacher is weak at 3e-3: the "
                                       "embedded default sets 1e-3).", min=0, min_exclusive=True)
    bf16: str = opt("auto", "Train the world's models under bf16 autocast: auto = where the device computes bf16 "
                    "natively (a GPU, a CPU with AMX or AVX512-BF16), true or false to force it. A shipped world "
                    "built with the same settings is used whatever this resolves to (see `shipped`).",
                    choices=("auto", "true", "false"))
    shipped: bool = opt(True, "Use the world shipped inside the package when one was built with these settings "
                        "(the embedded default, seed 0: the same models on every machine, no build); false = "
                        "build here (or reuse this machine's cache).")
    proxy_style_mix: list[float] = opt([1.0, 0.0, 0.0], "Proxy SFT mix of styles worked, running, direct (e.g. "
                                       "the teacher's own mix, so the proxy is not blind to its hard mode by "
                                       "construction).")
    student_prompts: str = opt("train", "What the student base (and the attack battery's unseen and large students) "
                               "learn from: train (the task's training prompts' worked solutions, which distillation "
                               "also samples from) or disjoint (prompts of another draw in neither the training nor "
                               "the held-out split: the base has seen no distillation prompt's reference answer; on the "
                               "default task the short chains are all taken, so these are the longest chains).",
                               choices=("train", "disjoint"))
    proxy_vocab: int = opt(300, "Proxy BPE vocabulary size.", min=260)
    student_vocab: int = opt(420, "Student BPE vocabulary size.", min=260)


SHIPPED = Path(__file__).resolve().parent.parent / "worlds"


def world_key(cfg: WorldConfig, task: TaskConfig, bf16: bool) -> str:
    """The cache key of a world: its settings, the task and the precision it is built in (resolved)."""
    d = dataclasses.asdict(cfg)
    d.pop("shipped")
    for key, default in (("proxy_style_mix", [1.0, 0.0, 0.0]), ("student_prompts", "train")):
        if d[key] == default:  # keys added later: at their default, the key of a world built before them
            d.pop(key)
    d["bf16"] = bf16
    blob = json.dumps({**d, "task": without_later_keys(dataclasses.asdict(task)), "v": 3}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


MODELS = ("teacher", "proxy", "student")


def _complete(root: Path) -> bool:
    return all((root / name / "config.json").exists() for name in MODELS) and (root / "world.json").exists()


def shipped_world(cfg: WorldConfig, task: TaskConfig) -> Path | None:
    """The folder of a world shipped with the package that was built with these settings, or None. With
    bf16=auto either precision's shipped world is taken (it is the same world on every machine)."""
    if not cfg.shipped:
        return None
    options = (True, False) if cfg.bf16 == "auto" else (cfg.bf16 == "true",)
    for bf16 in options:
        root = SHIPPED / world_key(cfg, task, bf16)
        if _complete(root):
            return root
    return None


def student_examples(cfg: WorldConfig, task: TaskConfig, train: list) -> list:
    """The examples the student base learns from: the training split, or (student_prompts=disjoint) as many
    distinct prompts of another draw that are in neither the training nor the held-out split (at most 5,000)."""
    if cfg.student_prompts == "train":
        return train
    from ..tasks import generate_world

    split = task.load()
    taken = {e.prompt for e in split.train + split.eval}
    return generate_world(min(len(train), 5000), seed=20_000 + task.seed, spec=task.world_spec(), exclude=taken)


def build_world(cfg: WorldConfig, task: TaskConfig, progress: bool = True, cache: bool = True) -> dict[str, str]:
    """Paths of the teacher, proxy and student base folders: the shipped world where one matches, else built
    once per config + task + seed + precision and cached, trained on the task's training split only (its
    held-out prompts are never seen)."""
    from ..precision import use_bf16

    if cache and (root := shipped_world(cfg, task)) is not None:
        print(f"world: the shipped world {root.name} (built with these settings; world.shipped=false builds one)",
              flush=True)
        return {name: str(root / name) for name in MODELS}
    seed = task.seed
    device = pick_device()  # a GPU when there is one
    bf16 = use_bf16(cfg.bf16, device)
    root = cache_dir() / "worlds" / world_key(cfg, task, bf16)
    paths = {name: str(root / name) for name in MODELS}
    if cache and _complete(root):
        return paths
    seed_everything(seed)
    train = task.load().train
    rng = random.Random(seed)
    styles = ["worked", "running", "direct"]
    corpus = [e.prompt + s for e in train for s in e.solutions.values()]
    # teacher: mixture of styles (its correct modes include ones a weak model cannot imitate)
    t_tok = train_tokenizer(corpus, 0, "char")
    p_tok = train_tokenizer(corpus[::2], cfg.proxy_vocab, "bpe")
    s_tok = train_tokenizer(corpus[1::3], cfg.student_vocab, "bpe")
    plan = {
        "teacher": (t_tok, cfg.teacher_size, cfg.teacher_steps, cfg.style_mix, "llama", cfg.teacher_learning_rate, train),
        "proxy": (p_tok, cfg.proxy_size, cfg.proxy_steps, cfg.proxy_style_mix, "llama", cfg.learning_rate, train),
        "student": (s_tok, cfg.student_size, cfg.student_steps, [1.0, 0.0, 0.0], "qwen2", cfg.learning_rate,
                    student_examples(cfg, task, train)),
    }
    info = {}
    for i, (name, (tok, size, steps, mix, arch, lr, examples)) in enumerate(plan.items()):
        h, layers, mlp = size
        model = build_tiny_model(TinyModelSpec(hidden_size=h, num_layers=layers, num_heads=4, intermediate_size=mlp,
                                               architecture=arch), tok, seed=seed + i).to(device)
        chosen = [rng.choices(styles, weights=mix)[0] for _ in examples]
        losses = fit_lm(model, tok, [e.prompt for e in examples], [e.solutions[s] for e, s in zip(examples, chosen)],
                        steps=steps, batch_size=cfg.batch_size, lr=lr, seed=seed + i,
                        desc=f"world: {name} SFT", progress=progress, autocast=bf16)
        info[name] = {"params": num_params(model), "vocab": len(tok), "final_loss": losses[-1], "steps": steps,
                      "examples": len(examples)}
        from ..model_card import world_card

        save_model(model, tok, paths[name], extra_files={
            "README.md": world_card(name, info[name], {"seed": seed, "task": dataclasses.asdict(task)})})
    from ..io import versions
    from ..precision import record

    write_json(root / "world.json", {"config": dataclasses.asdict(cfg), "task": dataclasses.asdict(task), "seed": seed,
                                     "key": root.name, "models": info, "precision": record(cfg.bf16, device),
                                     "versions": versions()})
    return paths


ATTACKERS = ("unseen", "large")


def build_attacker_students(cfg: WorldConfig, task: TaskConfig, progress: bool = True) -> dict[str, str]:
    """Two more student bases for the attack battery, built once per world and cached next to it:
    `unseen`, another architecture (Gemma-3) and tokenizer (BPE of 512 tokens on other text) than both the
    proxy and the student base, at the student's size; `large`, the student's architecture and tokenizer at the
    teacher's size (capacity). Both trained like the student base (worked solutions, student_steps)."""
    from ..precision import use_bf16

    seed = task.seed
    device = pick_device()
    bf16 = use_bf16(cfg.bf16, device)
    root = cache_dir() / "worlds" / f"{world_key(cfg, task, bf16)}-attackers"
    paths = {name: str(root / name) for name in ATTACKERS}
    if all((Path(p) / "config.json").exists() for p in paths.values()):
        return paths
    seed_everything(seed)
    train = task.load().train
    corpus = [e.prompt + s for e in train for s in e.solutions.values()]
    train = student_examples(cfg, task, train)  # (what the student base learnt from)
    plan = {"unseen": (train_tokenizer(corpus[2::3], 512, "bpe"), cfg.student_size, "gemma3"),
            "large": (train_tokenizer(corpus[1::3], cfg.student_vocab, "bpe"), cfg.teacher_size, "qwen2")}
    info = {}
    for i, (name, (tok, (h, layers, mlp), arch)) in enumerate(plan.items()):
        model = build_tiny_model(TinyModelSpec(hidden_size=h, num_layers=layers, num_heads=4, intermediate_size=mlp,
                                               architecture=arch), tok, seed=seed + 10 + i).to(device)
        losses = fit_lm(model, tok, [e.prompt for e in train], [e.solutions["worked"] for e in train],
                        steps=cfg.student_steps, batch_size=cfg.batch_size, lr=cfg.learning_rate, seed=seed + 10 + i,
                        desc=f"attacker student: {name} SFT", progress=progress, autocast=bf16)
        save_model(model, tok, paths[name])
        info[name] = {"params": num_params(model), "vocab": len(tok), "architecture": arch, "final_loss": losses[-1]}
    write_json(root / "attackers.json", {"world": root.name.removesuffix("-attackers"), "seed": seed, "models": info})
    return paths
