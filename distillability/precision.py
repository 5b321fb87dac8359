"""Precision chosen by the hardware: `bf16: auto` resolves to bf16 autocast where the device computes bf16
natively and to float32 elsewhere (`true`/`false` force it).

Why: on a CPU with AMX a bf16 matmul is ~6x faster than float32, on one without AMX or AVX512-BF16 bf16 is
emulated and ~3x slower. The rule: a CUDA device that supports bf16; a CPU whose flags name AMX-BF16 or
AVX512-BF16; otherwise a one-time matmul micro-benchmark (cached per machine and torch version in the model
cache) that must show bf16 at least `FASTER` times float32's speed.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

SETTINGS = ("auto", "true", "false")
ENV = "DISTILLABILITY_BF16"  # true/false: what `auto` resolves to on this machine (tests set false)
FASTER = 1.2  # bf16 must beat float32 by this factor in the micro-benchmark to be chosen
_announced: set = set()


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty where unreadable)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def matmul_speedup(n: int = 384, reps: int = 6) -> float:
    """float32 time / bf16 time of an n x n matmul on this CPU (1 thread, best of `reps`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a32, b32 = torch.randn(n, n), torch.randn(n, n)
        a16, b16 = a32.bfloat16(), b32.bfloat16()
        best = {}
        for name, (a, b) in (("fp32", (a32, b32)), ("bf16", (a16, b16))):
            a @ b  # warm-up
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                a @ b
                times.append(time.perf_counter() - t)
            best[name] = min(times)
        return best["fp32"] / max(best["bf16"], 1e-9)
    finally:
        torch.set_num_threads(threads)


def _benchmark_cached(cache_file: Path | None) -> float:
    key = f"{cpu_name()}|{platform.machine()}|torch {torch.__version__}"
    if cache_file is not None and cache_file.is_file():
        try:
            saved = json.loads(cache_file.read_text(encoding="utf-8"))
            if saved.get("key") == key:
                return float(saved["speedup"])
        except (ValueError, KeyError, OSError):
            pass
    speedup = matmul_speedup()
    if cache_file is not None:
        try:
            from .io import write_json

            write_json(cache_file, {"key": key, "speedup": speedup})
        except OSError:
            pass  # a read-only cache: measure again next time
    return speedup


def resolve(setting: str | bool, device_type: str, *, flags: set[str] | None = None,
            cuda_bf16: Callable[[], bool] | None = None, benchmark: Callable[[], float] | None = None
            ) -> tuple[bool, str]:
    """(use bf16, why) for `setting` (auto/true/false) on a device of `device_type` (cpu, cuda, ...).
    `flags`, `cuda_bf16` and `benchmark` stand in for the hardware (tests)."""
    setting = {True: "true", False: "false"}.get(setting, setting) if isinstance(setting, bool) else str(setting)
    if setting == "true":
        return True, "forced (bf16=true)"
    if setting == "false":
        return False, "forced (bf16=false)"
    if device_type == "cuda":
        ok = (cuda_bf16 or torch.cuda.is_bf16_supported)()
        return ok, "CUDA device with bf16" if ok else "CUDA device without bf16"
    if device_type != "cpu":
        return False, f"{device_type} device: float32"
    flags = cpu_flags() if flags is None else flags
    if "amx_bf16" in flags:
        return True, "CPU has AMX (amx_bf16)"
    if "avx512_bf16" in flags:
        return True, "CPU has AVX512-BF16"
    if benchmark is None:
        from .models import cache_dir

        speedup = _benchmark_cached(cache_dir() / "precision.json")
    else:
        speedup = benchmark()
    if speedup >= FASTER:
        return True, f"CPU without AMX/AVX512-BF16, but bf16 matmul measured {speedup:.1f}x float32"
    return False, f"CPU without AMX/AVX512-BF16 (bf16 matmul measured {speedup:.2f}x float32: emulated)"


@functools.cache
def _resolved(setting: str, device_type: str) -> tuple[bool, str]:
    forced = os.environ.get(ENV, "").strip().lower()
    if setting == "auto" and forced in ("true", "false"):
        return forced == "true", f"{ENV}={forced}"
    return resolve(setting, device_type)


def use_bf16(setting: str | bool, device: torch.device | str = "cpu", announce: bool = True) -> bool:
    """Resolve (cached per process); print the choice and its reason once per process and setting."""
    device_type = torch.device(device).type
    setting = {True: "true", False: "false"}.get(setting, setting) if isinstance(setting, bool) else str(setting)
    on, why = _resolved(setting, device_type)
    if announce and (setting, device_type) not in _announced:
        _announced.add((setting, device_type))
        print(f"precision: {'bf16' if on else 'float32'} on {device_type} (bf16={setting}: {why})", file=sys.stderr,
              flush=True)
    return on


def record(setting: str | bool, device: torch.device | str = "cpu") -> dict:
    """What a stage card records: the setting, the resolved choice, the reason and the CPU."""
    device_type = torch.device(device).type
    setting = {True: "true", False: "false"}.get(setting, setting) if isinstance(setting, bool) else str(setting)
    on, why = _resolved(setting, device_type)
    out = {"setting": setting, "bf16": on, "reason": why, "device": device_type}
    if device_type == "cpu":
        flags = cpu_flags()
        out.update(cpu=cpu_name(), amx="amx_bf16" in flags, avx512_bf16="avx512_bf16" in flags)
    elif device_type == "cuda" and torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out
