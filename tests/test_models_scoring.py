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


def test_gumbel_sampler_matches_softmax_with_top_k_and_top_p():
    """argmax(logits/T + Gumbel) is an exact sample of the truncated softmax: frequencies over 40,000
    draws match the closed form within 4 standard errors; truncated tokens never appear."""
    from distillability.sampling import GumbelSampler

    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    n = 40_000
    for T, top_k, top_p in ((1.0, 0, 1.0), (0.7, 3, 1.0), (1.0, 0, 0.8)):
        sampler = GumbelSampler([123], "cpu", T, top_k, top_p)
        counts = torch.zeros(6)
        for _ in range(n // 1000):
            batch = torch.stack([sampler(None, logits)[0] for _ in range(1000)])
            counts += torch.bincount(batch.argmax(-1), minlength=6)
        p = torch.softmax(logits[0] / T, -1)
        if top_k:
            p[top_k:] = 0
        if top_p < 1:
            keep = (p.cumsum(0) - p) < top_p
            p = torch.where(keep, p, torch.zeros_like(p))
        p = p / p.sum()
        freq = counts / n
        se = (p * (1 - p) / n).sqrt()
        assert ((freq - p).abs() <= 4 * se + 1e-9).all(), (T, top_k, top_p, freq, p)
        assert (counts[p == 0] == 0).all()


def test_sampling_is_batch_invariant(tmp_path):
    """A prompt's samples do not depend on the other prompts of its batch, the batch size or the split
    of prompts across processes (index_offset)."""
    train, _ = world_splits(60, 4, 0)
    tok = train_tokenizer([e.prompt + e.solutions["worked"] for e in train], 0, "char")
    model = build_tiny_model(TinyModelSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), tok, seed=3)
    prompts = [e.prompt for e in train[:6]]
    full = generate(model, tok, prompts, 12, 1.0, num_return_sequences=3, seed=5)
    small_batches = generate(model, tok, prompts, 12, 1.0, num_return_sequences=3, seed=5, batch_size=4)
    tail = generate(model, tok, prompts[4:], 12, 1.0, num_return_sequences=3, seed=5, index_offset=4)
    assert [g.token_ids for g in full] == [g.token_ids for g in small_batches]
    assert [g.token_ids for g in full[12:]] == [g.token_ids for g in tail]
    assert len({tuple(g.token_ids) for g in full}) > 6  # it does sample
    other_seed = generate(model, tok, prompts, 12, 1.0, num_return_sequences=3, seed=6)
    assert [g.token_ids for g in other_seed] != [g.token_ids for g in full]


def _tiny_arch_model(arch: str, sliding_window: int):
    """(train split, tokenizer, model): a 2-layer GQA model of `arch` whose EOS is likelier (some rows finish
    early) and, for Gemma-3, whose norm weights matter (they start at 0 = identity)."""
    train, _ = world_splits(80, 4, 0)
    tok = train_tokenizer([e.prompt + e.solutions["worked"] for e in train], 0 if arch == "llama" else 300,
                          "char" if arch == "llama" else "bpe")
    model = build_tiny_model(TinyModelSpec(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                                           architecture=arch, num_kv_heads=2, sliding_window=sliding_window), tok,
                             seed=3)
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] += 0.15
        if arch == "gemma3":
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(0, 0.3)
    return train, tok, model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_fast_decoder_gives_the_tokens_of_hf_generate(arch):
    """fastgen's lean KV-cached loop and Hugging Face generate: same tokens, greedy and sampled, with
    left padding (prompts of different lengths), EOS handling and GQA; for Gemma-3 also q/k norms, sandwich
    norms and local layers whose sliding window (8) is shorter than the sequences."""
    from distillability import fastgen

    train, tok, model = _tiny_arch_model(arch, sliding_window=8)
    with torch.no_grad():
        if arch == "qwen2":
            for layer in model.model.layers:
                layer.self_attn.q_proj.bias.normal_(0, 0.5)
    assert fastgen.supports(model)
    prompts = [e.prompt for e in train[:12]]
    assert len({len(p) for p in prompts}) > 1
    for greedy, bf16 in ((True, False), (False, False), (False, True)):
        kw = dict(num_return_sequences=2, seed=3, greedy=greedy, autocast=bf16)
        fast = generate(model, tok, prompts, 20, 1.0, use_fast=True, **kw)
        slow = generate(model, tok, prompts, 20, 1.0, use_fast=False, **kw)
        assert [(g.token_ids, g.finished) for g in fast] == [(g.token_ids, g.finished) for g in slow], (greedy, bf16)
    assert any(g.finished for g in fast) and not all(g.finished for g in fast)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_fast_decoder_decodes_a_lora_policy_without_a_merged_copy(arch, monkeypatch):
    """A peft LoRA policy (GRPO's) decodes through the lean decoder from each layer's base + LoRA weight: the
    tokens of the merged copy it replaces (fast path and Hugging Face generate), greedy and sampled, float32 and
    with every matmul in bf16; no deep copy is made and the policy is left as it was (unmerged, same weights)."""
    import copy as copy_module

    from peft import LoraConfig, get_peft_model

    from distillability import fastgen

    train, tok, model = _tiny_arch_model(arch, sliding_window=8)
    with torch.no_grad():
        if arch == "qwen2":
            for layer in model.model.layers:
                layer.self_attn.q_proj.bias.normal_(0, 0.5)
    prompts = [e.prompt for e in train[:12]]
    base_tokens = [g.token_ids for g in generate(model, tok, prompts, 20, 1.0, greedy=True)]
    policy = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)  # a trained adapter: the deltas change the tokens
    assert fastgen.lora_base(policy) is not None
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    for greedy, bf16 in ((True, False), (False, False), (False, True)):
        if bf16:
            monkeypatch.setattr(fastgen.Decoder, "BF16_MIN_MACS", 0)
        kw = dict(num_return_sequences=2, seed=3, greedy=greedy, autocast=bf16)
        with monkeypatch.context() as m:
            m.setattr(copy_module, "deepcopy", lambda *a, **k: pytest.fail("the LoRA policy was copied"))
            direct = generate(policy, tok, prompts, 20, 1.0, **kw)
        with monkeypatch.context() as m:
            m.setattr(fastgen, "lora_base", lambda model: None)  # the merged copy
            merged = generate(policy, tok, prompts, 20, 1.0, **kw)
        assert [(g.token_ids, g.finished) for g in direct] == [(g.token_ids, g.finished) for g in merged], (greedy, bf16)
        if greedy:
            greedy_direct = [g.token_ids for g in direct]
        if not bf16:  # Hugging Face generate on the merged copy (in float32 only: it does not run bf16 matmuls)
            slow = generate(policy, tok, prompts, 20, 1.0, use_fast=False, **kw)
            assert [(g.token_ids, g.finished) for g in direct] == [(g.token_ids, g.finished) for g in slow]
    # anything but plain LoRA linear layers (here a trained copy of the head) keeps the merged copy
    _, _, other = _tiny_arch_model(arch, sliding_window=8)
    other = get_peft_model(other, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert fastgen.lora_base(other) is None
    with policy.disable_adapter():  # the adapter off: the base model's tokens
        assert [g.token_ids for g in generate(policy, tok, prompts, 20, 1.0, greedy=True)] == base_tokens
    assert greedy_direct != base_tokens
    after = policy.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(getattr(m, "merged", False) for m in policy.modules())


def test_fast_decoder_bf16_tokens_are_the_models_own_bf16_argmax(monkeypatch):
    """With every matmul in bf16 (the size threshold forced to 0), each greedy token of the lean decoder is
    the argmax of the Hugging Face model's own forward under bf16 autocast over the same prefix, up to bf16
    rounding (the chosen token's logit within 0.05 of the maximum), and nearly always exactly."""
    from distillability import fastgen

    monkeypatch.setattr(fastgen.Decoder, "BF16_MIN_MACS", 0)
    train, _ = world_splits(80, 4, 0)
    tok = train_tokenizer([e.prompt + e.solutions["worked"] for e in train], 0, "char")
    model = build_tiny_model(TinyModelSpec(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                                           num_kv_heads=2), tok, seed=3).eval()
    prompts = [e.prompt for e in train[:8]]
    gens = generate(model, tok, prompts, 16, greedy=True, autocast=True)
    exact, total = 0, 0
    for g in gens:
        p_ids = tok(prompts[g.prompt_index])["input_ids"]
        ids = torch.tensor([p_ids + g.token_ids])
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids).logits[0].float()
        for k, t in enumerate(g.token_ids):
            row = logits[len(p_ids) - 1 + k]
            assert row.max() - row[t] < 0.05, (g.prompt_index, k)
            exact += int(row.argmax() == t)
            total += 1
    assert total > 50 and exact >= 0.9 * total


def test_lora_model_generates_from_a_merged_copy_and_keeps_its_adapters():
    """A LoRA-wrapped policy decodes from a merged copy (unmerged adapters cost ~3x per token): the tokens
    are those of the merged model, and the policy keeps its trainable adapters."""
    import copy

    from distillability.training import apply_lora

    train, _ = world_splits(60, 4, 0)
    tok = train_tokenizer([e.prompt + e.solutions["worked"] for e in train], 0, "char")
    model = apply_lora(build_tiny_model(TinyModelSpec(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
                                        tok, seed=3), 4, 8)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    merged = copy.deepcopy(model).merge_and_unload()
    prompts = [e.prompt for e in train[:8]]
    for kw in (dict(greedy=True), dict(seed=4)):
        a = generate(model, tok, prompts, 10, **kw)
        b = generate(merged, tok, prompts, 10, **kw)
        assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert hasattr(model, "peft_config") and any(p.requires_grad and "lora" in n for n, p in model.named_parameters())


def test_next_character_projection_matches_a_reference_loop():
    """FirstCharProjector: p_char(c) = sum of p(v) over tokens whose text starts with c (specials: one bucket),
    against a float64 loop over the vocabulary; the chunked hidden-state form equals it."""
    from distillability.crosstok import FirstCharProjector

    tok_c, tok_b = train_tokenizer(CORPUS, 0, "char"), train_tokenizer(CORPUS, 300, "bpe")
    proj = FirstCharProjector([tok_c, tok_b])
    g = torch.Generator().manual_seed(0)
    for which, tok in ((0, tok_c), (1, tok_b)):
        V = len(tok)
        logits = torch.randn(5, V, generator=g, dtype=torch.float64) * 3
        p = logits.softmax(-1)
        ref = torch.zeros(5, proj.size, dtype=torch.float64)
        letters: dict[str, int] = {}
        for v in range(V):
            s = "" if v in tok.all_special_ids else tok.decode([v], skip_special_tokens=True)
            letters.setdefault(s[:1] or "<end>", int(proj.index[which][v]))
            assert letters[s[:1] or "<end>"] == int(proj.index[which][v])  # one bucket per character
            ref[:, int(proj.index[which][v])] += p[:, v]
        got = proj.project(logits, which)
        assert torch.allclose(got.exp().double(), ref, atol=1e-6)
        assert abs(got.exp().sum(-1) - 1).max() < 1e-5
        # hidden states @ head in row chunks == projecting the logits
        h, W = torch.randn(7, 16, generator=g), torch.randn(V, 16, generator=g)
        assert torch.allclose(proj.project_hidden(h, W, which, 1.5, chunk_size=3), proj.project(h @ W.T, which, 1.5),
                              atol=1e-5)
    # the two tokenizers share their character buckets ("7" in one is "7" in the other)
    i_c, i_b = tok_c.convert_tokens_to_ids("7"), tok_b.convert_tokens_to_ids("7")
    assert int(proj.index[0][i_c]) == int(proj.index[1][i_b])


@pytest.mark.parametrize("on_policy", [False, True])
def test_fused_cross_tokenizer_loss_equals_the_logits_path(monkeypatch, on_policy):
    """distill's next-character loss across tokenizers from hidden states (teacher head applied chunk-wise to
    the aligned rows only) == the same loss from full logits: value and student gradients, float64."""
    import distillability.kd_loss as K
    import distillability.recipes.distill as D
    from distillability.config import load_config

    tok_c, tok_b = train_tokenizer(CORPUS, 0, "char"), train_tokenizer(CORPUS, 300, "bpe")
    teacher, student = _model(tok_c, 1).double(), _model(tok_b, 2).double().train()
    cfg = load_config(D.DistillConfig, None, {"teacher": "t", "student": "s", "method": "gkd", "cross_tokenizer": "char",
                                              "temperature": 1.3, "runtime": {"bf16": False}})
    prompts = ["Q: 3+4=?\nA:", "Q: largest? (A) 12 (B) 40 (C) 33\nA:", "Q: 9-2+5=?\nA:"]
    responses = [" 3+4=7. #### 7", " 40 is (B). #### B", " 9-2=7, 7+5=12. #### 12"]
    results = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(K, "lm_parts", lambda model: None)
        student.zero_grad()
        loss_fn = K.token_loss(cfg, teacher, tok_c, student, tok_b, "jsd")
        assert isinstance(loss_fn, K.CrossTokenizerLoss)
        loss = loss_fn(prompts, responses, [True] * 3, on_policy)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in student.parameters()]))
    (l1, g1), (l2, g2) = results
    assert l1 > 0 and abs(l1 - l2) < 1e-10
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(g1, g2))


def test_cross_tokenizer_teacher_targets_are_kept_per_text(monkeypatch):
    """Off-policy, the char loss runs the teacher only on texts it has not seen (a repeated text, within a batch or
    across calls, costs no teacher row) and gives the uncached loss and gradients (float64, 1e-10); on-policy
    rows are never kept; past the byte cap nothing more is kept and the loss is unchanged."""
    import distillability.kd_loss as K
    import distillability.recipes.distill as D
    from distillability.config import load_config

    tok_c, tok_b = train_tokenizer(CORPUS, 0, "char"), train_tokenizer(CORPUS, 300, "bpe")
    teacher, student = _model(tok_c, 1).double(), _model(tok_b, 2).double().train()
    cfg = load_config(D.DistillConfig, None, {"teacher": "t", "student": "s", "method": "kd", "cross_tokenizer": "char",
                                              "loss": "fkl", "runtime": {"bf16": False}})
    texts = [("Q: 3+4=?\nA:", " 3+4=7. #### 7"), ("Q: 9-2+5=?\nA:", " 9-2=7, 7+5=12. #### 12"),
             ("Q: 8-1=?\nA:", " 7. #### 7")]
    batches = [[0, 1, 0], [1, 2, 2], [2, 0, 1]]
    def run(loss_fn, on_policy=False):
        out = []
        for b in batches:
            student.zero_grad()
            loss = loss_fn([texts[i][0] for i in b], [texts[i][1] for i in b], [True] * 3, on_policy)
            loss.backward()
            out.append((loss.item(), [p.grad.clone() for p in student.parameters()]))
        return out
    cached = K.token_loss(cfg, teacher, tok_c, student, tok_b, "fkl")
    got = run(cached)
    assert cached.teacher_rows == 3 and len(cached.targets) == 3  # (9 rows asked for, 3 texts)
    monkeypatch.setattr(K.CrossTokenizerLoss, "_cached_teacher_char",
                        lambda self, pairs, keys, t_parts, dev: self._teacher_char(pairs, t_parts, dev))
    plain = K.token_loss(cfg, teacher, tok_c, student, tok_b, "fkl")
    ref = run(plain)
    assert plain.teacher_rows == 9
    for (l1, g1), (l2, g2) in zip(got, ref):
        assert l1 > 0 and abs(l1 - l2) < 1e-10
        assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(g1, g2))
    monkeypatch.undo()
    on = K.token_loss(cfg, teacher, tok_c, student, tok_b, "fkl")
    run(on, on_policy=True)
    assert on.teacher_rows == 9 and not on.targets
    monkeypatch.setattr(K, "TEACHER_CACHE_BYTES", 0)
    capped = K.token_loss(cfg, teacher, tok_c, student, tok_b, "fkl")
    assert [x[0] for x in run(capped)] == pytest.approx([x[0] for x in ref], abs=1e-10)
    assert not capped.targets and capped.teacher_rows == 7  # (only a batch's own repeats are shared)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_short_sequence_cpu_attention_matches_sdpa(arch):
    """The attention registered for short bf16 CPU sequences (attention.py) gives the logits and gradients
    of transformers' sdpa path under bf16 autocast (right padding, GQA, Gemma-3 local layers), and float32
    runs take the sdpa path unchanged (bit-equal)."""
    from distillability.attention import NAME

    train, _ = world_splits(40, 4, 0)
    tok = train_tokenizer([e.prompt + e.solutions["worked"] for e in train], 0 if arch == "llama" else 300,
                          "char" if arch == "llama" else "bpe")
    model = build_tiny_model(TinyModelSpec(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                                           architecture=arch, num_kv_heads=2, sliding_window=8), tok, seed=3)
    assert model.config._attn_implementation == NAME
    ids, attn, _ = encode_sft_batch(tok, [e.prompt for e in train[:6]], [e.solutions["worked"] for e in train[:6]])
    assert (attn == 0).any()

    def run(impl: str, bf16: bool):
        model.set_attn_implementation(impl)
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=ids, attention_mask=attn).logits.float()
        (logits * attn.unsqueeze(-1)).square().mean().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return logits * attn.unsqueeze(-1), grads

    for bf16 in (True, False):
        ours, g_ours = run(NAME, bf16)
        ref, g_ref = run("sdpa", bf16)
        assert torch.isfinite(ours).all() and torch.isfinite(g_ours).all()
        if bf16:
            assert (ours - ref).abs().max() <= 0.02 * ref.abs().max()
            assert (g_ours - g_ref).norm() <= 0.05 * g_ref.norm()
        else:
            assert torch.equal(ours, ref) and torch.equal(g_ours, g_ref)
    model.set_attn_implementation(NAME)


@pytest.mark.parametrize("arch,lora", [("llama", False), ("llama", True), ("gemma3", False)])
def test_shared_prompt_logprobs_are_the_full_forwards(arch, lora):
    """scoring.shared_prompt_token_logprobs (each distinct prompt run once, left-padded, its keys/values
    repeated to its rows) gives token_logprobs' values at the response positions, 0 elsewhere, and the same
    parameter gradients, in float32 to 1e-5: prompts of different lengths, responses of different lengths
    (some ended by EOS), rows of one prompt not adjacent, a LoRA policy, Gemma-3's local layers. Under bf16
    autocast it stays within bf16 rounding. A sequence past a sliding window falls back (None)."""
    from distillability.scoring import shared_prompt_token_logprobs, token_logprobs
    from distillability.training import apply_lora, encode_generations

    train, tok, model = _tiny_arch_model(arch, sliding_window=512)
    if lora:
        model = apply_lora(model, 4, 8)
    prompts = [e.prompt for e in train[:5]]
    assert len({len(p) for p in prompts}) > 1
    gens = generate(model, tok, prompts, 16, 1.0, num_return_sequences=3, seed=3)
    gens = gens[1::2] + gens[::2]  # rows of one prompt apart
    assert len({len(g.token_ids) for g in gens}) > 1 and any(g.finished for g in gens)
    prompt_ids = [tok(p)["input_ids"] for p in prompts]
    ids, attn, mask = encode_generations(tok, prompt_ids, gens)
    plens, pidx = [len(prompt_ids[g.prompt_index]) for g in gens], [g.prompt_index for g in gens]
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(0))
    params = [p for p in model.parameters() if p.requires_grad]

    def run(shared: bool, bf16: bool = False):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            lp = (shared_prompt_token_logprobs(model, ids, attn, plens, pidx, mask) if shared
                  else token_logprobs(model, ids, attn, mask))
        (lp * weights).sum().backward()
        return lp.detach().float(), torch.cat([p.grad.flatten() for p in params])

    ours, g_ours = run(True)
    ref, g_ref = run(False)
    assert (ours[~mask] == 0).all() and (ours[mask] < 0).all()
    assert (ours - ref).abs().max() < 1e-5
    assert (g_ours - g_ref).norm() <= 1e-5 * g_ref.norm()
    ours16, _ = run(True, True)
    ref16, _ = run(False, True)
    assert (ours16 - ref16).abs().max() < 0.1 and (ours16 - ref).abs().mean() < 0.02
    if arch == "gemma3":
        model.config.sliding_window = 8
        assert shared_prompt_token_logprobs(model, ids, attn, plens, pidx, mask) is None
