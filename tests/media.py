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


XL_FRAMES = 2048  # what xl_coded_frame codes


def xl_coded_frame(i: int, height: int = 48, width: int = 64) -> np.ndarray:
    """Uniform colour coding i < 2048 in three digits of 16 levels a step apart
    (R: i // 128, G: (i // 8) % 16) and 8 levels two steps apart (B: i % 8),
    for long videos (source rates and spans over thousands of frames)."""
    if not 0 <= i < XL_FRAMES:
        raise ValueError(f"xl_coded_frame codes 0..{XL_FRAMES - 1}, not {i}")
    img = np.empty((height, width, 3), np.uint8)
    img[..., 0] = (i // 128) * STEP + STEP // 2
    img[..., 1] = ((i // 8) % 16) * STEP + STEP // 2
    img[..., 2] = (i % 8) * 2 * STEP + STEP
    return img


def read_xl_frame_number(rgb: np.ndarray) -> int:
    """Inverse of xl_coded_frame for a [3, ...] image (channel axis first)."""
    r, g, b = (float(np.mean(rgb[c])) for c in range(3))
    digit = lambda v, step, offset, top: min(top, max(0, int(round((v - offset) / step))))  # noqa: E731
    return digit(r, STEP, STEP // 2, 15) * 128 + digit(g, STEP, STEP // 2, 15) * 8 + digit(b, 2 * STEP, STEP, 7)


def write_coded_video(path: Path, num_frames: int, fps: int = 30, height: int = 96, width: int = 128,
                      long: bool | str = False, codec: str = "ffv1", options: dict | None = None,
                      pix_fmt: str | None = None, times: list[float] | None = None, **kw) -> Path:
    """A video whose frame i codes i (``long``: up to 1023 frames, no gradient;
    ``long="xl"``: up to 2047): lossless FFV1 RGB by default; another
    ``codec`` (libx264, libvpx, ...) with its ``options`` in ``pix_fmt``
    (default 4:2:0; the codes survive its losses). ``times``: presentation
    times in seconds (variable frame rate). Other keywords go to
    :func:`write_video`."""
    code = xl_coded_frame if long == "xl" else long_coded_frame if long else coded_frame
    return write_video(path, (code(i, height, width) for i in range(num_frames)), fps, codec, options,
                       pix_fmt or ("bgr0" if codec == "ffv1" else "yuv420p"), times, **kw)


def write_video(path: Path, frames, fps: int = 30, codec: str = "libx264", options: dict | None = None,
                pix_fmt: str = "yuv420p", times: list[float] | None = None, rotation: tuple | None = None,
                sar: Fraction | None = None, fmt: str | None = None) -> Path:
    """RGB frames [H, W, 3] written with ``codec`` in ``pix_fmt``; ``times``
    (seconds) for a variable frame rate; ``rotation`` = (degrees, hflip,
    vflip) written as the container's display matrix; ``sar``: a sample
    aspect ratio (non-square pixels); ``fmt``: the container format."""
    frames = iter(frames)
    first = next(frames)
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.height, stream.width = first.shape[:2]
        stream.pix_fmt = pix_fmt
        stream.options = options or {}
        if rotation:
            stream.set_display_rotation(rotation[0], hflip=rotation[1], vflip=rotation[2])
        if sar:
            stream.codec_context.sample_aspect_ratio = sar
        tb = Fraction(1, 1000) if times else Fraction(1, fps)
        for i, img in enumerate([first, *frames]):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            frame.pts, frame.time_base = (round(times[i] * 1000) if times else i), tb
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


QUADRANTS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255))  # top-left, top-right, bottom-left, -right


def quadrant_frame(height: int = 64, width: int = 96) -> np.ndarray:
    """Red, green / blue, white quadrants: which way up a frame is shown."""
    img = np.empty((height, width, 3), np.uint8)
    for k, colour in enumerate(QUADRANTS):
        r, c = divmod(k, 2)
        img[r * height // 2:(r + 1) * height // 2, c * width // 2:(c + 1) * width // 2] = colour
    return img


def read_quadrants(rgb: np.ndarray) -> list[tuple[int, ...]]:
    """The colours (0/255 per channel) of an [H, W, 3] image's four quadrants, as QUADRANTS orders them."""
    h, w = rgb.shape[:2]
    return [tuple(int(v) for v in np.round(rgb[a:b, c:d].reshape(-1, 3).mean(0) / 255) * 255)
            for a, b in ((0, h // 2), (h // 2, h)) for c, d in ((0, w // 2), (w // 2, w))]


def stored_for_display(upright: np.ndarray, degrees: int, hflip: bool, vflip: bool) -> np.ndarray:
    """The frame to store so that a player, applying the display matrix of
    ``set_display_rotation(degrees, hflip, vflip)`` (rotate counter-clockwise,
    then mirror), shows ``upright``."""
    x = upright[:, ::-1] if hflip else upright
    x = x[::-1] if vflip else x
    return np.ascontiguousarray(np.rot90(x, -(degrees // 90)))


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
