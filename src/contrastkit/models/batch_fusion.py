"""The Embedding Layer of adaptive batch fusion: samples of a batch communicate at each patch position.

Reconstruction of the layer named in Zhang, Shen & Liu, "From Pretext to Purpose: Batch-Adaptive Self-Supervised
Learning" (arXiv preprint 2023, https://arxiv.org/abs/2311.09974): "Patch Partition -> Conv Embedding -> Patch
Restore", which lets "formerly isolated individual data partake in intra-batch communication" through
"dimensionality reduction and reconstruction of batch data". No code is public and the method section is not
available, so everything past the component names is ours; :mod:`contrastkit.plugins.batch_fusion` lists each
choice with its label. This module is the shape-preserving core, ``B x C x H x W -> B x C x H x W``::

    x_pad = pad(x)                   # B x C x H' x W'   zero-padded right/bottom to multiples of p    [ours]
    e     = Conv2d(C, E, p, p)(x_pad)  # B x E x h x w   Patch Partition + Conv Embedding (h = H'/p)   [paper names]
    m     = mixer(e)                 # B x E x h x w     communication across the batch axis, per patch position
    r     = ConvTranspose2d(E, C, p, p)(m)  # B x C x H' x W'   Patch Restore                           [paper names]
    fused = r[..., :H, :W]           # B x C x H x W

Mixers (both act on the batch axis only; the ``h x w`` patch positions never exchange information):

- :class:`BatchAttention` (``attention``): at each position the ``B`` embeddings are a sequence; pre-LayerNorm,
  then PyTorch's ``nn.MultiheadAttention`` over it (no positional code: the batch is a set). Any batch size.
- :class:`BatchLinear` (``linear``): ``m_i = sum_j W_ij e_j`` with a learned ``B x B`` matrix (``nn.Linear(B, B)``
  without bias, PyTorch's default initialisation), the same at every position. Needs batches of exactly ``B``.

The patch convolutions are PyTorch's (a stride-``p`` ``p x p`` convolution is the patch partition followed by a
linear embedding of each patch, and its transpose writes each patch back).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from contrastkit.errors import ConfigError

__all__ = ["BatchAttention", "BatchFusionLayer", "BatchLinear", "MIXERS"]

MIXERS = ("attention", "linear")


class BatchAttention(nn.Module):
    """Self-attention over the batch axis at every patch position (pre-LayerNorm; no positional code).

    Args:
        dim: embedding width ``E``. heads: attention heads (``E`` divisible by it). Default 4.
    """

    def __init__(self, dim: int, heads: int = 4) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, e: Tensor) -> Tensor:
        b, d, h, w = e.shape
        tokens = self.norm(e.flatten(2).permute(2, 0, 1))  # (h*w) x B x E: one sequence of B samples per position
        out, _ = self.attn(tokens, tokens, tokens, need_weights=False)  # (h*w) x B x E
        return out.permute(1, 2, 0).reshape(b, d, h, w)  # B x E x h x w


class BatchLinear(nn.Module):
    """A learned linear map over the batch axis, shared by all positions and channels: ``m_i = sum_j W_ij e_j``.

    Args:
        batch_size: ``B``, the only batch size it accepts.
    """

    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.mix = nn.Linear(batch_size, batch_size, bias=False)

    def forward(self, e: Tensor) -> Tensor:
        if e.shape[0] != self.batch_size:
            raise ConfigError(
                f"plugins.batch_fusion.mixer=linear maps batches of exactly {self.batch_size} samples but got "
                f"{e.shape[0]}: keep every step's batch at optim.batch_size (no batch-changing plug-in, no split "
                "batches) or use plugins.batch_fusion.mixer=attention")
        return self.mix(e.movedim(0, -1)).movedim(-1, 0)  # B x E x h x w


class BatchFusionLayer(nn.Module):
    """One Embedding Layer: patch partition -> conv embedding -> batch mixer -> patch restore (module docstring).

    Args:
        channels: ``C`` of the input. patch_size: ``p``. embed_dim: ``E``.
        mixer: ``attention`` or ``linear``. heads: attention heads. batch_size: the linear mixer's ``B``.
    """

    def __init__(self, channels: int, patch_size: int, embed_dim: int, mixer: str = "attention", heads: int = 4,
                 batch_size: int | None = None) -> None:
        super().__init__()
        if mixer not in MIXERS:
            raise ConfigError(f"unknown batch fusion mixer {mixer!r}; choose one of {', '.join(MIXERS)}")
        self.patch_size = patch_size
        self.embed = nn.Conv2d(channels, embed_dim, patch_size, stride=patch_size)
        if mixer == "attention":
            self.mixer: nn.Module = BatchAttention(embed_dim, heads)
        else:
            if batch_size is None:
                raise ConfigError("the linear batch fusion mixer needs a batch size")
            self.mixer = BatchLinear(batch_size)
        self.restore = nn.ConvTranspose2d(embed_dim, channels, patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        p = self.patch_size
        x = F.pad(x, (0, -w % p, 0, -h % p))  # B x C x H' x W', multiples of p
        e = self.embed(x)  # B x E x H'/p x W'/p
        return self.restore(self.mixer(e))[..., :h, :w]  # B x C x H x W


def relative_norm(part: Tensor, x: Tensor) -> Tensor:
    """``||part|| / ||x||`` over the whole tensor (detached; 0 for a zero ``x``)."""
    part, x = part.detach().float(), x.detach().float()
    return torch.linalg.vector_norm(part) / torch.linalg.vector_norm(x).clamp_min(1e-12)
