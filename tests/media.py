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


def write_coded_video(path: Path, num_frames: int, fps: int = 30, height: int = 96, width: int = 128) -> Path:
    """Lossless (FFV1, RGB) video whose frame i codes i."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("ffv1", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "bgr0"
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(coded_frame(i, height, width), format="rgb24")
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
