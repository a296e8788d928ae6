"""All4One's centroid: self-attention over a sequence of neighbour embeddings, read out at its first token.

Paper: Estepa, Sarasua, Nagarajan, Radeva, "All4One: Symbiotic Neighbour Contrastive Learning via Self-Attention
and Redundancy Reduction", ICCV 2023, https://arxiv.org/abs/2303.09417. Official code: github.com/ImaGonEs/all4one,
upstreamed as vturrisi/solo-learn ``solo/methods/all4one.py`` (transformer) and ``solo/utils/positional_encodings.py``
(the position code, a vendored copy of the ``positional-encodings`` package).

For a sequence of ``k`` tokens ``X`` (``B x k x D``: the ``k`` nearest neighbours of a sample, most similar first)::

    centroid(X) = T(X + P)[:, 0]                                          # BxD

with ``T`` a stack of ``nn.TransformerEncoderLayer`` (post-norm, ReLU, batch-first) and ``P`` (``k x D``) a fixed
sinusoidal code, one vector per token position (:func:`sinusoidal_token_code`). All4One's "shift operation" feeds
the sample's own prediction in front of its first ``k - 1`` neighbours, :meth:`CentroidTransformer.shift`.

Defaults and sources: 3 layers, 8 heads, feed-forward width ``2 * D`` (512 at ``D = 256``), dropout 0.1: official
code (``dim_feedforward=proj_output_dim * 2``); ``k = 5`` tokens: official code (hard-coded there).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from contrastkit.validation import positive_int

__all__ = ["CentroidTransformer", "sinusoidal_token_code"]


def sinusoidal_token_code(tokens: int, dim: int) -> Tensor:
    """The fixed additive code of All4One's token positions, ``tokens x dim`` (float32).

    The official code adds ``PositionalEncodingPermute1D(k)`` of the ``positional-encodings`` package to the
    ``B x k x D`` sequence. That class reads its input as ``(batch, channels, x)``: the ``k`` tokens are its
    "channels" and the ``D`` features its "positions". So token ``t`` gets, at feature ``d = 0 .. D-1``::

        P[t, d] = sin(d * w_i) if t is even else cos(d * w_i),   i = t // 2,   w_i = 10000 ** (-2 i / c)

    with ``c = 2 * ceil(k / 2)``; for ``k = 5``: ``w = 1, 10000^(-1/3), 10000^(-2/3)`` and the tokens get
    ``sin(d), cos(d), sin(d w_1), cos(d w_1), sin(d w_2)``. It is not the usual code (position along the sequence,
    frequency along the features), but it is still a fixed, distinct vector per token, which is all the
    transformer needs to tell the first token from the others; we keep it as the code computes it.
    """
    tokens, dim = positive_int(tokens, "tokens"), positive_int(dim, "dim")
    channels = 2 * math.ceil(tokens / 2)
    t = torch.arange(tokens, dtype=torch.float64)  # k
    freq = 10000.0 ** (-2.0 * torch.div(t, 2, rounding_mode="floor") / channels)  # k
    angle = freq[:, None] * torch.arange(dim, dtype=torch.float64)[None, :]  # kxD
    code = torch.where((t % 2 == 0)[:, None], torch.sin(angle), torch.cos(angle))  # kxD
    return code.float()


class CentroidTransformer(nn.Module):
    """A transformer encoder that summarises ``k`` tokens into one "centroid" (the output at the first token).

    ``forward(tokens)`` maps ``B x k x D`` to ``B x D``: ``T(tokens + P)[:, 0]`` (see the module docstring). Usable
    on its own, e.g. ``CentroidTransformer(256)(neighbours)`` for neighbours from
    :func:`contrastkit.models.nearest_neighbours` with ``k=5``.

    Args:
        dim: Token width ``D`` (All4One: the projection width, 256), divisible by ``heads``.
        tokens: Sequence length ``k`` (the number of neighbours). Default 5 (official code).
        layers: Encoder layers. Default 3 (official code).
        heads: Attention heads. Default 8 (official code).
        ffn_dim: Feed-forward width. Default None: ``2 * dim`` (official code).
        dropout: Dropout of the encoder layers. Default 0.1 (official code). Drawn from torch's global generator.
    """

    position_code: Tensor

    def __init__(self, dim: int, tokens: int = 5, layers: int = 3, heads: int = 8, ffn_dim: int | None = None,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.dim = positive_int(dim, "dim")
        self.tokens = positive_int(tokens, "tokens")
        heads = positive_int(heads, "heads")
        if dim % heads:
            raise ValueError(f"the token width {dim} must be divisible by the number of heads {heads}")
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=ffn_dim or 2 * dim, dropout=dropout,
                                           batch_first=True)
        # nn.TransformerEncoder clones the layer (every layer starts from the same weights, as in the official code)
        self.encoder = nn.TransformerEncoder(layer, positive_int(layers, "layers"), enable_nested_tensor=False)
        # fixed, so not saved in checkpoints (rebuilt from tokens and dim)
        self.register_buffer("position_code", sinusoidal_token_code(tokens, dim), persistent=False)  # kxD

    def extra_repr(self) -> str:
        return f"dim={self.dim}, tokens={self.tokens}"

    def forward(self, tokens: Tensor) -> Tensor:
        """``B x k x D`` tokens -> ``B x D``: the encoder's output at the first token, after adding the code."""
        if tokens.ndim != 3 or tokens.shape[1:] != (self.tokens, self.dim):
            raise ValueError(f"tokens must have shape (B, {self.tokens}, {self.dim}), got {tuple(tokens.shape)}")
        return self.encoder(tokens + self.position_code.to(tokens.dtype))[:, 0]  # BxD

    def shift(self, own: Tensor, neighbours: Tensor) -> Tensor:
        """All4One's shift operation: the sequence ``[own, neighbours[:, 0], ..., neighbours[:, k-2]]``, ``B x k x D``.

        Args:
            own: ``B x D``, the sample's own embedding (All4One: the second predictor's output).
            neighbours: ``B x k x D``, its neighbours, most similar first; the last one is dropped.
        """
        dtype = torch.promote_types(own.dtype, neighbours.dtype)  # a half-precision prediction joins float32 rows
        return torch.cat([own.unsqueeze(1).to(dtype), neighbours[:, : self.tokens - 1].to(dtype)], dim=1)  # BxkxD

    def shifted(self, own: Tensor, neighbours: Tensor) -> Tensor:
        """The centroid of the shifted sequence :meth:`shift`, ``B x D``."""
        return self(self.shift(own, neighbours))  # BxD
