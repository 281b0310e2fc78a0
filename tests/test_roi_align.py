"""vthcl.roi_align against a plain-Python transcription of torchvision's CPU kernel."""
from __future__ import annotations

import math

import pytest
import torch

from vthcl.roi_align import RoIAlign, _torchvision_roi_align, roi_align, roi_align_torch


def reference(input: torch.Tensor, rois: torch.Tensor, out_h: int, out_w: int, spatial_scale: float,
              sampling_ratio: int, aligned: bool) -> torch.Tensor:
    """roi_align_forward_kernel_impl + pre_calc_for_bilinear_interpolate, loop for loop, in Python floats."""
    x = input.double().tolist()
    _, channels, height, width = input.shape
    out = torch.zeros(len(rois), channels, out_h, out_w, dtype=torch.float64)

    def bilinear(img, y, xx):
        if not (y >= -1.0 and y <= height and xx >= -1.0 and xx <= width):
            return 0.0
        y, xx = max(y, 0.0), max(xx, 0.0)
        y_low, x_low = int(y), int(xx)
        if y_low >= height - 1:
            y_high = y_low = height - 1
            y = float(y_low)
        else:
            y_high = y_low + 1
        if x_low >= width - 1:
            x_high = x_low = width - 1
            xx = float(x_low)
        else:
            x_high = x_low + 1
        ly, lx = y - y_low, xx - x_low
        hy, hx = 1.0 - ly, 1.0 - lx
        return (hy * hx * img[y_low][x_low] + hy * lx * img[y_low][x_high]
                + ly * hx * img[y_high][x_low] + ly * lx * img[y_high][x_high])

    for n, roi in enumerate(rois.double().tolist()):
        b = int(roi[0])
        offset = 0.5 if aligned else 0.0
        start_w, start_h = roi[1] * spatial_scale - offset, roi[2] * spatial_scale - offset
        end_w, end_h = roi[3] * spatial_scale - offset, roi[4] * spatial_scale - offset
        roi_w, roi_h = end_w - start_w, end_h - start_h
        if not aligned:
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        bin_h, bin_w = roi_h / out_h, roi_w / out_w
        grid_h = sampling_ratio if sampling_ratio > 0 else int(math.ceil(roi_h / out_h))
        grid_w = sampling_ratio if sampling_ratio > 0 else int(math.ceil(roi_w / out_w))
        count = max(grid_h * grid_w, 1)
        for c in range(channels):
            for ph in range(out_h):
                for pw in range(out_w):
                    val = 0.0
                    for iy in range(grid_h):
                        y = start_h + ph * bin_h + (iy + 0.5) * bin_h / grid_h
                        for ix in range(grid_w):
                            xx = start_w + pw * bin_w + (ix + 0.5) * bin_w / grid_w
                            val += bilinear(x[b][c], y, xx)
                    out[n, c, ph, pw] = val / count
    return out


def random_rois(gen: torch.Generator, n_images: int, height: int, width: int, scale: float) -> torch.Tensor:
    """Boxes in input-image pixels: inside, partly outside, wholly outside, tiny and inverted."""
    h, w = height / scale, width / scale
    rows = []
    for i in range(10):
        x1, y1 = (torch.rand(2, generator=gen) * torch.tensor([w, h]) * 1.4 - torch.tensor([w, h]) * 0.2).tolist()
        bw, bh = (torch.rand(2, generator=gen) * torch.tensor([w, h]) * 0.8).tolist()
        rows.append([i % n_images, x1, y1, x1 + bw, y1 + bh])
    rows += [[0, 2.3, 1.7, 2.5, 1.9],          # tiny: under a pixel
             [1, 3.0, 3.0, 3.0, 3.0],          # zero size
             [0, 5.0, 4.0, 2.0, 1.0],          # x2 < x1
             [1, -3 * w, -2 * h, -w, -h],      # wholly outside
             [0, 0.0, 0.0, w, h]]              # the whole map
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [0, 2, -1])
@pytest.mark.parametrize("spatial_scale", [1.0, 0.5])
def test_matches_the_kernel_loops(aligned, sampling_ratio, spatial_scale):
    gen = torch.Generator().manual_seed(7)
    feat = torch.randn(2, 3, 9, 11, generator=gen, dtype=torch.float64)
    rois = random_rois(gen, 2, 9, 11, spatial_scale)
    want = reference(feat, rois, 3, 4, spatial_scale, sampling_ratio, aligned)
    got = roi_align_torch(feat, rois, (3, 4), spatial_scale, sampling_ratio, aligned)
    assert got.shape == (len(rois), 3, 3, 4)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    got32 = roi_align_torch(feat.float(), rois.float(), (3, 4), spatial_scale, sampling_ratio, aligned)
    torch.testing.assert_close(got32.double(), want, rtol=0, atol=1e-5)


def test_edge_rules_by_hand():
    # A 1 x 1 box on a ramp 0..W-1 along x: unaligned it is read at its centre (x1 + .5), aligned
    # at x1 exactly; points beyond x = W clamp to the last column, beyond W + ... give zeros.
    feat = torch.arange(6, dtype=torch.float64).repeat(1, 1, 4, 1)  # [1, 1, 4, 6], value = x
    one = lambda x1, **kw: roi_align_torch(feat, torch.tensor([[0, x1, 1.0, x1 + 1, 2.0]]), 1, **kw).item()  # noqa: E731
    assert one(2.0) == 2.5
    assert one(2.0, aligned=True) == 2.0
    assert one(5.2) == 5.0           # x = 5.7 >= W - 1: the last column
    assert one(-1.3) == 0.0          # x = -0.8 clamps to 0, the value there is 0
    assert one(-3.0) == 0.0
    assert roi_align_torch(feat + 1, torch.tensor([[0, -2.0, 1.0, -1.0, 2.0]]), 1).item() == 0.0  # x = -1.5 < -1
    assert roi_align_torch(feat + 1, torch.tensor([[0, 6.5, 1.0, 7.5, 2.0]]), 1).item() == 0.0  # x = 7 > W
    assert roi_align_torch(feat + 1, torch.tensor([[0, 5.5, 1.0, 6.5, 2.0]]), 1).item() == 6.0  # x = 6 = W: kept


def test_gradients_flow_to_the_input():
    gen = torch.Generator().manual_seed(3)
    feat = torch.randn(2, 2, 5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 0.5, 0.7, 4.2, 3.9], [1, -1.0, 2.0, 7.0, 6.0], [1, 2.0, 2.0, 2.2, 2.1]],
                        dtype=torch.float64)
    for aligned, ratio in [(False, 0), (True, 2)]:
        assert torch.autograd.gradcheck(lambda f: roi_align_torch(f, rois, (2, 3), 1.0, ratio, aligned), (feat,))
    out = roi_align_torch(feat, rois, 2)
    out.sum().backward()
    assert feat.grad.abs().sum() > 0
    assert roi_align_torch(feat, rois[:0], 2).shape == (0, 2, 2, 2)


def test_list_of_boxes_module_and_bad_boxes():
    gen = torch.Generator().manual_seed(5)
    feat = torch.randn(2, 4, 8, 8, generator=gen)
    per_image = [torch.tensor([[1.0, 1.0, 6.0, 5.0]]), torch.tensor([[0.0, 2.0, 7.0, 7.5], [3.0, 3.0, 4.0, 4.0]])]
    rois = torch.tensor([[0, 1.0, 1.0, 6.0, 5.0], [1, 0.0, 2.0, 7.0, 7.5], [1, 3.0, 3.0, 4.0, 4.0]])
    layer = RoIAlign(2, spatial_scale=0.5, sampling_ratio=0, aligned=True)
    torch.testing.assert_close(layer(feat, per_image), roi_align(feat, rois, 2, 0.5, 0, True))
    assert "aligned=True" in repr(layer)
    with pytest.raises(ValueError, match="batch indices"):
        roi_align_torch(feat, torch.tensor([[2, 0.0, 0.0, 1.0, 1.0]]), 2)
    with pytest.raises(ValueError, match=r"\[K, 5\]"):
        roi_align_torch(feat, torch.zeros(3, 4), 2)


@pytest.mark.skipif(_torchvision_roi_align() is None, reason="torchvision.ops does not load beside this torch")
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_matches_torchvision(aligned, sampling_ratio):
    gen = torch.Generator().manual_seed(11)
    feat = torch.randn(2, 3, 9, 11, generator=gen)
    rois = random_rois(gen, 2, 9, 11, 0.5).float()
    torch.testing.assert_close(roi_align_torch(feat, rois, 3, 0.5, sampling_ratio, aligned),
                               _torchvision_roi_align()(feat, rois, (3, 3), 0.5, sampling_ratio, aligned),
                               rtol=0, atol=1e-5)
