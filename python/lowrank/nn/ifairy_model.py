"""An example: one pre-norm transformer block in the iFairy (Fairy±i) layout, built from ``IFairyLinear``.

Activations stay complex as two real tensors ``(x_real, x_imag)`` of shape ``(batch, seq, hidden)``:

- ``ComplexRMSNorm``: one shared ``rsqrt(mean(x_re² + x_im²) + eps)``, then separate real weights per part;
- attention: complex q/k/v/o, complex RoPE (rotate each complex dim by ``pos·θ_d``), scores
  ``Re(q·conj(k)) = q_re·k_re + q_im·k_im`` (one real attention on ``[re, im]`` of width ``2·head_dim``,
  scaled by ``1/√head_dim`` like iFairy's eager path), an ``attn_layernorm`` before ``o_proj``;
- MLP: ``complex_relu2(gate)`` (zero where both parts are negative, then square each part),
  ``h = conj(g) ⊙ up``, an ``ffn_layernorm``, ``down_proj``.

Runs end to end on random weights (``IFairyLinear``'s random init); to run a real checkpoint, build each
linear with ``IFairyLinear.from_float(weight_real, weight_imag)`` and copy the norm weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .ifairy import IFairyLinear

__all__ = ["IFairyConfig", "ComplexRMSNorm", "IFairyAttention", "IFairyMLP", "IFairyBlock"]

Pair = tuple[torch.Tensor, torch.Tensor]


@dataclass
class IFairyConfig:
    """Defaults: the 1.3B model's block (the 700M one is hidden 1536, ffn 4096, 16 heads)."""
    hidden_size: int = 2048
    intermediate_size: int = 5460
    num_heads: int = 32
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e4
    act_quant: bool = True


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


def complex_rope(x_real: torch.Tensor, x_imag: torch.Tensor, positions: torch.Tensor, theta: float) -> Pair:
    """Multiply complex dim d of the token at position p by ``e^{i·p·θ^(−d/D)}``; x ``(batch, heads, seq, D)``."""
    dim, dtype = x_real.shape[-1], torch.promote_types(x_real.dtype, torch.float32)
    inv_freq = theta ** (-torch.arange(dim, device=x_real.device, dtype=dtype) / dim)
    angle = positions.to(dtype)[:, None] * inv_freq  # (seq, D)
    cos, sin = angle.cos().to(x_real.dtype), angle.sin().to(x_real.dtype)
    return x_real * cos - x_imag * sin, x_real * sin + x_imag * cos


class IFairyAttention(nn.Module):
    def __init__(self, cfg: IFairyConfig):
        super().__init__()
        h, q = cfg.hidden_size, cfg.act_quant
        if h % cfg.num_heads:
            raise ValueError(f"hidden_size {h} is not a multiple of num_heads {cfg.num_heads}")
        self.num_heads, self.head_dim, self.theta = cfg.num_heads, h // cfg.num_heads, cfg.rope_theta
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (IFairyLinear(h, h, q) for _ in range(4))
        self.attn_layernorm = ComplexRMSNorm(h, cfg.rms_norm_eps)

    def forward(self, x_real: torch.Tensor, x_imag: torch.Tensor) -> Pair:
        batch, seq, hidden = x_real.shape
        positions = torch.arange(seq, device=x_real.device)

        def heads(pair: Pair) -> Pair:
            return tuple(t.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2) for t in pair)

        q = complex_rope(*heads(self.q_proj(x_real, x_imag)), positions, self.theta)
        k = complex_rope(*heads(self.k_proj(x_real, x_imag)), positions, self.theta)
        v = heads(self.v_proj(x_real, x_imag))
        # Re(q·conj(k)) = q_re·k_re + q_im·k_im: a real attention over the concatenated parts
        out = F.scaled_dot_product_attention(torch.cat(q, -1), torch.cat(k, -1), torch.cat(v, -1),
                                             is_causal=True, scale=self.head_dim ** -0.5)
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

    def forward(self, x_real: torch.Tensor, x_imag: torch.Tensor) -> Pair:
        g_real, g_imag = self.complex_relu2(*self.gate_proj(x_real, x_imag))
        u_real, u_imag = self.up_proj(x_real, x_imag)
        h_real = g_real * u_real + g_imag * u_imag  # conj(g) ⊙ up
        h_imag = g_real * u_imag - g_imag * u_real
        return self.down_proj(*self.ffn_layernorm(h_real, h_imag))


class IFairyBlock(nn.Module):
    """``x += attn(norm(x)); x += mlp(norm(x))`` on complex ``(batch, seq, hidden)`` activations (causal)."""

    def __init__(self, cfg: IFairyConfig | None = None):
        super().__init__()
        cfg = cfg or IFairyConfig()
        self.config = cfg
        self.input_layernorm = ComplexRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = IFairyAttention(cfg)
        self.post_attention_layernorm = ComplexRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = IFairyMLP(cfg)

    def forward(self, x_real: torch.Tensor, x_imag: torch.Tensor) -> Pair:
        a_real, a_imag = self.self_attn(*self.input_layernorm(x_real, x_imag))
        x_real, x_imag = x_real + a_real, x_imag + a_imag
        m_real, m_imag = self.mlp(*self.post_attention_layernorm(x_real, x_imag))
        return x_real + m_real, x_imag + m_imag
