"""Training-memory report for LLaMA 60M-7B under dense, GaLore, Fira, SLTrain, SLTrain+GaLore and Monarch.

    python -m lowrank.memory [--sizes 60m,1b] [--state-bytes 2] [--per-layer] [--tokens 256]

Every model is built on the meta device (no memory, no data) from the GaLore paper's configs (vocabulary
32000, untied lm_head, as in those configs) and converted with the papers' hyperparameters, so parameter
counts are exact. Per method:

- weights: bf16, plus SLTrain's support (int32 indices, 4 B per nonzero; SLTrain's own code keeps int64).
- gradients: bf16, one per trainable weight; ``--per-layer`` keeps only the largest one alive (per-layer
  optimizer steps from gradient hooks, as in the GaLore and SLTrain 7B runs).
- optimizer state: Adam's two moments per element of a plain parameter; for a GaLore-projected (m, n) matrix
  the rank-r moments and the projector, ``2·max(m, n)·r + min(m, n)·r`` (Fira keeps the same, plus one scalar).
  ``--state-bytes``: 2 (bf16, the papers' pure-bf16 recipe; the default), 4 (fp32, what
  ``lowrank.optim.GaLoreAdamW`` keeps) or 1 (8-bit Adam, its block scales ignored).
- activations: what autograd saves for the backward in one forward of ``--tokens`` tokens (one sequence)
  in bf16, measured on the meta device with saved-tensor hooks through the real modules and ops, attention
  counted FlashAttention-style (q, k, v, output and the row log-sum-exp; no T×T matrix).

Which matrices GaLore projects: the attention and MLP linears (the GaLore paper's target modules). In
SLTrain+GaLore those are SLTrain layers, whose factors are no larger than the rank, so GaLore projects the
remaining dense matrices instead: the embedding and the lm_head.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch import nn

from .nn import SLTrainLinear, convert_to_monarch, convert_to_sltrain

# The GaLore paper's LLaMA configs (configs/llama_*.json in its repository); vocab 32000, no tied embeddings.
LLAMA_SIZES = {
    "60m": {"hidden_size": 512, "intermediate_size": 1376, "num_attention_heads": 8, "num_hidden_layers": 8},
    "130m": {"hidden_size": 768, "intermediate_size": 2048, "num_attention_heads": 12, "num_hidden_layers": 12},
    "350m": {"hidden_size": 1024, "intermediate_size": 2736, "num_attention_heads": 16, "num_hidden_layers": 24},
    "1b": {"hidden_size": 2048, "intermediate_size": 5461, "num_attention_heads": 32, "num_hidden_layers": 24},
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_hidden_layers": 32},
}
# SLTrain's rank, density and alpha per size (its README), and GaLore's rank (its paper's pretraining table;
# its C4 scripts use 1024 at 1B).
PAPER_HPARAMS = {
    "60m": {"rank": 128, "density": 0.03, "alpha": 32.0, "galore_rank": 128},
    "130m": {"rank": 256, "density": 0.03, "alpha": 16.0, "galore_rank": 256},
    "350m": {"rank": 256, "density": 0.03, "alpha": 16.0, "galore_rank": 256},
    "1b": {"rank": 512, "density": 0.03, "alpha": 8.0, "galore_rank": 512},
    "7b": {"rank": 1024, "density": 0.05, "alpha": 8.0, "galore_rank": 1024},
}
METHODS = ["dense+AdamW", "GaLore", "Fira", "SLTrain", "SLTrain+GaLore", "Monarch"]
WEIGHT_BYTES = 2
GB = 1e9

# Published figures (see the research notes: SLTrain's Fig. 3, measured on one A100-80G with 8-bit Adam and
# per-layer updates except "Adam"; GaLore's abstract).
SLTRAIN_FIG3_GB = {  # size: (Adam bf16, Adam8bit per-layer, GaLore8bit per-layer, SLTrain8bit per-layer)
    "350m": (4.5, 3.5, 3.1, 2.2), "1b": (16.3, 11.8, 10.3, 6.8), "7b": (67.4, 29.4, 22.0, 18.3)}
GALORE_OPT_STATE_REDUCTION = 0.655  # "up to 65.5 % in optimizer states" (abstract)


@dataclass
class Estimate:
    size: str
    method: str
    params: int
    weights: float
    grads: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations

    @property
    def model_state(self) -> float:
        return self.weights + self.grads + self.optimizer


def build(size: str, method: str, vocab: int = 32000) -> nn.Module:
    """The converted model on the meta device, in bf16."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=vocab, max_position_embeddings=2048, tie_word_embeddings=False,
                                   **LLAMA_SIZES[size])
    cfg._attn_implementation = _flash_like_attention()
    hp = PAPER_HPARAMS[size]
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
        targets = ["self_attn", "mlp"]
        if method.startswith("SLTrain"):
            convert_to_sltrain(model, rank=hp["rank"], density=hp["density"], alpha=hp["alpha"], target=targets,
                               seed=0)
        elif method == "Monarch":
            convert_to_monarch(model, nblocks=4, target=targets, from_dense=False)
    return model


def projected(method: str, name: str, p: torch.Tensor, rank: int) -> bool:
    if method not in ("GaLore", "Fira", "SLTrain+GaLore") or p.dim() != 2 or min(p.shape) <= rank:
        return False
    in_blocks = "self_attn" in name or "mlp" in name
    return in_blocks if method != "SLTrain+GaLore" else not in_blocks


def optimizer_elements(model: nn.Module, method: str, rank: int) -> int:
    total = 0
    for name, p in model.named_parameters():
        if projected(method, name, p, rank):
            big, small = max(p.shape), min(p.shape)
            total += 2 * big * rank + small * rank + (1 if method == "Fira" else 0)
        else:
            total += 2 * p.numel()
    return total


def activation_bytes(model: nn.Module, tokens: int) -> int:
    """Bytes autograd saves in one forward of ``tokens`` tokens, parameters and buffers excluded."""
    owned = {id(t) for t in model.parameters()} | {id(t) for t in model.buffers()}
    seen: set = set()
    total = 0

    def pack(t):
        nonlocal total
        key = id(t._base if t._base is not None else t)  # every packed tensor stays alive, so ids stay unique
        if key not in owned and not isinstance(t, nn.Parameter) and key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
        return t

    ids = torch.zeros(1, tokens, dtype=torch.long, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return total


def estimate(size: str, method: str, state_bytes: int = 2, per_layer: bool = False, tokens: int = 256) -> Estimate:
    model = build(size, method)
    rank = PAPER_HPARAMS[size]["galore_rank"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    params = sum(p.numel() for p in trainable)
    weights = params * WEIGHT_BYTES + sum(b.numel() * b.element_size() for m in model.modules()
                                          if isinstance(m, SLTrainLinear) for b in [m.indices])
    grads = (max(p.numel() for p in trainable) if per_layer else params) * WEIGHT_BYTES
    opt = optimizer_elements(model, method, rank) * state_bytes
    act = activation_bytes(model, tokens)
    return Estimate(size, method, params, weights / GB, grads / GB, opt / GB, act / GB)


class _FlashLikeAttention(torch.autograd.Function):
    """Attention for the estimate only: saves what FlashAttention saves (q, k, v, output, fp32 log-sum-exp)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - the estimate never runs a backward
        raise NotImplementedError


def _flash_like_attention() -> str:
    from transformers import AttentionInterface

    name = "lowrank_memory_estimate"

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        groups = query.shape[1] // key.shape[1]
        key = key.repeat_interleave(groups, dim=1) if groups > 1 else key
        value = value.repeat_interleave(groups, dim=1) if groups > 1 else value
        return _FlashLikeAttention.apply(query, key, value).transpose(1, 2), None

    AttentionInterface.register(name, attention)
    return name


def report(sizes, state_bytes=2, per_layer=False, tokens=256) -> list[Estimate]:
    rows = [estimate(s, m, state_bytes, per_layer, tokens) for s in sizes for m in METHODS]
    mode = {1: "8-bit", 2: "bf16", 4: "fp32"}.get(state_bytes, f"{state_bytes} B")
    print(f"Training memory in GB (1e9 B): bf16 weights and gradients{' (per-layer: one alive)' if per_layer else ''}, "
          f"{mode} optimizer state, activations of one {tokens}-token sequence")
    print(f"{'size':<5} {'method':<15} {'params':>14} {'weights':>8} {'grads':>8} {'optim':>8} {'act':>7} "
          f"{'total':>8} {'vs dense':>9}")
    for size in sizes:
        dense = next(r for r in rows if r.size == size and r.method == "dense+AdamW")
        for r in (r for r in rows if r.size == size):
            print(f"{r.size:<5} {r.method:<15} {r.params:>14,} {r.weights:>8.2f} {r.grads:>8.2f} {r.optimizer:>8.2f} "
                  f"{r.activations:>7.3f} {r.total:>8.2f} {r.total / dense.total:>8.0%}")
    return rows


def compare_with_papers(sizes, tokens=256) -> list[tuple]:
    """Ours next to the published figures; returns (what, paper, ours) rows."""
    rows = []
    print("\nAgainst the papers (GB):")
    for size in sizes:
        dense = estimate(size, "dense+AdamW", tokens=tokens)
        galore = estimate(size, "GaLore", tokens=tokens)
        red = 1 - galore.optimizer / dense.optimizer
        rows.append((f"{size} GaLore optimizer-state reduction", GALORE_OPT_STATE_REDUCTION, red))
        print(f"  {size:<5} GaLore optimizer state vs AdamW: -{red:.1%} (GaLore abstract: up to "
              f"-{GALORE_OPT_STATE_REDUCTION:.1%})")
        if size not in SLTRAIN_FIG3_GB:
            continue
        fig = SLTRAIN_FIG3_GB[size]
        ours = [dense,
                estimate(size, "dense+AdamW", 1, True, tokens),
                estimate(size, "GaLore", 1, True, tokens),
                estimate(size, "SLTrain", 1, True, tokens)]
        labels = ["Adam", "Adam8bit per-layer", "GaLore8bit per-layer", "SLTrain8bit per-layer"]
        for label, paper, est in zip(labels, fig, ours):
            rows.append((f"{size} {label}", paper, est.total))
            print(f"  {size:<5} {label:<22} SLTrain Fig. 3: {paper:6.1f}   ours: {est.total:6.2f} "
                  f"(model state {est.model_state:6.2f} + activations {est.activations:5.2f})")
        cut_paper = 1 - fig[3] / fig[0]
        cut_ours = 1 - ours[3].total / ours[0].total
        rows.append((f"{size} SLTrain8bit vs Adam reduction", cut_paper, cut_ours))
        print(f"  {size:<5} SLTrain8bit per-layer vs Adam: paper -{cut_paper:.0%}, ours -{cut_ours:.0%}")
    print("  Why ours differs: the papers measure a GPU process (CUDA context, allocator caching and "
          "fragmentation,\n  activations at their batch size, which SLTrain does not state for Fig. 3; temporary "
          "buffers such as\n  the SVD and 8-bit quantization scratch); ours counts tensors only, for one sequence, "
          "and stores the\n  support as int32 (SLTrain's code: int64, twice that).")
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Training-memory estimate for LLaMA sizes (meta device).")
    p.add_argument("--sizes", default=",".join(LLAMA_SIZES), help="comma-separated, from " + ",".join(LLAMA_SIZES))
    p.add_argument("--state-bytes", type=int, default=2, choices=[1, 2, 4])
    p.add_argument("--per-layer", action="store_true")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--no-compare", action="store_true")
    args = p.parse_args(argv)
    sizes = [s.strip().lower() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in LLAMA_SIZES]
    if unknown:
        p.error(f"unknown size(s) {unknown}; choose from {list(LLAMA_SIZES)}")
    report(sizes, args.state_bytes, args.per_layer, args.tokens)
    if not args.no_compare:
        compare_with_papers(sizes, args.tokens)


if __name__ == "__main__":
    main()
