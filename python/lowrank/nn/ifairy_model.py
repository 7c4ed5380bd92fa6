"""The iFairy (Fairy±i) language model on ``IFairyLinear``: blocks, a KV cache, ``IFairyForCausalLM`` and generation.

Layout and semantics are those of the official ``ComplexNetLM`` (PKULab1806/Fairy-plus-minus-i,
``model/modeling_Fairy_plus_minus_i.py``); activations stay complex as two real tensors ``(x_real, x_imag)`` of
shape ``(batch, seq, hidden)``:

- embeddings: two real ``nn.Embedding(vocab, hidden)`` (real and imaginary part), not quantized;
- ``ComplexRMSNorm``: one shared ``rsqrt(mean(x_re² + x_im²) + eps)``, then separate real weights per part;
- attention: complex q/k/v/o, complex RoPE (complex dim d of the token at position p times
  ``e^{i·p·θ^(−d/D)}``, D the complex head dim), scores ``Re(q·conj(k)) = q_re·k_re + q_im·k_im`` (one real
  attention on ``[re, im]`` of width ``2·D``), an ``attn_layernorm`` before ``o_proj``;
- MLP: ``complex_relu2(gate)`` (zero where both parts are negative, then square each part),
  ``h = conj(g) ⊙ up``, an ``ffn_layernorm``, ``down_proj``;
- head: ``final_norm``, then a real ``lm_head`` ``Linear(2·hidden, vocab)`` on ``cat([re, im])``, not quantized.

The softmax scale defaults to ``1/√(2·D)``: the released checkpoints were trained and evaluated with
flash-attention (``train.py`` and ``eval/*.py`` set ``attn_implementation="flash_attention_2"``), whose
default scale is one over the root of the width it sees, ``2·D``. The official eager path (and ifairy.cpp)
use ``1/√D``; set ``IFairyConfig.attention_scale`` to choose.

Decoding keeps the rotated keys and the values, as ``[re, im]``, in an ``IFairyKVCache`` preallocated to its
maximum length; a forward with a cache places its tokens after the cached ones (positions and causal mask
shifted), so prefill + one-token steps compute what a full recomputation computes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .ifairy import IFairyLinear

__all__ = ["IFairyConfig", "ComplexRMSNorm", "IFairyAttention", "IFairyMLP", "IFairyBlock", "IFairyKVCache",
           "IFairyForCausalLM"]

Pair = tuple[torch.Tensor, torch.Tensor]


@dataclass
class IFairyConfig:
    """Defaults: the 1.3B model (``IFairyConfig.ifairy_700m()`` gives the 700M one, the official default)."""
    hidden_size: int = 2048
    intermediate_size: int = 5460
    num_heads: int = 32
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e4
    act_quant: bool = True
    vocab_size: int = 32000
    num_hidden_layers: int = 24
    num_key_value_heads: int | None = None  # None: num_heads (both released models)
    max_position_embeddings: int = 2048
    attention_scale: float | None = None  # None: 1/√(2·head_dim), as trained (module docstring)
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_heads
        if self.hidden_size % self.num_heads:
            raise ValueError(f"IFairyConfig: hidden_size {self.hidden_size} is not a multiple of num_heads "
                             f"{self.num_heads}")
        if self.num_heads % self.num_key_value_heads:
            raise ValueError(f"IFairyConfig: num_heads {self.num_heads} is not a multiple of num_key_value_heads "
                             f"{self.num_key_value_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def softmax_scale(self) -> float:
        return self.attention_scale if self.attention_scale is not None else (2 * self.head_dim) ** -0.5

    @classmethod
    def ifairy_700m(cls, **overrides) -> "IFairyConfig":
        return cls(**{"hidden_size": 1536, "intermediate_size": 4096, "num_heads": 16, **overrides})

    @classmethod
    def ifairy_1p3b(cls, **overrides) -> "IFairyConfig":
        return cls(**overrides)

    @classmethod
    def from_official(cls, config: dict, **overrides) -> "IFairyConfig":
        """From an official ``config.json`` (``ComplexNetConfig``; its defaults fill missing keys)."""
        if config.get("hidden_act", "relu2") != "relu2" or config.get("attention_bias") or config.get("rope_scaling"):
            raise ValueError("IFairyConfig.from_official: only hidden_act='relu2', no attention bias and no rope "
                             f"scaling are supported, got {config.get('hidden_act')!r}, "
                             f"{config.get('attention_bias')!r}, {config.get('rope_scaling')!r}")
        if config.get("tie_word_embeddings"):
            raise ValueError("IFairyConfig.from_official: tie_word_embeddings is not supported (the iFairy head is "
                             "a separate Linear(2·hidden, vocab))")
        keys = {"vocab_size": 32000, "hidden_size": 1536, "intermediate_size": 4096, "num_hidden_layers": 24,
                "num_attention_heads": 16, "num_key_value_heads": None, "max_position_embeddings": 2048,
                "rms_norm_eps": 1e-5, "rope_theta": 1e4, "bos_token_id": 1, "eos_token_id": 2}
        got = {k: config.get(k, default) for k, default in keys.items()}
        got["num_heads"] = got.pop("num_attention_heads")
        return cls(**{**got, **overrides})


class ComplexRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight_real = nn.Parameter(torch.ones(dim))
        self.weight_imag = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x_real: torch.Tensor, x_imag: torch.Tensor) -> Pair:
        dtype = torch.promote_types(x_real.dtype, torch.float32)  # at least float32
        xr, xi = x_real.to(dtype), x_imag.to(dtype)
        inv_rms = torch.rsqrt((xr * xr + xi * xi).mean(-1, keepdim=True) + self.eps)
        return ((self.weight_real * xr * inv_rms).to(x_real.dtype),
                (self.weight_imag * xi * inv_rms).to(x_imag.dtype))


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> Pair:
    """``cos, sin`` of ``p·θ^(−d/D)``, ``(seq, D)``, computed in at least float32 and cast to ``dtype``."""
    work = torch.promote_types(dtype, torch.float32)
    inv_freq = theta ** (-torch.arange(head_dim, device=positions.device, dtype=work) / head_dim)
    angle = positions.to(work)[:, None] * inv_freq
    return angle.cos().to(dtype), angle.sin().to(dtype)


class IFairyKVCache:
    """Rotated keys and values as ``[re, im]`` ``(batch, kv_heads, max_len, 2·head_dim)`` per layer, filled in order.

    ``length`` is the number of cached positions, i.e. the position of the next token. A model forward appends
    its tokens to every layer and then advances ``length`` (``IFairyForCausalLM.forward`` does both).
    """

    def __init__(self, config: IFairyConfig, batch: int, max_len: int, dtype=torch.float32, device=None):
        shape = (batch, config.num_key_value_heads, max_len, 2 * config.head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.batch, self.max_len, self.length = batch, max_len, 0

    def append(self, layer: int, k_cat: torch.Tensor, v_cat: torch.Tensor) -> Pair:
        """Write ``(batch, kv_heads, T, 2·D)`` after the cached positions; return all keys and values so far."""
        end = self.length + k_cat.shape[2]
        if end > self.max_len:
            raise ValueError(f"IFairyKVCache: {end} positions do not fit in max_len {self.max_len}")
        self.keys[layer][:, :, self.length:end] = k_cat
        self.values[layer][:, :, self.length:end] = v_cat
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class IFairyAttention(nn.Module):
    def __init__(self, cfg: IFairyConfig):
        super().__init__()
        h, q = cfg.hidden_size, cfg.act_quant
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_key_value_heads, cfg.head_dim
        self.theta, self.scale = cfg.rope_theta, cfg.softmax_scale
        kv = self.num_kv_heads * self.head_dim
        self.q_proj, self.k_proj, self.v_proj = IFairyLinear(h, h, q), IFairyLinear(h, kv, q), IFairyLinear(h, kv, q)
        self.o_proj = IFairyLinear(h, h, q)
        self.attn_layernorm = ComplexRMSNorm(h, cfg.rms_norm_eps)

    def project_qkv(self, x_real: torch.Tensor, x_imag: torch.Tensor) -> tuple[Pair, Pair, Pair]:
        # one call for the three (one dispatch; on the CPU one activation quantization)
        q, k, v = IFairyLinear.forward_many([self.q_proj, self.k_proj, self.v_proj], x_real, x_imag)
        return q, k, v

    def forward(self, x_real: torch.Tensor, x_imag: torch.Tensor, rope: Pair | None = None,
                cache: IFairyKVCache | None = None, layer: int = 0) -> Pair:
        """``rope`` = ``(cos, sin)`` ``(seq, D)`` of the tokens' positions (default: ``cache.length`` onwards)."""
        batch, seq, hidden = x_real.shape
        offset = cache.length if cache is not None else 0
        if rope is None:
            positions = torch.arange(offset, offset + seq, device=x_real.device)
            rope = rope_cos_sin(positions, self.head_dim, self.theta, x_real.dtype)
        cos, sin = rope

        def heads(pair: Pair, n: int) -> Pair:
            return tuple(t.view(batch, seq, n, self.head_dim).transpose(1, 2) for t in pair)

        def rotate(pair: Pair) -> torch.Tensor:
            re, im = pair
            return torch.cat([re * cos - im * sin, re * sin + im * cos], -1)

        q, k, v = self.project_qkv(x_real, x_imag)
        q_cat = rotate(heads(q, self.num_heads))
        k_cat, v_cat = rotate(heads(k, self.num_kv_heads)), torch.cat(heads(v, self.num_kv_heads), -1)
        if cache is not None:
            k_cat, v_cat = cache.append(layer, k_cat, v_cat)
        if self.num_kv_heads != self.num_heads:
            groups = self.num_heads // self.num_kv_heads
            k_cat, v_cat = k_cat.repeat_interleave(groups, 1), v_cat.repeat_interleave(groups, 1)
        # Re(q·conj(k)) = q_re·k_re + q_im·k_im: one real attention over the concatenated parts. Query i sits at
        # position offset + i and sees keys 0 .. offset + i.
        if seq == 1:
            mask, causal = None, False
        elif offset == 0:
            mask, causal = None, True
        else:
            keys = torch.arange(offset + seq, device=x_real.device)
            mask, causal = keys[None, :] <= (offset + torch.arange(seq, device=x_real.device))[:, None], False
        out = F.scaled_dot_product_attention(q_cat, k_cat, v_cat, attn_mask=mask, is_causal=causal, scale=self.scale)
        out_real, out_imag = (t.transpose(1, 2).reshape(batch, seq, hidden) for t in out.split(self.head_dim, -1))
        return self.o_proj(*self.attn_layernorm(out_real, out_imag))


class IFairyMLP(nn.Module):
    def __init__(self, cfg: IFairyConfig):
        super().__init__()
        h, f, q = cfg.hidden_size, cfg.intermediate_size, cfg.act_quant
        self.gate_proj, self.up_proj = IFairyLinear(h, f, q), IFairyLinear(h, f, q)
        self.down_proj = IFairyLinear(f, h, q)
        self.ffn_layernorm = ComplexRMSNorm(f, cfg.rms_norm_eps)

    @staticmethod
    def complex_relu2(x_real: torch.Tensor, x_imag: torch.Tensor) -> Pair:
        keep = ~((x_real < 0) & (x_imag < 0))
        return (x_real * keep) ** 2, (x_imag * keep) ** 2

    def project_gate_up(self, x_real: torch.Tensor, x_imag: torch.Tensor) -> tuple[Pair, Pair]:
        # one call for the two (one dispatch; on the CPU one activation quantization)
        gate, up = IFairyLinear.forward_many([self.gate_proj, self.up_proj], x_real, x_imag)
        return gate, up

    def forward(self, x_real: torch.Tensor, x_imag: torch.Tensor) -> Pair:
        gate, (u_real, u_imag) = self.project_gate_up(x_real, x_imag)
        g_real, g_imag = self.complex_relu2(*gate)
        h_real = g_real * u_real + g_imag * u_imag  # conj(g) ⊙ up
        h_imag = g_real * u_imag - g_imag * u_real
        return self.down_proj(*self.ffn_layernorm(h_real, h_imag))


class IFairyBlock(nn.Module):
    """``x += attn(norm(x)); x += mlp(norm(x))`` on complex ``(batch, seq, hidden)`` activations (causal).

    The official names of the two norms are ``pre_layernorm`` and ``post_layernorm`` (the checkpoint loader maps
    them)."""

    def __init__(self, cfg: IFairyConfig | None = None):
        super().__init__()
        cfg = cfg or IFairyConfig()
        self.config = cfg
        self.input_layernorm = ComplexRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = IFairyAttention(cfg)
        self.post_attention_layernorm = ComplexRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = IFairyMLP(cfg)

    def forward(self, x_real: torch.Tensor, x_imag: torch.Tensor, rope: Pair | None = None,
                cache: IFairyKVCache | None = None, layer: int = 0) -> Pair:
        a_real, a_imag = self.self_attn(*self.input_layernorm(x_real, x_imag), rope, cache, layer)
        x_real, x_imag = x_real + a_real, x_imag + a_imag
        m_real, m_imag = self.mlp(*self.post_attention_layernorm(x_real, x_imag))
        return x_real + m_real, x_imag + m_imag


class IFairyForCausalLM(nn.Module):
    """The whole iFairy model: ``forward(input_ids, cache=None) -> logits (batch, seq, vocab)`` and ``generate``.

    Module names follow the official checkpoint (``token_embeddings_real/imag``, ``layer.{i}``, ``final_norm``,
    ``lm_head``); see ``lowrank.formats.load_official_ifairy`` to load one. A fresh model holds random weights
    (embeddings and head N(0, 0.02²), the official init; random codes in the linears), enough for speed runs.
    Inference only, batch of equal-length sequences (no padding mask).
    """

    def __init__(self, config: IFairyConfig | None = None):
        super().__init__()
        cfg = config or IFairyConfig()
        self.config = cfg
        self.token_embeddings_real = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.token_embeddings_imag = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layer = nn.ModuleList(IFairyBlock(cfg) for _ in range(cfg.num_hidden_layers))
        self.final_norm = ComplexRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(2 * cfg.hidden_size, cfg.vocab_size, bias=False)
        for module in (self.token_embeddings_real, self.token_embeddings_imag, self.lm_head):
            if not module.weight.is_meta:
                nn.init.normal_(module.weight, std=0.02)

    def new_cache(self, batch: int, max_len: int | None = None) -> IFairyKVCache:
        weight = self.token_embeddings_real.weight  # the activations' dtype (the head may be held in another)
        return IFairyKVCache(self.config, batch, max_len or self.config.max_position_embeddings, weight.dtype,
                             weight.device)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``lm_head`` on ``cat([re, im])`` ``(..., 2·hidden)``, returned in ``x``'s dtype.

        The head may be held in bfloat16 (``model.lm_head.bfloat16()``: half the bytes of the largest tensor read
        per token; its dot products then round to bfloat16 too). A single row then runs as ``torch.mv``, which
        on the CPU reads a bfloat16 matrix, half the bytes ``F.linear`` reads for the float32 one.
        """
        weight = self.lm_head.weight
        if weight.dtype == x.dtype:
            return self.lm_head(x)
        rows = x.reshape(-1, x.shape[-1]).to(weight.dtype)
        out = torch.mv(weight, rows[0])[None] if rows.shape[0] == 1 else F.linear(rows, weight)
        return out.to(x.dtype).view(*x.shape[:-1], -1)

    def forward(self, input_ids: torch.Tensor, cache: IFairyKVCache | None = None) -> torch.Tensor:
        """Logits of every position; with ``cache``, the tokens follow the cached ones and are appended to it."""
        if input_ids.dim() != 2:
            raise ValueError(f"IFairyForCausalLM: input_ids must be (batch, seq), got {tuple(input_ids.shape)}")
        batch, seq = input_ids.shape
        offset = cache.length if cache is not None else 0
        if cache is not None and cache.batch != batch:
            raise ValueError(f"IFairyForCausalLM: cache holds batch {cache.batch}, input_ids batch {batch}")
        x_real, x_imag = self.token_embeddings_real(input_ids), self.token_embeddings_imag(input_ids)
        positions = torch.arange(offset, offset + seq, device=input_ids.device)
        rope = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x_real.dtype)
        for i, block in enumerate(self.layer):
            x_real, x_imag = block(x_real, x_imag, rope, cache, i)
        if cache is not None:
            cache.length += seq
        x_real, x_imag = self.final_norm(x_real, x_imag)
        return self.logits(torch.cat([x_real, x_imag], -1))

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, generator: torch.Generator | None = None,
                 eos_token_id: int | None = None) -> torch.Tensor:
        """``(batch, prompt + new)`` token ids: prefill once, then one cached step per token.

        Greedy (argmax) by default; ``do_sample=True`` draws from ``softmax(logits / temperature)``, restricted
        to the ``top_k`` largest when given, with ``generator`` (seed it for reproducible samples). A sequence
        that produced ``eos_token_id`` keeps producing it; generation stops when all have.
        """
        if max_new_tokens < 0:
            raise ValueError(f"IFairyForCausalLM.generate: max_new_tokens must be >= 0, got {max_new_tokens}")
        out = input_ids
        if max_new_tokens == 0:
            return out
        cache = self.new_cache(input_ids.shape[0], input_ids.shape[1] + max_new_tokens)
        logits = self(input_ids, cache)[:, -1]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            token = next_token(logits, do_sample, temperature, top_k, generator)
            if eos_token_id is not None:
                token = token.masked_fill(done, eos_token_id)
                done |= token == eos_token_id
            out = torch.cat([out, token[:, None]], 1)
            if step + 1 == max_new_tokens or (eos_token_id is not None and bool(done.all())):
                break
            logits = self(token[:, None], cache)[:, -1]
        return out


def next_token(logits: torch.Tensor, do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of ``logits`` ``(batch, vocab)``: argmax, or a sample (see ``generate``)."""
    if not do_sample:
        return logits.argmax(-1)
    if temperature <= 0:
        raise ValueError(f"next_token: temperature must be > 0 when sampling, got {temperature}")
    scores = logits.float() / temperature
    if top_k is not None:
        kth = scores.topk(min(top_k, scores.shape[-1]), -1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    return torch.multinomial(scores.softmax(-1), 1, generator=generator)[:, 0]
