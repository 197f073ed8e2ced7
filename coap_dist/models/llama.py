"""A LLaMA-style decoder (RMSNorm, rotary attention, SwiGLU MLP), free of parallelism.

Parameter names follow the Meta reference layout so that name patterns are predictable:
``tok_embeddings.weight`` (V x d), ``layers.{i}.attention.{wq,wk,wv,wo}.weight`` (d x d),
``layers.{i}.feed_forward.{w1,w3}.weight`` (f x d), ``layers.{i}.feed_forward.w2.weight``
(d x f), ``layers.{i}.{attention_norm,ffn_norm}.weight`` (d), ``norm.weight`` (d),
``output.weight`` (V x d).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Dimensions of a LLaMA-style model.

    Attributes:
        vocab_size: number of token ids V.
        dim: hidden size d.
        intermediate_size: SwiGLU width f.
        n_layers: number of transformer blocks.
        n_heads: attention heads (d must be divisible by it, with an even quotient).
        max_seq_len: longest sequence the rotary table covers.
        norm_eps: RMSNorm epsilon.
    """

    vocab_size: int = 32000
    dim: int = 512
    intermediate_size: int = 1376
    n_layers: int = 8
    n_heads: int = 8
    max_seq_len: int = 256
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "dim",
            "intermediate_size",
            "n_layers",
            "n_heads",
            "max_seq_len",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LlamaConfig.{name} must be a positive integer, got {value!r}")
        if self.dim % self.n_heads:
            raise ValueError(
                f"LlamaConfig.dim ({self.dim}) must be divisible by n_heads ({self.n_heads})"
            )
        if (self.dim // self.n_heads) % 2:
            raise ValueError(
                f"LlamaConfig.dim / n_heads (the head size, {self.dim} / {self.n_heads} = "
                f"{self.dim // self.n_heads}) must be even: rotary embeddings rotate pairs of "
                "channels; choose dim or n_heads so that it is"
            )

    def num_params(self) -> int:
        """Exact parameter count: 2 V d + L (4 d^2 + 3 d f + 2 d) + d."""
        d, f = self.dim, self.intermediate_size
        return 2 * self.vocab_size * d + self.n_layers * (4 * d * d + 3 * d * f + 2 * d) + d


# Published shapes (GaLore / COAP LLaMA recipes); "tiny" is a CPU-sized model with byte tokens.
LLAMA_PRESETS: dict[str, LlamaConfig] = {
    "tiny": LlamaConfig(
        vocab_size=256, dim=128, intermediate_size=344, n_layers=4, n_heads=4, max_seq_len=256
    ),
    "60m": LlamaConfig(
        vocab_size=32000, dim=512, intermediate_size=1376, n_layers=8, n_heads=8, max_seq_len=256
    ),
    "130m": LlamaConfig(
        vocab_size=32000, dim=768, intermediate_size=2048, n_layers=12, n_heads=12, max_seq_len=256
    ),
    "350m": LlamaConfig(
        vocab_size=32000, dim=1024, intermediate_size=2736, n_layers=24, n_heads=16, max_seq_len=256
    ),
    "1b": LlamaConfig(
        vocab_size=32000, dim=2048, intermediate_size=5461, n_layers=24, n_heads=32, max_seq_len=256
    ),
    "7b": LlamaConfig(
        vocab_size=32000,
        dim=4096,
        intermediate_size=11008,
        n_layers=32,
        n_heads=32,
        max_seq_len=2048,
    ),
}


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * w, over the last dim."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(
            x
        ) * self.weight


def _rotary_tables(head_dim: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (seq_len, head_dim // 2) for theta = 10000."""
    inv = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv)
    return angles.cos(), angles.sin()


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_even, x_odd) of x: (B, T, H, Dh) by the angle tables (T, Dh/2)."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)
    return out.type_as(x)


class Attention(nn.Module):
    """Causal multi-head self-attention with rotary position embedding."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.wq = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q = _apply_rotary(self.wq(x).view(b, t, self.n_heads, -1), cos, sin)
        k = _apply_rotary(self.wk(x).view(b, t, self.n_heads, -1), cos, sin)
        v = self.wv(x).view(b, t, self.n_heads, -1)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        return self.wo(y.transpose(1, 2).reshape(b, t, d))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)).

    With ``checkpoint_activations`` set (and gradients enabled) the block keeps only its input
    for the backward pass and recomputes the rest (``torch.utils.checkpoint``, non-reentrant).
    The checkpoint sits inside ``forward``, so hooks on the block (FSDP2's all-gather) stay
    outside the recomputed region.
    """

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)
        self.checkpoint_activations = False

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.checkpoint_activations and torch.is_grad_enabled():
            return checkpoint(self._body, x, cos, sin, use_reentrant=False)
        return self._body(x, cos, sin)

    def _body(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    """Decoder-only LM: tokens (B, T) int64 -> logits (B, T, V).

    Initial weights are a pure function of ``seed`` (:meth:`init_values`), whatever the
    device, the construction order or how the parameters are later sharded: a model built on
    the meta device, sharded, then filled from :meth:`init_values` shard by shard holds the
    same weights as ``Llama(cfg, seed=seed)`` built whole in one process.

    Args:
        cfg: the shape.
        seed: seed of the initial weights; None takes ``torch.initial_seed()`` (the seed of
            the last ``torch.manual_seed``).
        init: write the initial weights now (skipped on the meta device); False leaves them
            to the caller (sharded materialisation, DeepSpeed ``zero.Init``).
    """

    rope_cos: torch.Tensor  # non-persistent buffers, registered in __init__
    rope_sin: torch.Tensor

    def __init__(self, cfg: LlamaConfig, *, seed: int | None = None, init: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.reset_buffers()
        if init and not self.tok_embeddings.weight.is_meta:
            with torch.no_grad():
                for (_, value), p in zip(self.init_values(seed), self.parameters(), strict=True):
                    p.copy_(value)

    def init_values(self, seed: int | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, full initial value)`` of every parameter, in ``named_parameters`` order,
        one at a time (fp32, CPU; a consumer shards or casts each before the next is made).

        Matrices ~ N(0, 0.02^2), output projections (``wo``, ``w2``) scaled by 1/sqrt(2 L);
        norm weights 1. All are drawn in this order from one CPU generator seeded with
        ``seed``, so the values do not depend on the device or on any other random draw.
        """
        gen = torch.Generator().manual_seed(torch.initial_seed() if seed is None else seed)
        std = 0.02
        for name, p in self.named_parameters():
            shape = tuple(p.shape)
            if len(shape) == 2:
                scale = (
                    1.0 / math.sqrt(2 * self.cfg.n_layers)
                    if name.endswith(("wo.weight", "w2.weight"))
                    else 1.0
                )
                yield name, torch.empty(shape).normal_(0.0, std * scale, generator=gen)
            else:
                yield name, torch.ones(shape)

    def reset_buffers(self) -> None:
        """(Re)compute the rotary tables on the buffers' device (after ``to_empty``)."""
        cos, sin = _rotary_tables(self.cfg.dim // self.cfg.n_heads, self.cfg.max_seq_len)
        device = self.rope_cos.device
        self.rope_cos = cos.to(device)
        self.rope_sin = sin.to(device)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each block's activations in the backward pass (see :class:`Block`)."""
        for layer in self.layers:
            cast(Block, layer).checkpoint_activations = enabled

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        if t > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {t} exceeds max_seq_len {self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.output(self.norm(x))
