"""RoIAlign with the semantics of ``torchvision.ops.roi_align``.

When torchvision's compiled op is importable it is used as is; otherwise
:func:`roi_align_torch` computes the same values in plain torch, following
torchvision/csrc/ops/cpu/roi_align_kernel.cpp and roi_align_common.h:

* a box is scaled by ``spatial_scale`` and, when ``aligned``, shifted by -0.5;
  without ``aligned`` its width and height are at least 1;
* each output bin averages a grid of ``sampling_ratio`` x ``sampling_ratio``
  points, or ``ceil(roi_h / out_h)`` x ``ceil(roi_w / out_w)`` when
  ``sampling_ratio <= 0`` (an empty grid gives 0);
* a point is bilinearly interpolated: 0 when ``y < -1``, ``y > height`` (or the
  same for x); else y is clamped at 0 and, from ``height - 1`` on, to the last row.

The torch version uses that every factor is separable: the clamps and the zero
rule act on y and x independently and the grid is a product, so a box's output
is ``Ay @ feature @ Ax^T`` with Ay [out_h, H] and Ax [out_w, W] holding the
grid-averaged interpolation weights. The weights are built without a Python
loop over boxes or bins, and gradients reach the input through the matmuls (the
boxes get none, as in torchvision).
"""
from __future__ import annotations

import functools
import logging

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


@functools.cache
def _torchvision_roi_align():
    """torchvision.ops.roi_align when its compiled op loads, else None."""
    try:
        import torchvision.ops
        torch.ops.torchvision.roi_align  # raises when the compiled ops are missing
    except Exception as e:  # a torchvision built for another torch raises RuntimeError/AttributeError, not ImportError
        log.debug("torchvision.ops.roi_align is unavailable (%s); using the torch implementation", e)
        return None
    return torchvision.ops.roi_align


def _pair(size) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(h), int(w)


def _as_rois(boxes, input: Tensor) -> Tensor:
    """[K, 5] (batch index, x1, y1, x2, y2), from a [K, 5] tensor or a list of
    per-image [L, 4] tensors as torchvision accepts."""
    if isinstance(boxes, (list, tuple)):
        for b in boxes:
            if b.dim() != 2 or b.shape[1] != 4:
                raise ValueError(f"per-image boxes must be [L, 4], got {list(b.shape)}")
        index = torch.cat([torch.full((len(b), 1), i, dtype=input.dtype, device=input.device)
                           for i, b in enumerate(boxes)]) if boxes else input.new_zeros(0, 1)
        boxes = torch.cat([index, torch.cat(list(boxes)).to(input)], 1) if boxes else input.new_zeros(0, 5)
    if boxes.dim() != 2 or boxes.shape[1] != 5:
        raise ValueError(f"boxes must be [K, 5] (batch index, x1, y1, x2, y2), got {list(boxes.shape)}")
    return boxes.to(input)


def _axis_weights(start: Tensor, end: Tensor, pooled: int, size: int, spatial_scale: float, sampling_ratio: int,
                  aligned: bool) -> Tensor:
    """[K, pooled, size]: the grid-averaged interpolation weights along one axis."""
    offset = 0.5 if aligned else 0.0
    start = start * spatial_scale - offset
    length = end * spatial_scale - offset - start
    if not aligned:
        length = length.clamp(min=1.0)  # malformed boxes become 1 x 1
    bin_size = length / pooled
    if sampling_ratio > 0:
        grid = torch.full_like(length, sampling_ratio, dtype=torch.long)
    else:
        grid = torch.nan_to_num(torch.ceil(length / pooled), nan=0.0).clamp(min=0).long()
    k, g = len(start), int(grid.max()) if len(start) else 0
    divisor = grid.clamp(min=1).to(start.dtype)[:, None, None]
    bins = torch.arange(pooled, dtype=start.dtype, device=start.device)[None, :, None]
    steps = torch.arange(g, dtype=start.dtype, device=start.device)[None, None, :]
    # the kernel's order of operations: start + p * bin + (i + .5) * bin / grid
    coord = start[:, None, None] + bins * bin_size[:, None, None] + (steps + 0.5) * bin_size[:, None, None] / divisor
    inside = (coord >= -1.0) & (coord <= size) & (steps < grid[:, None, None])  # False for NaN too
    coord = torch.where(inside, coord.clamp(min=0.0), torch.zeros_like(coord))
    low = coord.long()  # coord >= 0 here, so truncation is floor
    last = low >= size - 1
    low = low.clamp(max=size - 1)
    high = torch.where(last, low, low + 1)
    frac = torch.where(last, torch.zeros_like(coord), coord - low.to(coord.dtype))
    zero = torch.zeros_like(coord)
    w_low = torch.where(inside, 1.0 - frac, zero) / divisor
    w_high = torch.where(inside, frac, zero) / divisor
    weights = coord.new_zeros(k, pooled, size)
    weights.scatter_add_(2, low, w_low).scatter_add_(2, high, w_high)
    return weights


def roi_align_torch(input: Tensor, boxes, output_size, spatial_scale: float = 1.0, sampling_ratio: int = -1,
                    aligned: bool = False) -> Tensor:
    """RoIAlign in plain torch: [N, C, H, W] and boxes [K, 5] -> [K, C, out_h, out_w]."""
    if input.dim() != 4:
        raise ValueError(f"input must be [N, C, H, W], got {list(input.shape)}")
    rois = _as_rois(boxes, input)
    out_h, out_w = _pair(output_size)
    n, c, h, w = input.shape
    k = len(rois)
    if k == 0 or c == 0 or h == 0 or w == 0:
        return input.new_zeros(k, c, out_h, out_w) + input.reshape(-1)[:0].sum()  # an empty sum keeps the graph
    # weights in float32 at least: the kernel computes coordinates in the input's type
    cdtype = input.dtype if input.dtype in (torch.float32, torch.float64) else torch.float32
    with torch.no_grad():
        r = rois.to(cdtype)
        batch = r[:, 0].long()
        if bool((batch < 0).any()) or bool((batch >= n).any()):
            raise ValueError(f"box batch indices must lie in [0, {n}), got {sorted(set(batch.tolist()))}")
        ay = _axis_weights(r[:, 2], r[:, 4], out_h, h, spatial_scale, sampling_ratio, aligned)  # [K, oh, H]
        ax = _axis_weights(r[:, 1], r[:, 3], out_w, w, spatial_scale, sampling_ratio, aligned)  # [K, ow, W]
        # rows of the batch stacked: box k reads only image batch[k]'s rows
        ay_all = ay.new_zeros(k, out_h, n, h)
        ay_all[torch.arange(k, device=ay.device), :, batch] = ay
        ay_all, ax = ay_all.reshape(k * out_h, n * h).to(input.dtype), ax.to(input.dtype)
    rows = ay_all @ input.permute(0, 2, 1, 3).reshape(n * h, c * w)  # [K * oh, C * W]
    out = rows.reshape(k, out_h * c, w) @ ax.transpose(1, 2)  # [K, oh * C, ow]
    return out.reshape(k, out_h, c, out_w).permute(0, 2, 1, 3).contiguous()


def roi_align(input: Tensor, boxes, output_size, spatial_scale: float = 1.0, sampling_ratio: int = -1,
              aligned: bool = False) -> Tensor:
    """torchvision.ops.roi_align's signature and values: ``boxes`` is [K, 5]
    (batch index, x1, y1, x2, y2 in input-image pixels) or a list of per-image
    [L, 4] tensors; returns [K, C, out_h, out_w]."""
    op = _torchvision_roi_align()
    if op is not None:
        return op(input, _as_rois(boxes, input), _pair(output_size), spatial_scale, sampling_ratio, aligned)
    return roi_align_torch(input, boxes, output_size, spatial_scale, sampling_ratio, aligned)


class RoIAlign(nn.Module):
    """Module form of :func:`roi_align`, as torchvision.ops.RoIAlign."""

    def __init__(self, output_size, spatial_scale: float, sampling_ratio: int, aligned: bool = False):
        super().__init__()
        self.output_size, self.spatial_scale = _pair(output_size), spatial_scale
        self.sampling_ratio, self.aligned = sampling_ratio, aligned

    def forward(self, input: Tensor, rois) -> Tensor:
        return roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}")
