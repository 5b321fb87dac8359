"""Typed configs: dataclasses with documented defaults, loaded from YAML and `key=value` overrides.

Every field is declared with `opt(default, "meaning", ...)`; the CLI's `--help` lists them all. Loading
checks unknown keys (with a suggestion), types and ranges, and raises a one-line ConfigError naming
the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


def opt(default: Any, help: str, *, choices: tuple | None = None, min: float | None = None,
        max: float | None = None, min_exclusive: bool = False) -> Any:
    """A config field with its meaning and allowed values."""
    meta = {"help": help, "choices": choices, "min": min, "max": max, "min_exclusive": min_exclusive}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    if dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda d=default: dataclasses.replace(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def sub(cls: type, help: str) -> Any:
    """A nested config section."""
    return dataclasses.field(default_factory=cls, metadata={"help": help, "section": True})


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _type_name(args[0]) + " or null"
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping of " + " to ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        return _coerce(value, args[0], key)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        if dataclasses.is_dataclass(item_tp):  # a list of sections (e.g. the attack battery)
            return [v if isinstance(v, item_tp) else from_dict(item_tp, v, prefix=f"{key}[{i}].")
                    for i, v in enumerate(value)]
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, item_tp = typing.get_args(tp)
        if isinstance(value, str) and value.strip().startswith("{"):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping (name: value), got {value!r}")
        return {_coerce(k, key_tp, key): _coerce(v, item_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        number = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"config key '{key}': {value!r} is not a finite number")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    return value


def _check_range(value: Any, meta: dict, key: str) -> None:
    if value is None:
        return
    items = value if isinstance(value, list) else [value]
    for v in items:
        if meta.get("choices") and v not in meta["choices"]:
            raise ConfigError(f"config key '{key}': {v!r} is not one of {', '.join(map(str, meta['choices']))}")
        if meta.get("min") is not None and isinstance(v, (int, float)):
            if v < meta["min"] or (meta.get("min_exclusive") and v == meta["min"]):
                op = ">" if meta.get("min_exclusive") else ">="
                raise ConfigError(f"config key '{key}': {v} is out of range (must be {op} {meta['min']})")
        if meta.get("max") is not None and isinstance(v, (int, float)) and v > meta["max"]:
            raise ConfigError(f"config key '{key}': {v} is out of range (must be <= {meta['max']})")


def from_dict(cls: type, data: dict, prefix: str = "", base: Any = None) -> Any:
    """Build a config of type `cls` from a (possibly partial) dict, on top of `base` or the defaults."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}': expected a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    obj = base if base is not None else cls()
    values = {}
    aliases = getattr(cls, "ALIASES", {})
    for key, value in data.items():
        if key in aliases and key not in fields:
            new = aliases[key]
            if new in data:
                raise ConfigError(f"config key '{prefix}{key}': deprecated name of '{prefix}{new}', which is also given")
            warn_once(f"config key '{prefix}{key}' is deprecated; use '{prefix}{new}'")
            key = new
        full = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{full}'{hint}")
        f = fields[key]
        if f.metadata.get("section"):
            values[key] = from_dict(hints[key], value or {}, prefix=f"{full}.", base=getattr(obj, key))
        else:
            if isinstance(value, bool):
                # YAML 1.1 reads a bare off/on/true/false as a boolean (e.g. wellformed_gate=off, bf16=true)
                for word in (("on", "off"), ("true", "false")):
                    if word[not value] in (f.metadata.get("choices") or ()):
                        value = word[not value]
                        break
            v = _coerce(value, hints[key], full)
            _check_range(v, f.metadata, full)
            values[key] = v
    obj = dataclasses.replace(obj, **values)
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


_warned: set[str] = set()


def warn_once(message: str) -> None:
    """A one-line warning on stderr, once per process."""
    if message not in _warned:
        _warned.add(message)
        print(f"warning: {message}", file=sys.stderr, flush=True)


def parse_overrides(args: list[str]) -> dict:
    """`a.b=1`, `--a.b 1`, `--a-b=1` and bare `--flag` (true) into a nested dict. Values are YAML."""
    out: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            body = arg[2:]
            if "=" in body:
                key, raw = body.split("=", 1)
            elif i + 1 < len(args) and not args[i + 1].startswith("--") and "=" not in args[i + 1]:
                key, raw = body, args[i + 1]
                i += 1
            else:
                key, raw = body, "true"
        elif "=" in arg:
            key, raw = arg.split("=", 1)
        else:
            raise ConfigError(f"cannot parse argument '{arg}' (expected key=value or --key value)")
        key = key.replace("-", "_")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
        i += 1
    return out


def merge(a: dict, b: dict) -> dict:
    """`b` over `a`, nested sections merged key by key."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path) -> dict:
    """A YAML config file as a mapping; a missing, unreadable, binary or malformed file is a one-line
    ConfigError naming it (every config file the CLI reads comes through here)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{path}: config file not found")
    if p.is_dir():
        raise ConfigError(f"{path}: is a folder, expected a YAML config file")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror})") from None
    if b"\x00" in raw:
        raise ConfigError(f"{path}: not a text file (binary bytes), expected a YAML config file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}), expected a YAML config file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def load_data(path: str | None = None, overrides: list[str] | dict | None = None, base: dict | None = None) -> dict:
    """`base`, then the YAML file, then the overrides, as one nested dict (not yet checked)."""
    data = dict(base or {})
    if path:
        data = merge(data, read_yaml(path))
    if overrides:
        data = merge(data, overrides if isinstance(overrides, dict) else parse_overrides(list(overrides)))
    return data


def load_config(cls: type, path: str | None = None, overrides: list[str] | dict | None = None) -> Any:
    """Defaults, then the YAML file, then overrides."""
    return from_dict(cls, load_data(path, overrides))


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


# keys added to a section after runs were made with it: at these values (their defaults, which do what the
# section did before the key existed) they are left out of a stage's saved config and of a world's cache key,
# so finished stages and built (and shipped) worlds stay reused
LATER_KEYS = {"world_terms": [], "eval_offset": 0, "extra_proxies": {}, "repeats": None, "per_device_train_batch_size": None,
              "prime": {"students": [], "num_prompts": 64, "style": "direct", "max_steps": 16,
                        "per_device_train_batch_size": 8, "learning_rate": 5e-5}}


def without_later_keys(value):
    """`value` (a config as nested dicts and lists) without the LATER_KEYS that are at their defaults."""
    if isinstance(value, dict):
        return {k: without_later_keys(v) for k, v in value.items() if not (k in LATER_KEYS and v == LATER_KEYS[k])}
    if isinstance(value, list):
        return [without_later_keys(v) for v in value]
    return value


def describe(cls: type, prefix: str = "", default: Any = None) -> list[tuple[str, str, str, str]]:
    """(key, type, default, meaning) for every field, sections flattened with dotted keys. `default`: the config
    whose values are shown as the defaults (e.g. the pipeline's with its preset applied); None = cls()."""
    rows = []
    hints = typing.get_type_hints(cls)
    default = cls() if default is None else default
    for f in dataclasses.fields(cls):
        if f.metadata.get("section"):
            rows.extend(describe(hints[f.name], prefix=f"{prefix}{f.name}.", default=getattr(default, f.name)))
            continue
        meaning = f.metadata.get("help", "")
        if f.metadata.get("choices"):
            meaning += f" One of: {', '.join(map(str, f.metadata['choices']))}."
        value = getattr(default, f.name)
        if isinstance(value, list) and value and all(dataclasses.is_dataclass(v) and hasattr(v, "name") for v in value):
            shown = "[" + ", ".join(v.name for v in value) + "]"  # a list of sections by name (e.g. the battery)
        else:
            shown = repr(value)
        rows.append((f"{prefix}{f.name}", _type_name(hints[f.name]), shown, meaning))
    return rows


def save_config(cfg: Any, path: str | Path) -> None:
    from .io import write_text

    write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ----------------------------------------------------------------------------- shared sections


@dataclasses.dataclass
class TaskConfig:
    name: str = opt("tiny-world", "Task: tiny-world, gsm8k, bigbench, mc, open, or gym:<reasoning-gym generator>.")
    path: str | None = opt(None, "Data file (JSONL/JSON) or BIG-bench task folder, for file-based tasks.")
    fallback: str | None = opt(None, "A task without a file (e.g. gym:gsm_symbolic) to use instead when `path` "
                               "does not exist, so a config also runs where the data set is absent.")
    num_train: int = opt(2000, "Training prompts drawn from the task.", min=0)
    num_eval: int = opt(100, "Held-out prompts, never used for training.", min=1)
    seed: int = opt(0, "Seed of the task's split (and of the tiny world's generator).")
    use_chat_template: bool = opt(False, "Wrap prompts in each tokenizer's chat template where it has one.")
    world_min_terms: int = opt(2, "tiny-world: fewest numbers in an arithmetic chain.", min=2)
    world_max_terms: int = opt(4, "tiny-world: most numbers in an arithmetic chain.", min=2)
    world_mc_share: float = opt(0.25, "tiny-world: share of multiple-choice examples.", min=0, max=1)
    world_modulus: int = opt(0, "tiny-world: 0 = plain arithmetic (totals 0..99); m >= 2 = arithmetic modulo m "
                             "(digits and totals 0..m-1: few facts, a huge space of chains).", min=0)
    world_heldout: str = opt("iid", "tiny-world: how the held-out prompts are chosen: iid (a random sample of the "
                             "world's distinct prompts, distributed like the training ones) or first (drawn first "
                             "and excluded from training; short chains then end up almost all held out).",
                             choices=("iid", "first"))
    world_terms: list[int] = opt([], "tiny-world: keep only the arithmetic chains of these many terms in both splits, "
                                 "filtered after the full world's splits are drawn, so each is a subset of the full "
                                 "world's split ([] = every chain and the multiple-choice examples).")

    def load(self):
        """The Task this section names."""
        from .tasks import load_task

        spec = self.world_spec()
        if self.fallback and self.path and not Path(self.path).exists():
            return load_task(self.fallback, None, self.num_train, self.num_eval, self.seed, spec)
        return load_task(self.name, self.path, self.num_train, self.num_eval, self.seed, spec)

    def world_spec(self):
        """The tiny world's shape these keys describe."""
        from .tasks import WorldSpec

        return WorldSpec(self.world_min_terms, self.world_max_terms, self.world_mc_share, self.world_modulus,
                         self.world_heldout, tuple(self.world_terms))

    def validate(self) -> None:
        if self.world_max_terms < self.world_min_terms:
            raise ConfigError("config key 'task.world_max_terms': must be >= task.world_min_terms")
        outside = [n for n in self.world_terms if not self.world_min_terms <= n <= self.world_max_terms]
        if outside:
            raise ConfigError(f"config key 'task.world_terms': {outside} outside the world's chains of "
                              f"{self.world_min_terms}-{self.world_max_terms} terms")


@dataclasses.dataclass
class RuntimeConfig:
    device: str = opt("auto", "Device for the trained model: auto, cpu, cuda, cuda:1, ...")
    frozen_device: str = opt("auto", "Device for frozen models (reference, proxy, teacher).")
    bf16: str = opt("auto", "bf16 autocast (weights stay float32): auto = where the device computes bf16 natively "
                    "(a CUDA GPU with bf16, a CPU with AMX or AVX512-BF16, else a cached micro-benchmark), true or "
                    "false to force it.", choices=("auto", "true", "false"))
    threads: int = opt(2, "torch CPU threads (0 = torch's default).", min=0)
    seed: int = opt(0, "Random seed.")
    trust_remote_code: bool = opt(False, "Allow model code from the model folder (off: only transformers' own code).")
    allow_pickle: bool = opt(False, "Allow loading pickle (.bin) weights; off: safetensors only.")
    progress: bool = opt(True, "Show progress bars.")
    fsdp: bool = opt(False, "Under several processes, shard the trained model (FSDP2); also on when `accelerate "
                            "launch` uses an FSDP config.")
    report_to: list[str] = opt(["none"], "Trackers that get every logged scalar and the run's config, as TRL's "
                               "report_to: none, trackio (a local project under $TRACKIO_DIR, default "
                               "<output_dir>/trackio), tensorboard (<output_dir>/tensorboard), all, or a list.",
                               choices=("none", "trackio", "tensorboard", "all"))

    def start(self) -> None:
        """Threads and seeds, at the top of every recipe."""
        from .distributed import get_dist
        from .training import seed_everything, set_threads

        set_threads(self.threads)
        seed_everything(self.seed)
        _ = self.autocast  # resolve the precision now (printed once, with its reason)
        if self.fsdp:
            get_dist().fsdp = get_dist().active

    @property
    def autocast(self) -> bool:
        """The resolved bf16 choice for the trained model's device (printed once per run)."""
        from .models import pick_device
        from .precision import use_bf16

        return use_bf16(self.bf16, pick_device(self.device))

    def precision(self) -> dict:
        """The precision record every stage card carries."""
        from .models import pick_device
        from .precision import record

        return record(self.bf16, pick_device(self.device))

    def load(self, spec: str, frozen: bool = False):
        """(model, tokenizer) on this runtime's device (frozen models: `frozen_device`, no gradients, eval)."""
        from .models import load_model

        model, tok = load_model(spec, device=self.frozen_device if frozen else self.device,
                                trust_remote_code=self.trust_remote_code, allow_pickle=self.allow_pickle)
        if frozen:
            model.requires_grad_(False).eval()
        return model, tok
