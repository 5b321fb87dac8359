"""Build the embedded default's world (seed 0) and ship it inside the package, or check a shipped world.

    .venv/bin/python bench/ship_world.py            # build here (world.shipped=false), copy into distillability/worlds/
    .venv/bin/python bench/ship_world.py --from DIR # ship an already built world folder (its world.json must match)
    .venv/bin/python bench/ship_world.py --check    # rebuild with the same settings, compare every tensor

A shipped world is what `distillability demo` uses when its world settings match (world.shipped, default on): the
same three models on every machine, and no 3000-step build (which takes ~4 min on a 2-core CPU with AMX and
~35 min on one without). The models are bit-reproducible only on the same kind of machine (float kernels differ
across CPUs), so `--check` is meaningful on the machine named in the shipped world.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def default_world(seed: int = 0):
    from distillability.recipes.pipeline import load_pipeline_config

    cfg = load_pipeline_config(None, {"seed": seed})
    import dataclasses

    return cfg.world, dataclasses.replace(cfg.task, seed=seed), cfg


def build(world, task, cache: Path) -> Path:
    import dataclasses

    from distillability.recipes.world import build_world

    os.environ["DISTILLABILITY_CACHE"] = str(cache)
    paths = build_world(dataclasses.replace(world, shipped=False), task, progress=True)
    return Path(paths["teacher"]).parent


def compare(a: Path, b: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    out = {}
    for name in ("teacher", "proxy", "student"):
        ta, tb = load_file(str(a / name / "model.safetensors")), load_file(str(b / name / "model.safetensors"))
        same_tok = (a / name / "tokenizer.json").read_bytes() == (b / name / "tokenizer.json").read_bytes()
        diff = max(float((ta[k].double() - tb[k].double()).abs().max()) for k in ta) if ta.keys() == tb.keys() else None
        out[name] = {"identical": same_tok and diff == 0.0 and all(torch.equal(ta[k], tb[k]) for k in ta),
                     "max_abs_diff": diff, "tokenizer_identical": same_tok}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="src", type=Path, help="an already built world folder to ship")
    ap.add_argument("--check", action="store_true", help="rebuild and compare with the shipped world")
    args = ap.parse_args()
    from distillability.precision import record
    from distillability.recipes.world import SHIPPED, shipped_world, world_key

    world, task, _ = default_world()
    if args.check:
        shipped = shipped_world(world, task)
        if shipped is None:
            sys.exit("no shipped world matches the embedded default's settings")
        card = json.loads((shipped / "world.json").read_text())
        here = record(world.bf16)
        print(f"shipped world {shipped.name}: built on {card['precision'].get('cpu')} "
              f"(bf16={card['precision']['bf16']}); this machine: {here.get('cpu')} (bf16={here['bf16']})")
        with tempfile.TemporaryDirectory() as tmp:
            built = build(world, task, Path(tmp))
            result = compare(shipped, built)
        print(json.dumps(result, indent=2))
        sys.exit(0 if all(r["identical"] for r in result.values()) else 1)
    src = args.src or build(world, task, Path(tempfile.mkdtemp(prefix="world-")))
    card = json.loads((src / "world.json").read_text())
    import dataclasses

    want = {k: v for k, v in dataclasses.asdict(world).items() if k not in ("bf16", "shipped")}
    got = {k: v for k, v in card["config"].items() if k not in ("bf16", "shipped")}
    if want != got or card["seed"] != task.seed:
        sys.exit(f"{src}: built with other settings than the embedded default: {got} vs {want}")
    bf16 = card.get("precision", {}).get("bf16", card["config"].get("bf16") in (True, "true"))
    dest = SHIPPED / world_key(world, task, bool(bf16))
    shutil.rmtree(dest, ignore_errors=True)
    for name in ("teacher", "proxy", "student"):
        shutil.copytree(src / name, dest / name)
    card.update(key=dest.name, task=dataclasses.asdict(task), config=dataclasses.asdict(world) | {"bf16": world.bf16})
    card.setdefault("precision", record("true" if bf16 else "false"))  # (a world built before cards recorded it)
    (dest / "world.json").write_text(json.dumps(card, indent=2) + "\n")
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(f"shipped {dest} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
