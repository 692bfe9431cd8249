"""Speech front-ends of the two views of :mod:`lit_models.speech_fusion` (spec ``speech_fusion.md`` section 3.1).

- :class:`Conv1dSubsampler`: fairseq's ``Conv1dSubsampler`` for 80-dim FBank: Conv1d(k=5, s=2, p=2) -> GLU per layer,
  so every layer halves the frame rate: ``L' = floor((L - 1) / 2) + 1``; output scaled by sqrt(d_model).
- :class:`SSLProjection`: the SSL view -> d_model: ``discrete`` unit ids -> ``Embedding(K, d) * sqrt(d)``;
  ``continuous`` features -> ``LayerNorm -> Linear(d_ssl, d)``.
- :func:`align_frames`: per-utterance adaptive average pooling of the valid SSL frames to the FBank branch's
  post-subsampling length (50 Hz SSL vs 25 Hz FBank after two stride-2 convs: frame t = mean of frames 2t, 2t+1).
  Padding is never pooled.

Pure PyTorch, no Lightning.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Conv1dSubsampler", "SSLProjection", "align_frames", "lengths_to_pad_mask", "subsampled_lengths"]


def lengths_to_pad_mask(lengths: Tensor, max_len: int | None = None) -> Tensor:
    """lengths [B] -> pad mask [B, T] bool, True at padding (T = ``max_len`` or ``lengths.max()``)."""
    t = int(lengths.max()) if max_len is None else int(max_len)
    return torch.arange(t, device=lengths.device)[None, :] >= lengths[:, None]


def subsampled_lengths(lengths: Tensor, num_layers: int) -> Tensor:
    """Frame counts after ``num_layers`` stride-2 convolutions (kernel 5, padding 2): ``L' = (L - 1) // 2 + 1``."""
    out = lengths.clone()
    for _ in range(num_layers):
        out = torch.div(out - 1, 2, rounding_mode="floor") + 1
    return out


class Conv1dSubsampler(nn.Module):
    """fairseq S2T convolutional subsampler (spec 3.1 "FBank front-end").

    Each layer: Conv1d(in, 2 * c_out, kernel k, stride 2, padding k // 2) then GLU over channels; the hidden layers
    have ``channels // 2`` GLU outputs (fairseq: ``mid_channels // 2``), the last ``out_dim``. The output is
    multiplied by sqrt(out_dim) (fairseq's ``embed_scale``).

    Args:
        in_dim: input feature dim (80 FBank bins).
        channels: conv channels of the hidden layers (fairseq ``conv_channels``, 1024 in ``s2t_transformer_s``).
        out_dim: d_model.
        kernel_sizes: one kernel per layer (default two layers of 5).

    Shapes: ``x`` [B, T, in_dim], ``lengths`` [B] -> (``y`` [B, T', out_dim], ``lengths'`` [B]) with
    ``T' = (T - 1) // 2 + 1`` per layer. Frames past a sequence's length are padding and may hold any value.
    """

    def __init__(
        self, in_dim: int = 80, channels: int = 1024, out_dim: int = 256, kernel_sizes: tuple[int, ...] = (5, 5)
    ) -> None:
        super().__init__()
        if not kernel_sizes:
            raise ValueError("kernel_sizes must list at least one kernel")
        n = len(kernel_sizes)
        self.num_layers = n
        self.out_dim = out_dim
        self.convs = nn.ModuleList(
            nn.Conv1d(
                in_dim if i == 0 else channels // 2,
                channels if i < n - 1 else out_dim * 2,
                k,
                stride=2,
                padding=k // 2,
            )
            for i, k in enumerate(kernel_sizes)
        )
        self.scale = math.sqrt(out_dim)

    def forward(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, T, in_dim], lengths [B] -> (y [B, T', out_dim] * sqrt(out_dim), lengths' [B])."""
        h = x.transpose(1, 2)  # B x C x T
        for conv in self.convs:
            h = F.glu(conv(h), dim=1)
        return h.transpose(1, 2) * self.scale, subsampled_lengths(lengths, self.num_layers)


class SSLProjection(nn.Module):
    """Maps the SSL view to d_model (spec 3.1 "SSL view").

    Args:
        ssl_type: ``discrete`` (unit ids [B, T_s] long -> Embedding(num_units, d) * sqrt(d)) or ``continuous``
            (features [B, T_s, in_dim] -> LayerNorm -> Linear(in_dim, d)).
        d_model: output width.
        in_dim: SSL feature dim (continuous only).
        num_units: number of k-means units K (discrete only).

    Raises:
        ValueError: unknown ``ssl_type`` or a missing/invalid size for it.
    """

    def __init__(
        self,
        ssl_type: Literal["discrete", "continuous"],
        d_model: int,
        in_dim: int | None = None,
        num_units: int | None = None,
    ) -> None:
        super().__init__()
        self.ssl_type = ssl_type
        if ssl_type == "discrete":
            if not num_units or num_units < 1:
                raise ValueError(f"ssl_type=discrete needs num_units >= 1, got {num_units}")
            self.embed = nn.Embedding(num_units, d_model)
            nn.init.normal_(self.embed.weight, std=d_model**-0.5)
            self.scale = math.sqrt(d_model)
        elif ssl_type == "continuous":
            if not in_dim or in_dim < 1:
                raise ValueError(f"ssl_type=continuous needs in_dim (ssl_dim) >= 1, got {in_dim}")
            self.norm = nn.LayerNorm(in_dim)
            self.proj = nn.Linear(in_dim, d_model)
        else:
            raise ValueError(f"ssl_type must be 'discrete' or 'continuous', got {ssl_type!r}")

    def forward(self, x: Tensor) -> Tensor:
        """ids [B, T_s] (discrete) or features [B, T_s, in_dim] (continuous) -> [B, T_s, d_model]."""
        if self.ssl_type == "discrete":
            if x.dtype.is_floating_point:
                raise ValueError("ssl_type=discrete expects unit ids (long), got float features")
            return self.embed(x) * self.scale
        if not x.dtype.is_floating_point:
            raise ValueError("ssl_type=continuous expects float features, got integer ids")
        return self.proj(self.norm(x))


def align_frames(x: Tensor, lengths: Tensor, target_lengths: Tensor, target_max: int | None = None) -> Tensor:
    """Adaptive average pooling of each utterance's valid frames to its target length (spec 3.1 "Rate alignment").

    Output frame t of utterance b is the mean of input frames ``[floor(t * L / T), ceil((t + 1) * L / T))`` of
    its valid part (``L = lengths[b]``, ``T = target_lengths[b]``; PyTorch's ``adaptive_avg_pool1d`` bins), so with
    L = 2T frame t is ``(x[2t] + x[2t+1]) / 2`` exactly. Padding frames never enter a mean; output rows past
    ``target_lengths[b]`` are zero.

    Args:
        x: [B, L_max, d].
        lengths: valid input frames [B] (>= 1).
        target_lengths: wanted output frames [B] (>= 1).
        target_max: output time size (default ``target_lengths.max()``).

    Returns:
        [B, target_max, d].

    Vectorised over the batch (no per-utterance loop): bin sums are differences of a float64 prefix sum, gathered at
    the bin edges, so the result matches ``adaptive_avg_pool1d`` per utterance to float32 rounding.
    """
    bsz, _, d = x.shape
    t_max = int(target_lengths.max()) if target_max is None else int(target_max)
    n = lengths.to(x.device).long().view(bsz, 1)
    t = target_lengths.to(x.device).long().clamp(min=1).view(bsz, 1)
    steps = torch.arange(t_max, device=x.device).view(1, t_max)
    start = torch.div(steps * n, t, rounding_mode="floor")  # floor(t * L / T)
    end = torch.div((steps + 1) * n + t - 1, t, rounding_mode="floor")  # ceil((t + 1) * L / T)
    valid = steps < target_lengths.to(x.device).view(bsz, 1)
    start, end = torch.where(valid, start, 0), torch.where(valid, end, 0)
    csum = F.pad(x.double().cumsum(dim=1), (0, 0, 1, 0))  # B x (L+1) x d, csum[:, i] = sum of frames < i

    def take(idx: Tensor) -> Tensor:
        return csum.gather(1, idx.unsqueeze(-1).expand(bsz, t_max, d))

    count = (end - start).clamp(min=1).unsqueeze(-1).double()
    out = (take(end) - take(start)) / count
    return out.masked_fill(~valid.unsqueeze(-1), 0.0).to(x.dtype)
