"""Pretrain a LLaMA-style model from a ``transformers`` config, from random init, with dense, Monarch or SLTrain
linear layers and AdamW, GaLore or Fira, on one process or under ``torchrun`` (DDP or FSDP2).

    python examples/pretrain_llama.py --layer sltrain --optim adamw --size tiny --steps 50
    torchrun --nproc_per_node 2 examples/pretrain_llama.py --layer monarch --parallel fsdp --size tiny

Data: the English text of Python's reference manual, which ships inside CPython (``pydoc_data.topics``,
about 465 KB), tokenized byte by byte (vocabulary 256), so nothing is downloaded; ``--data synthetic``
uses random tokens instead. Every run is followed by the dense + AdamW baseline on the same data and
steps (``--no-baseline`` skips it), and a table compares loss, step time and memory. Memory on CPU is
counted from the tensors themselves (parameters, gradients, optimizer state, and the activations autograd
saved in one step, via saved-tensor hooks), per rank; on CUDA the allocator's peak is printed too.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import transformers

from lowrank.memory import LLAMA_SIZES, PAPER_HPARAMS
from lowrank.nn import convert_to_monarch, convert_to_sltrain
from lowrank.optim import GaLoreAdamW
from lowrank.optim._sharding import local

SIZES = {"tiny": {"hidden_size": 64, "intermediate_size": 176, "num_attention_heads": 4, "num_hidden_layers": 2},
         **LLAMA_SIZES}
TINY_HPARAMS = {"rank": 16, "density": 0.03, "alpha": 8.0, "galore_rank": 16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layer", choices=["dense", "monarch", "sltrain"], default="sltrain")
    p.add_argument("--optim", choices=["adamw", "galore", "fira"], default="adamw")
    p.add_argument("--size", choices=list(SIZES), default="tiny")
    p.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp", help="under torchrun")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8, help="global, split over ranks")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--rank", type=int, default=None, help="SLTrain's rank (default: the paper's for --size)")
    p.add_argument("--galore-rank", type=int, default=None, help="GaLore / Fira rank (default: the paper's)")
    p.add_argument("--density", type=float, default=0.03)
    p.add_argument("--nblocks", type=int, default=4)
    p.add_argument("--update-proj-gap", type=int, default=200)
    p.add_argument("--amp", action="store_true", help="torch.autocast in bfloat16")
    p.add_argument("--data", choices=["pydoc", "synthetic"], default="pydoc")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-baseline", action="store_true", help="skip the dense + AdamW run")
    p.add_argument("--json", default=None, help="write the results here (rank 0)")
    return p.parse_args(argv)


def corpus(kind: str) -> torch.Tensor:
    """The training tokens: bytes of the Python reference manual, or random bytes."""
    if kind == "pydoc":
        from pydoc_data.topics import topics
        text = "\n\n".join(topics[k] for k in sorted(topics))
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    return torch.randint(0, 256, (200_000,), generator=torch.Generator().manual_seed(0))


def batches(tokens: torch.Tensor, args, rank: int, world: int):
    """Each step: the global batch of random windows (same on every rank), this rank's slice of it."""
    gen = torch.Generator().manual_seed(args.seed)
    per_rank = args.batch_size // world
    while True:
        starts = torch.randint(0, tokens.numel() - args.seq_len - 1, (args.batch_size,), generator=gen)
        mine = starts[rank * per_rank:(rank + 1) * per_rank]
        yield torch.stack([tokens[s:s + args.seq_len] for s in mine.tolist()])


def build_model(args, layer: str):
    cfg = transformers.LlamaConfig(vocab_size=256, max_position_embeddings=max(args.seq_len, 64),
                                   tie_word_embeddings=False, **SIZES[args.size])
    torch.manual_seed(args.seed)
    model = transformers.LlamaForCausalLM(cfg)
    hp = PAPER_HPARAMS.get(args.size, TINY_HPARAMS)
    rank = args.rank or hp["rank"]
    targets = ["self_attn", "mlp"]  # the papers keep embeddings and lm_head dense
    if layer == "monarch":
        report = convert_to_monarch(model, nblocks=args.nblocks, target=targets, from_dense=False)
    elif layer == "sltrain":
        report = convert_to_sltrain(model, rank=rank, density=args.density, alpha=hp["alpha"], target=targets,
                                    seed=args.seed)
    else:
        report = None
    return model, report, args.galore_rank or hp["galore_rank"]


def make_optimizer(model, args, optim: str, rank: int):
    if optim == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=args.lr)
    # GaLore projects the attention / MLP matrices whose smaller side exceeds the rank; the rest is AdamW
    projected = [p for n, p in model.named_parameters()
                 if p.dim() == 2 and min(p.shape) > rank and ("self_attn" in n or "mlp" in n)]
    ids = {id(p) for p in projected}
    rest = [p for p in model.parameters() if id(p) not in ids]
    groups = [{"params": rest}]
    if projected:
        groups.append({"params": projected, "rank": rank, "update_proj_gap": args.update_proj_gap, "scale": 0.25,
                       "fira": optim == "fira"})
    return GaLoreAdamW(groups, lr=args.lr)


def state_bytes(model, opt) -> dict:
    params = sum(local(p).numel() * p.element_size() for p in model.parameters())
    buffers = sum(local(b).numel() * b.element_size() for b in model.buffers())
    grads = sum(local(p.grad).numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    opt_state = sum(local(v).numel() * v.element_size() for s in opt.state.values() for v in s.values()
                    if torch.is_tensor(v))
    return {"params": params + buffers, "grads": grads, "optimizer": opt_state}


class SavedActivations(torch.autograd.graph.saved_tensors_hooks):
    """Bytes autograd keeps for the backward, parameters excluded, each storage counted once."""

    def __init__(self, model):
        self.params = {local(p).untyped_storage().data_ptr() for p in model.parameters()}
        self.seen, self.bytes = set(), 0
        super().__init__(self._pack, lambda t: t)

    def _pack(self, t):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        # FSDP2's unsharded parameters are nn.Parameters with storages of their own
        if not isinstance(t, torch.nn.Parameter) and key not in self.params and key not in self.seen:
            self.seen.add(key)
            self.bytes += storage.nbytes()
        return t


def run(args, layer: str, optim: str, tokens, rank_id: int, world: int, device) -> dict:
    model, report, galore_rank = build_model(args, layer)
    model.to(device)
    if world > 1 and args.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
        wrapped = model
    elif world > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    else:
        wrapped = model
    opt = make_optimizer(model, args, optim, galore_rank)
    data = batches(tokens, args, rank_id, world)
    losses, times, activations = [], [], 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(args.steps):
        ids = next(data).to(device)
        start = time.perf_counter()
        hooks = SavedActivations(model) if step == 0 else None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            if hooks is not None:
                with hooks:
                    loss = wrapped(input_ids=ids, labels=ids).loss
                activations = hooks.bytes
            else:
                loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        if step == 0:
            counted = state_bytes(model, opt)  # gradients alive; optimizer state not yet
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        value = loss.detach()
        if world > 1:
            dist.all_reduce(value)
            value /= world
        losses.append(value.item())
        if rank_id == 0 and (step % max(1, args.steps // 10) == 0 or step == args.steps - 1):
            print(f"[{layer}+{optim}] step {step:4d}  loss {losses[-1]:.4f}  {times[-1] * 1e3:7.1f} ms", flush=True)
    counted["optimizer"] = state_bytes(model, opt)["optimizer"]
    counted["activations"] = activations
    result = {"layer": layer, "optim": optim, "losses": losses,
              "step_ms": 1e3 * statistics.median(times[1:] or times),
              "memory_bytes": counted, "peak_bytes": sum(counted.values()),
              "params": sum(p.numel() for p in model.parameters()),  # a DTensor's numel is the global one
              "report": str(report) if report is not None else "dense"}
    if device.type == "cuda":
        result["cuda_max_allocated"] = torch.cuda.max_memory_allocated(device)
    return result


def table(results: list[dict]) -> str:
    base = next((r for r in results if r["layer"] == "dense" and r["optim"] == "adamw"), results[0])
    mb = 2 ** 20
    lines = [f"{'run':<18} {'params':>11} {'loss first->last':>18} {'step ms':>9} {'x dense':>8} "
             f"{'params+grads+opt+act MB':>24} {'x dense':>8}"]
    for r in results:
        m = r["memory_bytes"]
        parts = "+".join(f"{m[k] / mb:.1f}" for k in ("params", "grads", "optimizer", "activations"))
        lines.append(f"{r['layer'] + '+' + r['optim']:<18} {r['params']:>11,} "
                     f"{r['losses'][0]:>8.3f} -> {r['losses'][-1]:<7.3f} {r['step_ms']:>9.1f} "
                     f"{r['step_ms'] / base['step_ms']:>7.2f}x {parts:>24} "
                     f"{r['peak_bytes'] / base['peak_bytes']:>7.2f}x")
        if "cuda_max_allocated" in r:
            lines[-1] += (f"   CUDA peak {r['cuda_max_allocated'] / mb:.1f} MB "
                          f"({r['cuda_max_allocated'] / base['cuda_max_allocated']:.2f}x)")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank_id = int(os.environ.get("RANK", "0"))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() \
        else torch.device("cpu")
    if world > 1:
        if args.batch_size % world:
            raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of the {world} ranks")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        tokens = corpus(args.data)
        runs = [(args.layer, args.optim)]
        if not args.no_baseline and runs[0] != ("dense", "adamw"):
            runs.append(("dense", "adamw"))
        results = [run(args, layer, optim, tokens, rank_id, world, device) for layer, optim in runs]
        if rank_id == 0:
            mode = f"{world} ranks, {args.parallel}" if world > 1 else "1 process"
            print(f"\nLLaMA {args.size}, {mode}, {args.steps} steps of {args.batch_size}x{args.seq_len} tokens "
                  f"({args.data}), memory per rank:")
            print(table(results))
            for r in results:
                print(f"  {r['layer']}: {r['report']}")
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"world": world, "parallel": args.parallel if world > 1 else None, "runs": results}, f)
        return results
    finally:
        if world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # torch 2.13 + gloo: a process that ran FSDP2 / DDP sometimes aborts at interpreter exit, after
        # destroy_process_group ("terminate called without an active exception"); everything is done by now
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
