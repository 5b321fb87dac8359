"""Tiny models, tokenizers, save/reload, generation, and sequence scoring across tokenizers."""

import pytest
import torch

from distillability.errors import ModelError
from distillability.models import TinyModelSpec, build_tiny_model, load_model, save_model, train_tokenizer
from distillability.sampling import generate
from distillability.scoring import encode_pair, sequence_logprobs, sequence_logprobs_from_ids
from distillability.tasks import world_splits
from distillability.training import encode_sft_batch, nll_loss

CORPUS = [e.prompt + s for e in world_splits(200, 10, 0)[0] for s in e.solutions.values()]


@pytest.mark.parametrize("kind,arch", [("char", "llama"), ("bpe", "qwen2")])
def test_tiny_model_trains_generates_saves_and_reloads_identically(tmp_path, kind, arch):
    tok = train_tokenizer(CORPUS, 300, kind)
    text = "Q: 3+4=?\nA: 3+4=7. #### 7"
    assert tok.decode(tok(text)["input_ids"]) == text  # lossless
    if kind == "bpe":
        assert "12" not in tok.convert_ids_to_tokens(tok("12+34")["input_ids"])  # digits split
    model = build_tiny_model(TinyModelSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                                           architecture=arch), tok)
    opt = torch.optim.AdamW(model.parameters(), 1e-2)
    ids, mask, lmask = encode_sft_batch(tok, ["Q: 1+1=?\nA:"] * 4, [" #### 2"] * 4)
    first = nll_loss(model, ids, mask, lmask)
    for _ in range(10):
        loss = nll_loss(model, ids, mask, lmask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first.item()
    gens = generate(model, tok, ["Q: 1+1=?\nA:"], max_new_tokens=8, greedy=True)
    assert len(gens) == 1 and isinstance(gens[0].text, str)
    save_model(model, tok, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").exists()
    model2, tok2 = load_model(str(tmp_path / "m"), device="cpu")
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model2(ids).logits)
    assert tok2.get_vocab() == tok.get_vocab()


def test_load_model_errors(tmp_path):
    with pytest.raises(ModelError, match="no such folder"):
        load_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="config.json"):
        load_model(str(tmp_path / "empty"))


def test_pickle_weights_refused(tmp_path):
    tok = train_tokenizer(CORPUS, 0, "char")
    model = build_tiny_model(TinyModelSpec(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32), tok)
    model.save_pretrained(tmp_path, safe_serialization=False)
    tok.save_pretrained(tmp_path)
    if not list(tmp_path.glob("*.bin")):
        pytest.skip("this transformers version always writes safetensors")
    with pytest.raises(ModelError, match="pickle"):
        load_model(str(tmp_path))


def _model(tok, seed=0):
    return build_tiny_model(TinyModelSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), tok, seed).eval()


def test_cross_tokenizer_path_equals_same_tokenizer_path():
    tok = train_tokenizer(CORPUS, 300, "bpe")
    model = _model(tok)
    prompts = ["Q: 3+4=?\nA:", "Q: largest? (A) 12 (B) 40 (C) 33\nA:"]
    responses = [" 3+4=7. #### 7", " 40 is (B). #### B"]
    text_path = sequence_logprobs(model, tok, prompts, responses, add_eos=True)["logprob"]
    p_ids = [tok(p)["input_ids"] for p in prompts]
    r_ids = [tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in responses]
    id_path = sequence_logprobs_from_ids(model, p_ids, r_ids, tok.pad_token_id)
    assert torch.allclose(text_path, id_path, atol=1e-6)


def test_boundary_rule_response_logprob_is_conditional_on_prompt_tokens():
    """The boundary always falls between tokens: log p(prompt+response) = log p(prompt) + log p(response|prompt),
    whether or not the joint text would tokenize across the boundary."""
    tok = train_tokenizer(CORPUS, 400, "bpe")
    model = _model(tok, 3)
    prompt, response = "Q: 1+2=?\nA", ": #### 3"  # a boundary inside what BPE might merge (":" after "A")
    ids, plen = encode_pair(tok, prompt, response)
    assert ids[:plen] == tok(prompt)["input_ids"] and ids[plen:] == tok(response, add_special_tokens=False)["input_ids"]
    lp_resp = sequence_logprobs(model, tok, [prompt], [response])["logprob"][0]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
    manual = sum(logits[t - 1, ids[t]] for t in range(plen, len(ids)))
    assert abs(lp_resp.item() - manual.item()) < 1e-4
    # different tokenizers score the same string: both finite, and each is a proper log-probability (< 0)
    tok_c = train_tokenizer(CORPUS, 0, "char")
    lp_c = sequence_logprobs(_model(tok_c), tok_c, [prompt], [response])["logprob"][0]
    assert lp_c < 0 and lp_resp < 0
