"""Precision chosen by the hardware (precision.py): the resolution rule on faked capabilities, never wall times."""

import pytest

from distillability.config import RuntimeConfig, from_dict
from distillability.errors import ConfigError
from distillability.precision import resolve


def _never():
    raise AssertionError("the micro-benchmark ran where the flags decide")


@pytest.mark.parametrize("setting,device,flags,bench,expect,why", [
    ("true", "cpu", set(), _never, True, "forced"),
    ("false", "cpu", {"amx_bf16"}, _never, False, "forced"),
    (True, "cpu", set(), _never, True, "forced"),
    ("auto", "cpu", {"avx512f", "amx_bf16", "amx_tile"}, _never, True, "AMX"),
    ("auto", "cpu", {"avx512f", "avx512_bf16"}, _never, True, "AVX512-BF16"),
    ("auto", "cpu", {"avx512f", "avx2"}, lambda: 0.33, False, "emulated"),
    ("auto", "cpu", set(), lambda: 1.9, True, "1.9x"),
    ("auto", "cpu", set(), lambda: 1.1, False, "1.10x"),  # below the 1.2x bar: not worth the casts
    ("auto", "mps", {"amx_bf16"}, _never, False, "float32"),
])
def test_resolution_on_faked_cpus(setting, device, flags, bench, expect, why):
    on, reason = resolve(setting, device, flags=flags, benchmark=bench)
    assert on is expect and why in reason


@pytest.mark.parametrize("supported", [True, False])
def test_resolution_on_a_faked_gpu(supported):
    on, reason = resolve("auto", "cuda", flags=set(), cuda_bf16=lambda: supported, benchmark=_never)
    assert on is supported and "CUDA" in reason


def test_config_accepts_auto_and_booleans_and_refuses_others():
    assert RuntimeConfig().bf16 == "auto"
    assert from_dict(RuntimeConfig, {"bf16": True}).bf16 == "true"
    assert from_dict(RuntimeConfig, {"bf16": False}).bf16 == "false"
    with pytest.raises(ConfigError, match="runtime.bf16|bf16"):
        from_dict(RuntimeConfig, {"bf16": "fast"})
    assert from_dict(RuntimeConfig, {"bf16": "false"}).autocast is False
    assert from_dict(RuntimeConfig, {"bf16": "true"}).precision()["bf16"] is True


def test_benchmark_result_is_cached_per_machine(tmp_path, monkeypatch):
    from distillability import precision

    calls = []
    monkeypatch.setattr(precision, "matmul_speedup", lambda: calls.append(1) or 0.4)
    f = tmp_path / "precision.json"
    assert precision._benchmark_cached(f) == 0.4 and precision._benchmark_cached(f) == 0.4
    assert len(calls) == 1 and f.is_file()


def test_environment_decides_auto_but_not_a_forced_setting(monkeypatch):
    """DISTILLABILITY_BF16 says what `auto` resolves to on this machine (the suite sets false); an explicit
    true/false in a config still wins, and the card records the reason."""
    from distillability import precision

    for env, auto in (("true", True), ("false", False)):
        monkeypatch.setenv(precision.ENV, env)
        precision._resolved.cache_clear()
        assert precision.use_bf16("auto", "cpu", announce=False) is auto
        assert precision.record("auto")["reason"] == f"DISTILLABILITY_BF16={env}"
        assert precision.use_bf16("true", "cpu", announce=False) is True
        assert precision.use_bf16("false", "cpu", announce=False) is False
    precision._resolved.cache_clear()
