"""How a parameter is laid out across processes, and the few collectives GaLoreAdamW needs for it.

A plain tensor (or a DTensor whose placements are all ``Replicate``) is *whole*: every collective is a no-op and
the optimizer runs exactly its single-process code. A DTensor with one ``Shard(0)`` placement (FSDP2's
``fully_shard``, alone or with ``Replicate`` mesh dimensions as in HSDP) is *row-sharded*: this process holds
rows ``[start, end)`` of the ``(m, n)`` matrix, cut as ``torch.chunk`` cuts them (so the last ranks may hold fewer
rows or none). Anything else (column or 2-D sharding, tensor parallelism) is refused.

Row sharding is what makes a sharded GaLore cheap: on the right (``R = G·Pᵀ``) every row of R and of the moments
lives where the row of G lives, so projection, Adam and the update are local; on the left (``R = Pᵀ·G``) each
process holds a partial sum ``P_kᵀ·G_k`` and one ``r × n`` all-reduce completes it.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

try:  # torch >= 2.5 has the public DTensor API; without it nothing can be a DTensor
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover
    DTensor = Replicate = Shard = None


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this process holds (in-place ops on it update the DTensor)."""
    return t._local_tensor if is_dtensor(t) else t


class Layout:
    """The layout of one parameter. ``sharded`` is True only for row sharding over a group of > 1 processes."""

    def __init__(self, p: torch.Tensor):
        self.shape = tuple(p.shape)
        self.mesh = self.group = None
        self.sharded = False
        self.world, self.index = 1, 0
        self.start, self.end = 0, (self.shape[0] if self.shape else 0)
        if not is_dtensor(p):
            return
        self.mesh, self.placements = p.device_mesh, tuple(p.placements)
        shard_dims = [i for i, pl in enumerate(self.placements) if isinstance(pl, Shard)]
        others = [pl for pl in self.placements if not isinstance(pl, (Shard, Replicate))]
        if others or len(shard_dims) > 1 or any(self.placements[i].dim != 0 for i in shard_dims):
            raise NotImplementedError(
                f"GaLoreAdamW: a DTensor parameter with placements {self.placements} is not supported; it handles "
                f"row sharding (one Shard(0), as FSDP2's fully_shard makes) and replication")
        if not shard_dims:
            return
        mesh_dim = self.mesh_dim = shard_dims[0]
        self.group = self.mesh.get_group(mesh_dim)
        self.world = self.mesh.size(mesh_dim)
        self.index = self.mesh.get_local_rank(mesh_dim)
        self.sharded = self.world > 1
        chunk = math.ceil(self.shape[0] / self.world) if self.shape[0] else 0
        self.start = min(self.index * chunk, self.shape[0])
        self.end = min(self.start + chunk, self.shape[0])
        rows = local(p).shape[0]
        if rows != self.end - self.start:  # pragma: no cover - a layout torch.chunk would not make
            raise NotImplementedError(f"GaLoreAdamW: this process holds {rows} rows of a {self.shape} parameter, "
                                      f"expected the torch.chunk share {self.end - self.start}")

    # ---------------------------------------------------------------------------------- state tensors
    def wrap(self, t: torch.Tensor, shard_dim: int | None, global_shape: tuple) -> torch.Tensor:
        """A state tensor as it is stored: ``t`` itself for a plain parameter, else a DTensor on the parameter's
        mesh, holding this process's ``torch.chunk`` block along ``shard_dim`` (0: the parameter's rows, 1: a
        column block) or replicated (None), so distributed checkpoints see its layout."""
        if self.mesh is None:
            return t
        placements = [Replicate() for _ in self.placements]
        if shard_dim is not None and self.sharded:
            placements[self.mesh_dim] = Shard(shard_dim)
        stride = tuple(math.prod(global_shape[i + 1:]) for i in range(len(global_shape)))
        return DTensor.from_local(t, self.mesh, placements, run_check=False, shape=torch.Size(global_shape),
                                  stride=stride)

    # ---------------------------------------------------------------------------------- collectives
    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the processes that share the rows (in place); a no-op unless sharded."""
        if self.sharded:
            dist.all_reduce(t, group=self.group)
        return t

    def broadcast_(self, t: torch.Tensor) -> torch.Tensor:
        """Make every process hold the first process's ``t``, so a choice made from reduced values (which every
        process computes itself) can never differ between them."""
        if self.sharded:
            dist.broadcast(t, group=self.group, group_src=0)
        return t

    def gather_rows(self, t: torch.Tensor, rows: int) -> torch.Tensor:
        """The whole ``(rows, k)`` matrix from each process's row block ``t`` (an all-gather of ``rows × k``)."""
        if not self.sharded:
            return t
        return self.wrap(t.contiguous(), 0, (rows, t.shape[1])).full_tensor()

    def own_cols(self, n: int) -> slice | None:
        """This process's ``torch.chunk`` block of n columns (None unless sharded): left-projected moments are
        kept column-sharded, so the ``r × n`` state is split like the weight is."""
        if not self.sharded:
            return None
        chunk = math.ceil(n / self.world)
        start = min(self.index * chunk, n)
        return slice(start, min(start + chunk, n))

    def gather_cols(self, t: torch.Tensor, cols: int) -> torch.Tensor:
        """The whole ``(k, cols)`` matrix from each process's column block ``t`` (an all-gather of ``k × cols``)."""
        if not self.sharded:
            return t
        return self.wrap(t.contiguous(), 1, (t.shape[0], cols)).full_tensor()

    def own_rows(self, t: torch.Tensor) -> torch.Tensor:
        """This process's block of a replicated matrix with the parameter's rows."""
        return t[self.start:self.end] if self.sharded else t

    def column_block(self, G: torch.Tensor) -> torch.Tensor:
        """From row blocks ``G_k (m_k, n)`` to an ``(m, ⌈n/world⌉)`` block of columns (zero-padded), by one
        all-to-all: each process sends and receives one shard's worth, never the whole matrix."""
        m, n = self.shape
        chunk, cols = math.ceil(m / self.world), math.ceil(n / self.world)
        padded = G.new_zeros((chunk, self.world * cols))
        padded[:G.shape[0], :n] = G
        send = padded.view(chunk, self.world, cols).transpose(0, 1).contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        return recv.reshape(self.world * chunk, cols)[:m]
