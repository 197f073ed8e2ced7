"""Blockwise dynamic 8-bit quantisation of optimizer moments (CPU and GPU tensors).

A moment tensor x (any shape, numel N) is cut into consecutive blocks of ``BLOCK`` elements
of its flattened view. Each block keeps s = max|x| in fp32 and every element as the index
q in [0, 255] of the code value nearest to x / s:

    quantize:    q_i = argmin_k |code_k - x_i / s_blk(i)|
    dequantize:  x_i ~ code[q_i] * s_blk(i)

The codebook is a *dynamic* (decade) map: decade d covers magnitudes [10^(d-7), 10^(d-6)]
with 2^d linearly spaced values, so precision is relative down to 1e-7 of the block maximum.
The signed map (first moment) spends one bit on the sign; the unsigned map (second moment,
always >= 0) uses all 8 bits for magnitude, i.e. twice the resolution of a signed map.
Both contain 0 and 1 exactly (the block maximum is stored without error).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

BLOCK = 4096


@functools.cache
def _magnitudes(count: int) -> tuple[float, ...]:
    """`count - 1` positive decade values in (1e-7, 1), plus 1.0, sorted ascending."""
    values: list[float] = []
    decades = 7
    weights = [2**d for d in range(decades)]
    total = sum(weights)
    budget = count - 1  # 1.0 is added separately
    sizes = [max(1, budget * w // total) for w in weights]
    sizes[-1] += budget - sum(sizes)
    for d, n in enumerate(sizes):
        lo, hi = 10.0 ** (d - decades), 10.0 ** (d - decades + 1)
        step = (hi - lo) / n
        values.extend(lo + step * (i + 0.5) for i in range(n))
    values.append(1.0)
    return tuple(sorted(values))


@functools.cache
def _codebook_cpu(signed: bool) -> tuple[Tensor, Tensor]:
    if signed:
        neg = -torch.tensor(_magnitudes(127), dtype=torch.float32)
        pos = torch.tensor(_magnitudes(128), dtype=torch.float32)
        code = torch.cat([neg, torch.zeros(1), pos])
    else:
        code = torch.cat([torch.zeros(1), torch.tensor(_magnitudes(255), dtype=torch.float32)])
    code, _ = torch.sort(code)
    mids = (code[1:] + code[:-1]) / 2
    return code, mids


_ON_DEVICE: dict[tuple[bool, torch.device], tuple[Tensor, Tensor]] = {}
"""The maps copied to each accelerator once: a copy per call would be a host-to-device copy
(a stream synchronisation on CUDA) at every 8-bit moment read and write."""


def codebook(signed: bool, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """(code (256,), midpoints (255,)) of the signed or unsigned dynamic map, fp32, on
    ``device`` (read-only: shared by every caller)."""
    device = torch.device(device)
    if device.type == "cpu":
        return _codebook_cpu(signed)
    key = (signed, device)
    fake = torch._guards.detect_fake_mode() is not None  # (a fake tensor belongs to its mode)
    if key in _ON_DEVICE and not fake:
        return _ON_DEVICE[key]
    code, mids = (t.to(device) for t in _codebook_cpu(signed))
    if not fake:
        _ON_DEVICE[key] = code, mids
    return code, mids


def num_blocks(numel: int, block: int = BLOCK, offset: int = 0) -> int:
    """Blocks touched by N elements starting ``offset`` elements into a block: the number
    of fp32 scales stored for them (ceil(N / block) when ``offset`` is 0)."""
    return -(-(numel + offset) // block)


def _blocked(flat: Tensor, offset: int, block: int) -> Tensor:
    """``flat`` zero-padded onto whole blocks, ``offset`` zeros in front: (blocks, block)."""
    n = flat.numel()
    nb = num_blocks(n, block, offset)
    return torch.nn.functional.pad(flat, (offset, nb * block - n - offset)).view(nb, block)


def block_absmax(x: Tensor, offset: int = 0, block: int = BLOCK) -> Tensor:
    """max |x| of every block x touches (fp32, :func:`num_blocks` entries); ``offset``: the
    position of x's first element in its block. A piece of a larger tensor with
    ``offset = start % block`` gets the blocks of the whole tensor, partial at its ends."""
    return _blocked(x.detach().float().reshape(-1), offset, block).abs().amax(dim=1)


def quantize(
    x: Tensor,
    signed: bool,
    block: int = BLOCK,
    *,
    offset: int = 0,
    scales: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """x (any shape) -> (q uint8 of x's shape, scales fp32 (:func:`num_blocks`,)).

    ``offset`` places x's first element that far into its block (a piece of a larger
    tensor on that tensor's block grid); ``scales`` replaces the blocks' own maxima (a
    piece's edge blocks take the maximum over every piece sharing them, so that each code
    is the one the whole tensor would get)."""
    flat = x.detach().float().reshape(-1)
    n = flat.numel()
    padded = _blocked(flat, offset, block)
    if scales is None:
        scales = padded.abs().amax(dim=1)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    normed = (padded / safe[:, None]).clamp_(-1.0, 1.0)
    _, mids = codebook(signed, x.device)
    q = torch.bucketize(normed, mids).to(torch.uint8)
    return q.view(-1)[offset : offset + n].view(x.shape), scales


def dequantize(
    q: Tensor, scales: Tensor, signed: bool, block: int = BLOCK, *, offset: int = 0
) -> Tensor:
    """Inverse of :func:`quantize` up to the code spacing: fp32 tensor of q's shape."""
    code, _ = codebook(signed, q.device)
    flat = code[q.reshape(-1).long()]
    n = flat.numel()
    padded = _blocked(flat, offset, block)
    return (padded * scales[:, None]).view(-1)[offset : offset + n].view(q.shape)
