"""The iFairy block written in torch's complex128 arithmetic from the model's description (act_quant=False):
the ground truth that tests/test_ifairy.py (one block) and tests/test_ifairy_model.py (the whole model) share."""
from __future__ import annotations

import math

import torch


def lin(layer, v: torch.Tensor) -> torch.Tensor:
    wr, wi = layer.dequantize()
    return v.conj() @ torch.complex(wr.double(), wi.double()).T  # W·conj(x)


def norm(n, v: torch.Tensor) -> torch.Tensor:
    inv = torch.rsqrt((v.abs() ** 2).mean(-1, keepdim=True) + n.eps)
    return torch.complex(n.weight_real.double() * v.real, n.weight_imag.double() * v.imag) * inv


def block_complex128(block, x: torch.Tensor, num_heads: int, num_kv_heads: int, rope_theta: float) -> torch.Tensor:
    """One block on complex ``x`` ``(b, t, hidden)`` at positions 0..t-1, causal; GQA when num_kv_heads < num_heads."""
    att, mlp = block.self_attn, block.mlp
    b, t, hidden = x.shape
    h, kvh = num_heads, num_kv_heads
    d = hidden // h
    inv_freq = rope_theta ** (-torch.arange(d, dtype=torch.float64) / d)
    rot = torch.polar(torch.ones(t, d, dtype=torch.float64), torch.arange(t, dtype=torch.float64)[:, None] * inv_freq)
    hn = norm(block.input_layernorm, x)
    q = lin(att.q_proj, hn).view(b, t, h, d).transpose(1, 2) * rot
    k = (lin(att.k_proj, hn).view(b, t, kvh, d).transpose(1, 2) * rot).repeat_interleave(h // kvh, 1)
    v = lin(att.v_proj, hn).view(b, t, kvh, d).transpose(1, 2).repeat_interleave(h // kvh, 1)
    scores = (q @ k.conj().transpose(-1, -2)).real / math.sqrt(2 * d)  # flash-attention's scale, as trained
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    o = (scores.softmax(-1).to(torch.complex128) @ v).transpose(1, 2).reshape(b, t, hidden)
    x = x + lin(att.o_proj, norm(att.attn_layernorm, o))
    hn = norm(block.post_attention_layernorm, x)
    g = lin(mlp.gate_proj, hn)
    g = torch.where((g.real < 0) & (g.imag < 0), 0, g)
    g = torch.complex(g.real ** 2, g.imag ** 2)
    return x + lin(mlp.down_proj, norm(mlp.ffn_layernorm, g.conj() * lin(mlp.up_proj, hn)))
