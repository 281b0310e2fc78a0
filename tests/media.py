"""Test media made with PyAV: frame-number-coded videos and non-video inputs."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

STEP = 16  # colour spacing: survives lossy YUV round trips of +-7 levels


def coded_frame(i: int, height: int = 96, width: int = 128) -> np.ndarray:
    """Uniform colour coding i (R: i // 16, G: i % 16) plus a horizontal
    gradient in B, so any crop still reads the number and shows its position."""
    img = np.empty((height, width, 3), np.uint8)
    img[..., 0] = (i // STEP) * STEP + STEP // 2
    img[..., 1] = (i % STEP) * STEP + STEP // 2
    img[..., 2] = np.linspace(0, 255, width, dtype=np.float32).round().astype(np.uint8)[None, :]
    return img


def read_frame_number(rgb: np.ndarray) -> int:
    """Inverse of coded_frame for an [..., H, W, 3] or [3, H, W]-like image (channel axis given)."""
    r, g = float(np.mean(rgb[0])), float(np.mean(rgb[1]))
    return int(round((r - STEP // 2) / STEP)) * STEP + int(round((g - STEP // 2) / STEP))


LONG_STEP = 64  # the third digit's spacing (in B): survives +-31 levels


def long_coded_frame(i: int, height: int = 96, width: int = 128) -> np.ndarray:
    """Uniform colour coding i < 1024 in three digits: R: i // 64, G: (i // 4) % 16
    (steps of 16), B: i % 4 (steps of 64); no gradient (for long videos)."""
    if not 0 <= i < 1024:
        raise ValueError(f"long_coded_frame codes 0..1023, not {i}")
    img = np.empty((height, width, 3), np.uint8)
    img[..., 0] = (i // 64) * STEP + STEP // 2
    img[..., 1] = ((i // 4) % 16) * STEP + STEP // 2
    img[..., 2] = (i % 4) * LONG_STEP + LONG_STEP // 2
    return img


def read_long_frame_number(rgb: np.ndarray) -> int:
    """Inverse of long_coded_frame for a [3, ...] image (channel axis first)."""
    r, g, b = (float(np.mean(rgb[c])) for c in range(3))
    digit = lambda v, step, top: min(top, max(0, int(round((v - step // 2) / step))))  # noqa: E731
    return digit(r, STEP, 15) * 64 + digit(g, STEP, 15) * 4 + digit(b, LONG_STEP, 3)


def write_coded_video(path: Path, num_frames: int, fps: int = 30, height: int = 96, width: int = 128,
                      long: bool = False, codec: str = "ffv1", options: dict | None = None) -> Path:
    """A video whose frame i codes i (``long``: up to 1023 frames, no gradient):
    lossless FFV1 RGB by default; another ``codec`` (libx264, libvpx, ...)
    with its ``options`` in 4:2:0 (the codes survive its losses)."""
    code = long_coded_frame if long else coded_frame
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "bgr0" if codec == "ffv1" else "yuv420p"
        stream.options = options or {}
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(code(i, height, width), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def write_audio_only(path: Path, seconds: float = 1.0) -> Path:
    """An MP4 with one AAC audio stream and no video."""
    rate = 44100
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=rate)
        samples = int(rate * seconds)
        t = np.arange(samples) / rate
        wave = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None, :]
        frame = av.AudioFrame.from_ndarray(wave, format="fltp", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path
