"""Measured memory of a training step: parameters, gradients and optimizer state, by optimizer and mode.

``measure_step_memory(model, loss_fn, method)`` runs a few training steps and reports, in bytes, what the
persistent training tensors occupy at the worst instant of a step: parameters + gradients alive at that instant
+ optimizer state. It counts the bytes of live tensors (local shards for DTensors, each storage once), not an
allocator's peak, so it means the same on the CPU and on a GPU and ignores activations and transient
workspace (a projection's R, the fp32 copy an SVD takes). Instants sampled: every gradient hook (before and
after a per-layer step), just before and just after ``optimizer.step()``.

Methods: 'adamw' (torch.optim.AdamW), 'galore_torch' (galore_torch.GaLoreAdamW, if installed), 'galore' (ours),
'galore_per_layer' (ours, ``register_per_layer_step``; with ``process_group`` under several processes),
'galore_8bit' (ours with ``EIGHT_BIT_OPTIONS``: blockwise 8-bit projected moments). FSDP2: pass a
``fully_shard``-ed model inside an initialized process group (each process measures its own shards), or call
``measure_fsdp2_step_memory``, which spawns the processes.

``llama_like`` builds a LLaMA-shaped model (embedding, RMSNorm, q/k/v/o, SwiGLU gate/up/down, LM head) in plain
torch, the shapes GaLore's papers measure; ``galore_groups`` puts its attention and MLP matrices in the projected
group, as GaLore's ``torchrun_main.py`` does.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ._sharding import local
from .galore import GaLoreAdamW
from .per_layer import register_per_layer_step

__all__ = ["StepMemory", "measure_step_memory", "measure_fsdp2_step_memory", "llama_like", "lm_loss",
           "galore_groups", "shard_llama_like", "METHODS", "EIGHT_BIT_OPTIONS"]

METHODS = ("adamw", "galore_torch", "galore", "galore_per_layer", "galore_8bit")
# Group options that turn on 8-bit optimizer state (GaLoreAdamW's blockwise 8-bit projected moments).
EIGHT_BIT_OPTIONS: dict = {"state_bits": 8}


@dataclasses.dataclass
class StepMemory:
    """Bytes at the worst sampled instant of a step: ``peak`` = ``params`` + ``grads`` + ``state``, the parts as
    they were at that instant. Per process for a sharded model."""
    method: str
    params: int
    grads: int
    state: int
    peak: int

    def as_mib(self) -> dict:
        return {k: (v / 2 ** 20 if isinstance(v, int) else v) for k, v in dataclasses.asdict(self).items()}


# ------------------------------------------------------------------------------------------- the model
class _Block(nn.Module):
    def __init__(self, hidden: int, intermediate: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attn_norm, self.mlp_norm = nn.RMSNorm(hidden), nn.RMSNorm(hidden)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(hidden, hidden, bias=False) for _ in range(4))
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        h = self.attn_norm(x)
        q, k, v = (proj(h).view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.o_proj(a)
        h = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class LlamaLike(nn.Module):
    def __init__(self, vocab: int, hidden: int, intermediate: int, layers: int, heads: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(_Block(hidden, intermediate, heads) for _ in range(layers))
        self.norm = nn.RMSNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def llama_like(vocab: int = 32000, hidden: int = 512, intermediate: int = 1376, layers: int = 8, heads: int = 8,
               dtype: torch.dtype = torch.float32, device=None) -> LlamaLike:
    """A LLaMA-shaped causal LM (defaults: GaLore's 60M configuration). ``device='meta'`` builds it without memory."""
    with torch.device(device or "cpu"):
        return LlamaLike(vocab, hidden, intermediate, layers, heads).to(dtype)


def lm_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of a causal LM on ``tokens`` (batch, time)."""
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))


def galore_groups(model: nn.Module, rank: int = 128, update_proj_gap: int = 200, scale: float = 0.25,
                  target: tuple[str, ...] = ("attn", "mlp", "_proj"), **options) -> list[dict]:
    """GaLore's grouping: 2-D weights of modules whose name contains one of ``target`` are projected, every other
    trainable parameter (embedding, norms, LM head) gets plain AdamW."""
    projected, others = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        module_name = name.rsplit(".", 1)[0]
        (projected if p.dim() == 2 and any(t in module_name for t in target) else others).append(p)
    return [{"params": projected, "rank": rank, "update_proj_gap": update_proj_gap, "scale": scale, **options},
            {"params": others}]


# ------------------------------------------------------------------------------------------- counting
def _storages(obj, seen: dict) -> None:
    """Add the bytes of every tensor reachable from an optimizer state value (tensors, containers, and objects'
    attributes one level down: galore-torch keeps its projector matrix in an object)."""
    if torch.is_tensor(obj):
        t = local(obj)
        if t.device.type != "meta" and t.numel():
            seen[(t.untyped_storage().data_ptr(), t.device)] = t.untyped_storage().nbytes()
    elif isinstance(obj, dict):
        for v in obj.values():
            _storages(v, seen)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _storages(v, seen)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (nn.Module, type)):
        for v in vars(obj).values():
            if torch.is_tensor(v):
                _storages(v, seen)


def _bytes(tensors) -> int:
    seen: dict = {}
    for t in tensors:
        if t is not None:
            _storages(t, seen)
    return sum(seen.values())


def _optimizer_state_bytes(optimizers) -> int:
    seen: dict = {}
    for opt in optimizers:
        for st in opt.state.values():
            _storages(st, seen)
    return sum(seen.values())


class _Meter:
    def __init__(self, params, optimizers):
        self.params, self.optimizers = params, optimizers
        self.param_bytes = _bytes(params)
        self.best = (0, 0, 0)  # peak, grads, state

    def sample(self, *_):
        grads = _bytes(p.grad for p in self.params)
        state = _optimizer_state_bytes(self.optimizers)
        total = self.param_bytes + grads + state
        if total > self.best[0]:
            self.best = (total, grads, state)


def _make_optimizer(model: nn.Module, method: str, lr: float, galore_options: dict):
    """(optimizer or None, list of optimizers holding state, per-layer handle or None) for a method."""
    if method == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        return opt, [opt], None
    if method == "galore_torch":
        import galore_torch  # noqa: PLC0415 - optional baseline
        known = ("rank", "update_proj_gap", "scale", "target")
        groups = galore_groups(model, **{k: v for k, v in galore_options.items() if k in known})
        groups[0]["proj_type"] = "std"
        opt = galore_torch.GaLoreAdamW(groups, lr=lr)
        return opt, [opt], None
    options = dict(galore_options)
    if method == "galore_8bit":
        options.update(EIGHT_BIT_OPTIONS)
    groups = galore_groups(model, **options)
    if method == "galore_per_layer":
        import torch.distributed as dist  # noqa: PLC0415
        # under several processes: data parallel without DDP (an FSDP2 model is refused by per-layer stepping)
        group = dist.group.WORLD if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 \
            else None
        handle = register_per_layer_step(groups, lr=lr, process_group=group)
        return None, handle.optimizers, handle
    if method in ("galore", "galore_8bit"):
        opt = GaLoreAdamW(groups, lr=lr)
        return opt, [opt], None
    raise ValueError(f"measure_step_memory: method must be one of {METHODS}, got {method!r}")


def measure_step_memory(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor], method: str,
                        steps: int = 2, lr: float = 1e-3, **galore_options) -> StepMemory:
    """Train ``model`` for ``steps`` steps with ``method`` (``loss_fn(model)`` returns the loss of one batch) and
    return the bytes of parameters + live gradients + optimizer state at the worst sampled instant.
    ``galore_options`` (rank, update_proj_gap, scale, target, basis, fira, ...) go to ``galore_groups``.
    Run at least 2 steps: state is created lazily during the first."""
    params = [p for p in model.parameters() if p.requires_grad]
    sampler = []  # hooks registered before the per-layer ones run before them: they see the gradient alive
    for p in params:
        sampler.append(p.register_post_accumulate_grad_hook(lambda _p: meter.sample()))
    opt, optimizers, per_layer = _make_optimizer(model, method, lr, galore_options)
    meter = _Meter(params, optimizers)
    for p in params:  # and these run after a per-layer step
        sampler.append(p.register_post_accumulate_grad_hook(lambda _p: meter.sample()))
    try:
        for _ in range(steps):
            loss_fn(model).backward()
            meter.sample()
            if opt is not None:
                opt.step()
                meter.sample()
                opt.zero_grad(set_to_none=True)
    finally:
        for h in sampler:
            h.remove()
        if per_layer is not None:  # leave the caller's model without our hooks
            per_layer.remove()
    peak, grads, state = meter.best
    return StepMemory(method, meter.param_bytes, grads, state, peak)


# ------------------------------------------------------------------------------------------- FSDP2
def shard_llama_like(model: nn.Module) -> nn.Module:
    """FSDP2 as torchtitan applies it: ``fully_shard`` every transformer block (``_Block``), then the root."""
    from torch.distributed.fsdp import fully_shard  # noqa: PLC0415
    for module in model.modules():
        if isinstance(module, _Block):
            fully_shard(module)
    fully_shard(model)
    return model


def _fsdp2_worker(rank: int, world: int, port: int, model_fn, loss_fn, method, steps, options, out_dir):
    import torch.distributed as dist  # noqa: PLC0415
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = shard_llama_like(model_fn())
        result = measure_step_memory(model, loss_fn, method, steps=steps, **options)
        torch.save(dataclasses.asdict(result), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def measure_fsdp2_step_memory(model_fn: Callable[[], nn.Module], loss_fn: Callable[[nn.Module], torch.Tensor],
                              method: str = "galore", world_size: int = 2, steps: int = 2, port: int = 29517,
                              **galore_options) -> list[StepMemory]:
    """``measure_step_memory`` of the model ``shard_llama_like`` shards on ``world_size`` CPU processes (gloo);
    returns one ``StepMemory`` per process. ``model_fn`` and ``loss_fn`` must be picklable (module-level functions
    or ``functools.partial``)."""
    import torch.multiprocessing as mp  # noqa: PLC0415
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_fsdp2_worker, args=(world_size, port, model_fn, loss_fn, method, steps, galore_options, out),
                 nprocs=world_size)
        return [StepMemory(**torch.load(os.path.join(out, f"rank{r}.pt"))) for r in range(world_size)]
