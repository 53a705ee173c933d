"""Building blocks of the latent UNet: timestep embedding, ResBlock, spatial transformer, resampling.

Every block takes and returns ``[B, C, H, W]`` feature maps (the transformer flattens internally), so the
UNet in ``model.py`` is just a list of these blocks plus skip connections.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from engine.precision import GroupNorm, LayerNorm


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's weights and bias, so the residual branch it ends starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def maybe_checkpoint(block: nn.Module, *args: Tensor, enabled: bool) -> Tensor:
    """Run ``block(*args)``, recomputing its activations in the backward pass when ``enabled``."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of (possibly fractional) timesteps ``t [B]`` -> ``[B, dim]`` (cos half, sin half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class TimestepMLP(nn.Module):
    """Sinusoidal timestep features followed by a two-layer MLP."""

    def __init__(self, freq_dim: int, out_dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim))


class ResBlock(nn.Module):
    """Two 3x3 convs with GroupNorm/SiLU; the timestep embedding is added between them as a per-channel bias."""

    def __init__(self, in_channels: int, out_channels: int, time_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, out_channels)
        self.norm2 = GroupNorm(groups, out_channels, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


def _heads(x: Tensor, head_dim: int) -> Tensor:
    """``[B, L, H*D] -> [B, H, L, D]``."""
    return x.unflatten(-1, (-1, head_dim)).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    """``[B, H, L, D] -> [B, L, H*D]``."""
    return x.transpose(1, 2).flatten(2)


class HeadRMSNorm(nn.Module):
    """RMS-normalises each head's query or key features, with a learned gain (QK-norm, as in SD3 and ViT-22B).

    Bounds the attention logits, whose unchecked growth is a known cause of loss spikes at high learning rates.
    Computed in fp32 and returned in the input's dtype, so q, k and v reach SDPA in one dtype.
    """

    def __init__(self, head_dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(head_dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).to(x.dtype)


def _qk_norms(head_dim: int, enabled: bool) -> tuple[nn.Module, nn.Module]:
    if not enabled:
        return nn.Identity(), nn.Identity()
    return HeadRMSNorm(head_dim), HeadRMSNorm(head_dim)


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused q/k/v projection."""

    def __init__(self, dim: int, head_dim: int, qk_norm: bool = False):
        super().__init__()
        self.head_dim = head_dim
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_norm, self.k_norm = _qk_norms(head_dim, qk_norm)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (_heads(part, self.head_dim) for part in self.qkv(x).chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.out(_merge_heads(out))


class CrossAttention(nn.Module):
    """Multi-head attention from image tokens (queries) to text states (fused key/value projection)."""

    def __init__(self, dim: int, context_dim: int, head_dim: int, qk_norm: bool = False):
        super().__init__()
        self.head_dim = head_dim
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(context_dim, 2 * dim, bias=False)
        self.q_norm, self.k_norm = _qk_norms(head_dim, qk_norm)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        q = _heads(self.q(x), self.head_dim)
        k, v = (_heads(part, self.head_dim) for part in self.kv(context).chunk(2, dim=-1))
        out = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.out(_merge_heads(out))


class GEGLUFeedForward(nn.Module):
    """``Linear -> (a * GELU(gate)) -> Linear`` with a 4x wider hidden layer (Shazeer, GLU variants)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.proj_in = nn.Linear(dim, 2 * mult * dim)
        self.proj_out = nn.Linear(mult * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        a, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(a * F.gelu(gate))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm ``self-attention -> cross-attention -> GEGLU`` with a residual around each."""

    def __init__(self, dim: int, context_dim: int, head_dim: int, qk_norm: bool = False):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.self_attn = SelfAttention(dim, head_dim, qk_norm)
        self.norm2 = LayerNorm(dim)
        self.cross_attn = CrossAttention(dim, context_dim, head_dim, qk_norm)
        self.norm3 = LayerNorm(dim)
        self.ff = GEGLUFeedForward(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.self_attn(self.norm1(x))
        x = x + self.cross_attn(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, conditioned on text; starts as the identity."""

    def __init__(self, channels: int, context_dim: int, head_dim: int, depth: int, groups: int,
                 qk_norm: bool = False):
        super().__init__()
        self.norm = GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.blocks = nn.ModuleList(TransformerBlock(channels, context_dim, head_dim, qk_norm)
                                    for _ in range(depth))
        self.proj_out = zero_init(nn.Linear(channels, channels))

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))  # [B, H*W, C]
        for block in self.blocks:
            tokens = block(tokens, context)
        return x + self.proj_out(tokens).transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    """Halve the resolution with a learned stride-2 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour upsampling then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
