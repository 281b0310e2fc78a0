"""Reference clip decoders the loader suite measures ours against.

Each takes the bytes (or path) of one video and the clip's fast frame ids and
returns the cropped clip, doing what the named project does:

* ``slowfast_style``: PySlowFast's ``pyav_decode`` — seek to the keyframe
  before the clip start minus a 1024-pts margin, decode every frame up to
  the clip end, convert *every* decoded frame to RGB, pick frames with
  ``torch.linspace``, then short-side scale and crop the whole clip.
* ``decord_style``: mmaction2's ``DecordDecode`` — ``VideoReader.get_batch``
  on the frame ids, then the same spatial transform.
* ``codec_limit``: a bare PyAV decode of exactly the frame span the clip
  needs, from the keyframe before it, no conversion: what the codec costs.
"""
from __future__ import annotations

import io

import av
import numpy as np
import torch
import torch.nn.functional as F


def _open(src):
    return av.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src)


def _spatial(frames: torch.Tensor, crop: int, rng: np.random.Generator) -> torch.Tensor:
    """PySlowFast train transform on uint8 [T, H, W, 3]: random short-side
    scale in [crop*8/7, crop*10/7], random crop, flip."""
    x = frames.permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    size = int(rng.integers(round(crop * 8 / 7), round(crop * 10 / 7) + 1))
    nh, nw = (size, int(w * size / h)) if h < w else (int(h * size / w), size)
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False)
    y0, x0 = int(rng.integers(0, nh - crop + 1)), int(rng.integers(0, nw - crop + 1))
    x = x[..., y0:y0 + crop, x0:x0 + crop]
    return x.flip(-1) if rng.integers(0, 2) else x


def slowfast_style(src, frame_ids: np.ndarray, fps: float, crop: int, rng: np.random.Generator) -> torch.Tensor:
    with _open(src) as container:
        stream = container.streams.video[0]
        tb = float(stream.time_base)
        start_pts = int(frame_ids[0] / fps / tb)
        end_pts = int(frame_ids[-1] / fps / tb)
        container.seek(max(start_pts - 1024, 0), any_frame=False, backward=True, stream=stream)
        frames = {}
        for frame in container.decode(stream):
            if frame.pts < start_pts:
                continue
            frames[frame.pts] = frame
            if frame.pts >= end_pts:
                break
        rgb = [frames[p].to_rgb().to_ndarray() for p in sorted(frames)]  # every decoded frame converted
    clip = torch.as_tensor(np.stack(rgb))
    index = torch.linspace(0, clip.shape[0] - 1, len(frame_ids)).clamp(0, clip.shape[0] - 1).long()
    return _spatial(torch.index_select(clip, 0, index), crop, rng)


def decord_style(src, frame_ids: np.ndarray, fps: float, crop: int, rng: np.random.Generator) -> torch.Tensor:
    import decord
    reader = decord.VideoReader(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src, num_threads=1)
    frames = reader.get_batch([int(i) for i in frame_ids]).asnumpy()
    return _spatial(torch.from_numpy(frames), crop, rng)


def codec_limit(src, frame_ids: np.ndarray, fps: float, crop: int, rng: np.random.Generator) -> int:
    with _open(src) as container:
        stream = container.streams.video[0]
        tb = float(stream.time_base)
        first, last = int(frame_ids.min()), int(frame_ids.max())
        if first:
            container.seek(int(first / fps / tb), any_frame=False, backward=True, stream=stream)
        n = 0
        for frame in container.decode(stream):
            n += 1
            if frame.pts is not None and round(frame.pts * tb * fps) >= last:
                break
    return n
