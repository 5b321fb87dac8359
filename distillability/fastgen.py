"""A lean KV-cached decoder for Llama-family models (llama, qwen2, mistral) and Gemma-3 text models
(gemma3_text: q/k norms, sandwich norms, local sliding-window and global layers): the same modules and
weights as the Hugging Face model, without `generate`'s per-token machinery (cache objects, mask
builders, logits-processor lists, stopping criteria), which dominates the cost of decoding small
models. A preallocated cache, one fused attention call per layer and step, and the last position's
logits only. `sampling.generate` uses it when `supports(model)`, else Hugging Face `generate`; tests
check that both give the same tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SUPPORTED = ("llama", "qwen2", "mistral", "gemma3_text")


def _plain_lora(module) -> bool:
    """A peft LoRA linear layer whose forward is base + B A x scale (no DoRA, no LoRA bias)."""
    return (hasattr(module, "lora_A") and hasattr(module, "get_delta_weight")
            and not any(getattr(module, "use_dora", {}).values()) and not any(getattr(module, "lora_bias", {}).values()))


def lora_base(model):
    """The base model of a peft LoRA model whose every adapted layer is a plain LoRA linear layer (the decoder
    then reads each layer's effective weight, base + delta, instead of a merged copy of the model); else None."""
    if not (hasattr(model, "peft_config") and hasattr(model, "get_base_model")):
        return None
    base = model.get_base_model()
    # every module peft put into the model must be a plain LoRA linear layer (modules_to_save copies, trainable
    # tokens, LoRA embeddings, DoRA... fall back to the merged copy)
    adapted = [m for m in base.modules() if type(m).__module__.startswith("peft.")]
    if not adapted or not all(_plain_lora(m) and isinstance(getattr(m, "base_layer", None), torch.nn.Linear)
                              for m in adapted):
        return None
    return base


@torch.no_grad()
def effective_weight(linear) -> tuple:
    """(weight, bias) of a linear layer as its forward applies it: a peft LoRA layer's base weight plus its
    active adapters' deltas (unless merged into it already or the adapters are disabled)."""
    if not hasattr(linear, "lora_A"):
        return linear.weight, linear.bias
    weight = linear.base_layer.weight
    if not linear.merged and not getattr(linear, "disable_adapters", False):
        for name in linear.active_adapters:
            if name in linear.lora_A:
                weight = weight + linear.get_delta_weight(name).to(weight.dtype)
    return weight, linear.base_layer.bias


def supports(model, lora: bool = False) -> bool:
    """lora=True: `model` may be the base model of a peft LoRA model (`lora_base`)."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in SUPPORTED or (hasattr(model, "peft_config") and not lora):
        return False
    if cfg.model_type == "gemma3_text" and (getattr(cfg, "attn_logit_softcapping", None)
                                            or getattr(cfg, "use_bidirectional_attention", False)):
        return False
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return False
    if not all(hasattr(layer.mlp, "gate_proj") and hasattr(layer, "post_attention_layernorm") for layer in inner.layers):
        return False
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) and cfg.model_type == "mistral":
        return False  # sliding-window attention: leave it to transformers
    return True


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Decoder:
    BF16_MIN_MACS = 1 << 20  # per-call multiply-adds from which a bf16 matmul beats float32 on CPU

    def __init__(self, model, bf16: bool = False, rows: int = 1) -> None:
        """bf16: linear layers whose per-step matmul (`rows` sequences) is large enough run in bfloat16, their
        weights cast once here (autocast would cast them at every call); small ones stay float32, where the
        casts cost more than AMX saves (bench/README.md, "Measurements behind code choices"). Norms,
        rotary embeddings, attention and the residual stream run in float32."""
        from transformers.activations import ACT2FN

        self.model = model
        self.inner = model.model
        cfg = model.config
        self.gemma = cfg.model_type == "gemma3_text"
        self.act = ACT2FN[cfg.hidden_activation if self.gemma else cfg.hidden_act]
        # Gemma-3: each layer is local (sliding window) or global, with its own rotary base
        self.layer_types = list(getattr(cfg, "layer_types", None) or []) if self.gemma else []
        self.window = getattr(cfg, "sliding_window", None) if self.gemma else None
        self.softcap = getattr(cfg, "final_logit_softcapping", None)

        def prep(weight: torch.Tensor, bias: torch.Tensor | None = None) -> tuple:
            big = bf16 and rows * weight.shape[0] * weight.shape[1] >= self.BF16_MIN_MACS
            dtype = torch.bfloat16 if big else torch.float32
            return weight.detach().to(dtype), None if bias is None else bias.detach().to(dtype)

        def cat(linears: list) -> tuple:  # effective weights (LoRA deltas added) of layers fed the same input
            wbs = [effective_weight(m) for m in linears]
            bias = None
            if any(b is not None for _, b in wbs):
                bias = torch.cat([b if b is not None else torch.zeros(w.shape[0]) for w, b in wbs])
            return prep(torch.cat([w for w, _ in wbs]) if len(wbs) > 1 else wbs[0][0], bias)

        self.head = cat([model.lm_head])
        self.fused = []  # per layer: q|k|v and gate|up projections as one matrix each (fewer, larger matmuls)
        for layer in self.inner.layers:
            att, mlp = layer.self_attn, layer.mlp
            fused = {"qkv": cat([att.q_proj, att.k_proj, att.v_proj]), "o": cat([att.o_proj]),
                     "gu": cat([mlp.gate_proj, mlp.up_proj]), "down": cat([mlp.down_proj])}
            if fused["gu"][1] is not None or fused["down"][1] is not None:
                raise ValueError("fastgen: MLP biases are not supported")
            self.fused.append(fused)
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.scale = (cfg.query_pre_attn_scalar if self.gemma else self.head_dim) ** -0.5

    def _rope_tables(self, total: int, device) -> dict:
        """(cos, sin) [total, head_dim] per layer type for positions 0..total-1, computed once per decode."""
        pos = torch.arange(total, device=device)[None]
        x = torch.zeros(1, dtype=torch.float32, device=device)
        out = {}
        for kind in sorted(set(self.layer_types)) or [None]:
            cos, sin = self.inner.rotary_emb(x, pos, kind) if kind else self.inner.rotary_emb(x, pos)
            out[kind] = (cos[0].float(), sin[0].float())
        return out

    @staticmethod
    def _rope_at(tables: dict, pos: torch.Tensor) -> dict:
        """(cos, sin) at positions pos [B, t], shaped [B, 1, t, head_dim] for [B, heads, t, d]."""
        return {k: (c[pos].unsqueeze(1), s[pos].unsqueeze(1)) for k, (c, s) in tables.items()}

    @staticmethod
    def _lin(x: torch.Tensor, wb: tuple) -> torch.Tensor:
        w, b = wb
        return F.linear(x.to(w.dtype), w, b)

    def _layers(self, x: torch.Tensor, rope: dict, k_cache: list, v_cache: list,
                start: int, attn_mask: torch.Tensor) -> torch.Tensor:
        """Run all layers on x [B, t, H] for cache slots start..start+t; attn_mask [B, 1, t, start+t] (True = attend)."""
        B, t, _ = x.shape
        end = start + t
        local_mask = None
        if self.window and "sliding_attention" in self.layer_types:
            # local layers see the last `window` slots (a row's slots are consecutive positions)
            q_slot = torch.arange(start, end, device=x.device)[:, None]
            k_slot = torch.arange(end, device=x.device)[None, :]
            local_mask = attn_mask & (k_slot > q_slot - self.window)
        for i, layer in enumerate(self.inner.layers):
            w = self.fused[i]
            kind = self.layer_types[i] if self.layer_types else None
            cos, sin = rope[kind]
            h = layer.input_layernorm(x)
            qkv = self._lin(h, w["qkv"])
            nq, nk = self.n_heads * self.head_dim, self.n_kv * self.head_dim
            v = qkv[..., nq + nk:].reshape(B, t, self.n_kv, self.head_dim).transpose(1, 2)
            if self.gemma:
                q = layer.self_attn.q_norm(qkv[..., :nq].reshape(B, t, self.n_heads, self.head_dim).transpose(1, 2))
                k = layer.self_attn.k_norm(qkv[..., nq:nq + nk].reshape(B, t, self.n_kv, self.head_dim).transpose(1, 2))
                q = q * cos + _rotate_half(q) * sin
                k = k * cos + _rotate_half(k) * sin
            else:  # rotary embedding of q and k in one pass
                qk = qkv[..., :nq + nk].reshape(B, t, self.n_heads + self.n_kv, self.head_dim).transpose(1, 2)
                qk = qk * cos + _rotate_half(qk) * sin
                q, k = qk[:, :self.n_heads], qk[:, self.n_heads:]
            k_cache[i][:, :, start:end] = k
            v_cache[i][:, :, start:end] = v
            keys, values = k_cache[i][:, :, :end], v_cache[i][:, :, :end]
            if self.n_kv != self.n_heads:
                rep = self.n_heads // self.n_kv
                keys, values = keys.repeat_interleave(rep, 1), values.repeat_interleave(rep, 1)
            mask = local_mask if kind == "sliding_attention" and local_mask is not None else attn_mask
            # attention in float32 against the float32 cache (torch's CPU bf16 attention kernel is ~6x slower
            # than its float32 one at decoding shapes), and the cache is never cast
            q = q.to(keys.dtype)
            if t == 1:  # one new token: the plain math beats torch's fused kernel at these sizes
                w_att = torch.matmul(q, keys.transpose(-1, -2)) * self.scale
                if mask is not None:
                    w_att = w_att.masked_fill(~mask, float("-inf"))
                o = torch.matmul(torch.softmax(w_att, -1), values)
            else:
                o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale)
            o = self._lin(o.transpose(1, 2).reshape(B, t, -1), w["o"])
            if self.gemma:  # sandwich norms around attention and MLP
                x = x + layer.post_attention_layernorm(o)
                gate, up = self._lin(layer.pre_feedforward_layernorm(x), w["gu"]).chunk(2, dim=-1)
                x = x + layer.post_feedforward_layernorm(self._lin(self.act(gate) * up, w["down"]))
            else:
                x = x + o
                gate, up = self._lin(layer.post_attention_layernorm(x), w["gu"]).chunk(2, dim=-1)
                x = x + self._lin(self.act(gate) * up, w["down"])
        return x

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        # a 2-D [B, H] input: a 3-D [B, 1, H] one made torch's bf16 CPU matmul expand a 262k head per row
        logits = self._lin(self.inner.norm(x[:, -1]), self.head).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    @torch.no_grad()
    def decode(self, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, eos_id: int, pad_id: int,
               pick) -> torch.Tensor:
        """New tokens [B, n <= max_new_tokens] after left-padded prompts ids/mask [B, T]; `pick(logits)` -> ids.
        Rows that emitted EOS continue with pad; decoding stops when every row has. Precision is this decoder's
        own (see __init__): any surrounding autocast is switched off."""
        with torch.autocast(ids.device.type, enabled=False):
            return self._decode(ids, mask, max_new_tokens, eos_id, pad_id, pick)

    def _decode(self, ids, mask, max_new_tokens, eos_id, pad_id, pick) -> torch.Tensor:
        B, T = ids.shape
        dev = ids.device
        emb = self.inner.embed_tokens
        dtype = torch.float32
        total = T + max_new_tokens
        k_cache = [torch.zeros(B, self.n_kv, total, self.head_dim, device=dev, dtype=dtype) for _ in self.inner.layers]
        v_cache = [torch.zeros_like(k) for k in k_cache]
        valid = torch.zeros(B, total, dtype=torch.bool, device=dev)
        valid[:, :T] = mask.bool()
        no_pad = bool(mask.bool().all()) and not self.window
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        # prefill: causal within the prompt, padding never attended
        causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
        attn = causal.unsqueeze(0) & valid[:, None, :T]
        attn = attn | torch.eye(T, dtype=torch.bool, device=dev).unsqueeze(0)  # padded rows attend to themselves
        rope = self._rope_tables(total, dev)
        x = emb(ids).float()
        x = self._layers(x, self._rope_at(rope, pos), k_cache, v_cache, 0, attn.unsqueeze(1))
        logits = self._logits(x)
        next_pos = pos[:, -1] + 1
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        out = []
        for step in range(max_new_tokens):
            tok = pick(logits)
            tok = torch.where(done, torch.full_like(tok, pad_id), tok)
            out.append(tok)
            done = done | (tok == eos_id)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            slot = T + step
            valid[:, slot] = True
            x = emb(tok[:, None]).float()
            step_mask = None if no_pad else valid[:, None, None, :slot + 1]  # (no padding: every slot is attended)
            x = self._layers(x, self._rope_at(rope, next_pos[:, None]), k_cache, v_cache, slot, step_mask)
            logits = self._logits(x)
            next_pos = next_pos + 1
        return torch.stack(out, 1) if out else torch.zeros(B, 0, dtype=torch.long, device=dev)
