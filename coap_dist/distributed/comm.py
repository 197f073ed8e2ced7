"""The collectives a COAP layout issues: one process group, one device, counted.

Every buffer handed to a collective is created here or by the caller on ``Comm.device`` (the
parameters' device): NCCL accepts CUDA tensors only, so a buffer made on the default device
would crash there although gloo accepts it. Each call is counted with the bytes this rank
moves, by the usual per-rank cost of the algorithm:

==================  ==========================================================
all_reduce (n B)    2 (N - 1) / N n sent and received (ring)
all_gather          (N - 1) c sent and received (c: bytes per rank)
reduce_scatter      (N - 1) c sent and received (c: bytes of the output chunk)
all_to_all          exactly the bytes of the chunks to / from the other ranks
==================  ==========================================================

:func:`collective_bytes` is that table as a function (the tests count the real c10d calls
with it); :class:`Comm` keeps the totals of the current step for ``metrics()``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Collection, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from coap_dist.functional import quant as fquant

ALIGN = 8
"""Byte alignment of every tensor packed into an exchange buffer (so that views of any dtype
up to fp64 are aligned)."""


def collective_bytes(kind: str, world: int, nbytes: int) -> int:
    """Bytes one rank sends (= receives) in a collective of ``kind`` on ``nbytes``: the whole
    buffer for all_reduce, one rank's chunk for all_gather / reduce_scatter."""
    if world <= 1:
        return 0
    if kind == "all_reduce":
        return 2 * (world - 1) * nbytes // world
    if kind in ("all_gather", "reduce_scatter"):
        return (world - 1) * nbytes
    raise ValueError(f"unknown collective {kind!r}")


def padded(nbytes: int) -> int:
    """``nbytes`` rounded up to the exchange alignment."""
    return -(-nbytes // ALIGN) * ALIGN


def tensor_bytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    """Bytes of a tensor of ``shape`` and ``dtype``."""
    n = 1
    for s in shape:
        n *= s
    return n * dtype.itemsize


@dataclasses.dataclass(frozen=True)
class Expect:
    """A tensor this rank will receive: its shape and dtype (both ends know them from the
    placement, so no sizes are exchanged)."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.shape, self.dtype)


_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def transport_device(group: dist.ProcessGroup | None, device: torch.device) -> torch.device:
    """Where the collectives of state on ``device`` run: ``device`` itself, except host
    state (DeepSpeed ``offload_optimizer``) on an NCCL group, which accepts device tensors
    only: then the current CUDA device."""
    if device.type != "cpu":
        return device
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and "cpu:" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class Comm:
    """Counted collectives on ``group`` with buffers on ``device``.

    Attributes:
        group: the process group (None: the default group; ignored when ``solo``: one rank,
            no process group needed).
        device: where every buffer the caller hands over or gets back lives (the state's).
        transport: where the collectives run (:func:`transport_device` unless given); when
            it is not ``device``, each collective copies its input there and its result
            back (host state on NCCL: one round trip per collective, as offload implies).
        world, rank: size of the group and this process's rank in it.
        calls, sent, received: totals since the last :meth:`reset`.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        device: torch.device,
        *,
        solo: bool = False,
        transport: torch.device | None = None,
    ) -> None:
        self.group = group
        self.device = device
        self.world = 1 if solo else dist.get_world_size(group)
        self.rank = 0 if solo else dist.get_rank(group)
        if transport is None:
            transport = device if solo else transport_device(group, device)
        self.transport = transport
        self.calls = 0
        self.sent = 0
        self.received = 0

    def _there(self, t: Tensor) -> Tensor:
        """``t`` on the transport device (itself when that is its device)."""
        return t if t.device == self.transport else t.to(self.transport)

    def _back(self, t: Tensor) -> Tensor:
        """A collective's result on ``device``."""
        return t if t.device == self.device else t.to(self.device)

    def reset(self) -> None:
        """Start counting a new step."""
        self.calls = self.sent = self.received = 0

    def global_rank(self, rank: int) -> int:
        """Global rank of group rank ``rank``."""
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def _count(self, sent: int, received: int) -> None:
        self.calls += 1
        self.sent += sent
        self.received += received

    def all_reduce(self, t: Tensor, op: str = "sum") -> Tensor:
        """In-place all-reduce of ``t`` (on ``device``) over the group; returns t."""
        x = self._there(t)
        dist.all_reduce(x, op=_OPS[op], group=self.group)
        if x is not t:
            t.copy_(x)
        moved = collective_bytes("all_reduce", self.world, t.numel() * t.element_size())
        self._count(moved, moved)
        return t

    def all_reduce_list(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """Sums over the group of several tensors in ONE all-reduce (flattened in the first
        one's dtype); returns views of the summed buffer, shaped like ``tensors``."""
        if not tensors:
            return []
        dtype = tensors[0].dtype
        flat = self.all_reduce(torch.cat([t.reshape(-1).to(dtype) for t in tensors]))
        out, off = [], 0
        for t in tensors:
            out.append(flat[off : off + t.numel()].view(t.shape))
            off += t.numel()
        return out

    def all_gather(self, t: Tensor) -> Tensor:
        """Concatenation over ranks (rank order) of every rank's flat ``t`` (equal sizes)."""
        flat = self._there(t.reshape(-1))
        out = torch.empty(self.world * flat.numel(), dtype=flat.dtype, device=self.transport)
        fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        fn(out, flat, group=self.group)
        moved = collective_bytes("all_gather", self.world, flat.numel() * flat.element_size())
        self._count(moved, moved)
        return self._back(out)

    def reduce_scatter(self, t: Tensor) -> Tensor:
        """This rank's chunk of the element-wise sum over ranks of flat ``t`` (N equal chunks)."""
        flat = self._there(t.reshape(-1))
        out = torch.empty(flat.numel() // self.world, dtype=flat.dtype, device=self.transport)
        fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        fn(out, flat, group=self.group)
        moved = collective_bytes("reduce_scatter", self.world, out.numel() * out.element_size())
        self._count(moved, moved)
        return self._back(out)

    def exchange(
        self, sends: dict[int, list[Tensor]], expects: dict[int, list[Expect]], *, needed: bool
    ) -> dict[int, list[Tensor]]:
        """One ``all_to_all_single`` round: ``sends[q]`` go to rank q, ``expects[q]`` describe
        what rank q sends here, in the order it sends them. Tensors to self are passed on
        without a copy. Returns the received tensors per source rank (views of one buffer).

        ``needed`` must be the same on every rank (whether any rank sends anything this
        round, known from the placement): a rank with nothing to send or receive still
        joins the collective, or the ranks would disagree on the sequence of collectives."""
        out: dict[int, list[Tensor]] = {self.rank: list(sends.get(self.rank, []))}
        in_sizes = [0] * self.world
        out_sizes = [0] * self.world
        chunks: list[Tensor] = []
        for q in range(self.world):
            if q == self.rank:
                continue
            for t in sends.get(q, []):
                raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
                pad = padded(raw.numel()) - raw.numel()
                chunks.append(raw)
                if pad:
                    chunks.append(torch.zeros(pad, dtype=torch.uint8, device=self.device))
                in_sizes[q] += raw.numel() + pad
            out_sizes[q] = sum(padded(e.nbytes) for e in expects.get(q, []))
        if self.world > 1 and needed:
            inp = (
                torch.cat(chunks)
                if chunks
                else torch.empty(0, dtype=torch.uint8, device=self.device)
            )
            buf = torch.empty(sum(out_sizes), dtype=torch.uint8, device=self.transport)
            dist.all_to_all_single(buf, self._there(inp), out_sizes, in_sizes, group=self.group)
            buf = self._back(buf)
            self._count(sum(in_sizes), sum(out_sizes))
            off = 0
            for q in range(self.world):
                if q == self.rank:
                    continue
                got = []
                for e in expects.get(q, []):
                    raw = buf[off : off + e.nbytes]
                    got.append(raw.view(e.dtype).view(e.shape))
                    off += padded(e.nbytes)
                out[q] = got
        return out

    def send(self, t: Tensor, to: int) -> None:
        """Point-to-point send of ``t`` to group rank ``to`` (checkpoint consolidation)."""
        dist.send(self._there(t), self.global_rank(to), group=self.group)

    def recv(self, t: Tensor, src: int) -> Tensor:
        """Receive into a buffer shaped like ``t`` from group rank ``src``; returns it."""
        x = self._there(t)
        dist.recv(x, self.global_rank(src), group=self.group)
        return self._back(x)

    def same_everywhere(self, text: str) -> bool:
        """Whether every rank passed the same ``text`` (one all-gather of its SHA-256 digest,
        on ``device``; bind time only)."""
        digest = hashlib.sha256(text.encode()).digest()
        local = torch.tensor(list(digest), dtype=torch.uint8, device=self.device)
        rows = self.all_gather(local).view(self.world, -1).cpu().tolist()
        return all(row == rows[0] for row in rows)

    def all_gather_objects(self, obj: object) -> list[object]:
        """Every rank's picklable ``obj`` (bind time only: config checks, fragment maps)."""
        if self.world == 1:
            return [obj]
        gathered: list[object] = [None] * self.world
        dist.all_gather_object(gathered, obj, group=self.group)
        self.calls += 1
        return gathered


def share_block_max(
    comm: Comm,
    maxima: dict[int, list[Tensor]],
    shared: Sequence[tuple[int, int]],
    starts: Mapping[int, int],
    active: Collection[int],
) -> dict[int, list[Tensor]]:
    """``Layout.share_block_max`` for pieces cut inside quantization blocks: one MAX
    all-reduce of both moments' maxima of the ``shared`` (parameter, global block) pairs of
    the ``active`` parameters (every rank lists the same pairs); ``starts[i]``: the first
    flat element of this rank's piece of parameter i (absent: it holds none)."""
    pairs = [(i, k) for i, k in shared if i in active]
    if not pairs:
        return maxima
    vec = torch.zeros(2 * len(pairs), dtype=torch.float32, device=comm.device)
    slots: list[tuple[int, int, int]] = []  # (index, local block, slot)
    for n, (i, k) in enumerate(pairs):
        if i not in starts or i not in maxima:
            continue
        local = k - starts[i] // fquant.BLOCK
        if 0 <= local < maxima[i][0].numel():
            slots.append((i, local, n))
            vec[2 * n] = maxima[i][0][local]
            vec[2 * n + 1] = maxima[i][1][local]
    comm.all_reduce(vec, "max")
    for i, local, n in slots:
        maxima[i][0][local] = vec[2 * n]
        maxima[i][1][local] = vec[2 * n + 1]
    return maxima
