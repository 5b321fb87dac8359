"""A stage of a longer job (the pipeline's stages, the attack battery's cells): run once, reused while its
config and its input models are unchanged, so an interrupted job resumes at the next unfinished stage."""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from ..config import to_dict, without_later_keys
from ..io import write_text


def _inputs(cfg) -> dict:
    """Size and mtime of every model folder or file the stage's config points at (other than its own output
    folder): a stage whose input an upstream stage rewrote (e.g. a distilled student after a distill setting
    changed) is rerun, not answered from its cache."""
    found = {}

    def walk(value, key):
        if isinstance(value, dict):
            for k, v in value.items():
                if k != "output_dir":
                    walk(v, f"{key}.{k}" if key else k)
        elif isinstance(value, str) and value and (p := Path(value)).exists():
            files = [p] if p.is_file() else sorted(p.glob("*.safetensors")) or sorted(p.glob("*/*.safetensors"))
            found[key] = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]

    walk(to_dict(cfg), "")
    return found


UNTRACKED = ("report_to", "threads", "progress")


def _untracked(value):
    """A config without the keys that do not change what a stage computes: where its scalars are also sent
    (`report_to`), how many CPU threads compute it, whether it shows progress bars."""
    if isinstance(value, dict):
        return {k: _untracked(v) for k, v in value.items() if k not in UNTRACKED}
    return value


def same_stage(saved: Path, current: str) -> bool:
    """Whether a saved stage text is the current one; a text saved by an earlier version, which still held the
    untracked keys (or a later key at its default), is compared without them."""
    if not saved.exists():
        return False
    text = saved.read_text()
    if text == current:
        return True
    try:
        return without_later_keys(_untracked(yaml.safe_load(text))) == yaml.safe_load(current)
    except yaml.YAMLError:
        return False


def stage_config_text(cfg) -> str:
    """The text a stage's config is saved as and compared by (keys added later, at their defaults, left out; the
    trackers left out)."""
    return yaml.safe_dump(without_later_keys(_untracked(to_dict(cfg))), sort_keys=True)


def run_stage(out: Path, name: str, cfg, marker: str, fn, log: dict | None = None):
    """Run fn(cfg) unless out/name holds `marker` from a run with the same config and the same inputs. `log`
    records the stage's wall time and whether it was reused."""
    folder = out / name
    saved = folder / "stage_config.yaml"
    current = stage_config_text(cfg) + yaml.safe_dump({"inputs": _inputs(cfg)}, sort_keys=True)
    t0 = time.time()
    if (folder / marker).exists() and same_stage(saved, current):
        if log is not None:
            log[str(folder.relative_to(log["_root"]))] = {"reused": True, "wall_seconds": 0.0}
        return json.loads((folder / marker).read_text())
    started = folder / "stage_started.yaml"
    if (hasattr(cfg, "resume") and same_stage(started, current)
            and (folder / "checkpoints" / "last").exists()):
        import dataclasses

        print(f"{name}: continuing from its last checkpoint ({folder / 'checkpoints' / 'last'})", flush=True)
        cfg = dataclasses.replace(cfg, resume=True)  # a run of the same stage was cut: go on where it stopped
    elif (folder / "checkpoints").exists():
        import shutil

        shutil.rmtree(folder / "checkpoints")  # another config's: never resumed from
    folder.mkdir(parents=True, exist_ok=True)
    write_text(started, current)
    result = fn(cfg)
    write_text(saved, current)
    if log is not None:
        log[str(folder.relative_to(log["_root"]))] = {"reused": False, "wall_seconds": time.time() - t0}
    return result
