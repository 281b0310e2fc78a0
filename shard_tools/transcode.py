"""Turn one input video into one packed shard member, or say why it cannot be.

`transcode(path, settings)` returns ``(data, meta)``: the encoded member (a
fragmented MP4 holding H.264 or VP9, one fragment per GOP; or the untouched
stream for ``codec="copy"``) and the facts the loaders need (``num_frames``
counted from what was encoded, ``fps``, ``width``, ``height``, ``codec``,
``duration``, and ``fragments``: where each fragment starts, in bytes and
frames, so a loader decodes a window from its fragments alone — see
:mod:`loaders.fragments`).
Anything wrong with the input raises :class:`BadVideo` with a reason a person
understands; make_shards writes that reason to ``failed.jsonl``.

Output frame rate is constant: input frames are placed on the output grid by
their presentation time (nearest slot, as FFmpeg's ``fps`` filter does), so
variable-frame-rate input is duplicated/dropped into a steady ``fps``. GOPs are
closed with a keyframe every ``gop`` frames so a clip decode starts at most
``gop - 1`` frames before its window, and each GOP is one fragment of the MP4.
``codec="copy"`` keeps the source's GOPs (irregular or open): the stream is
re-muxed into a fragmented MP4 with a fragment at each keyframe, and every
fragment is decoded alone and compared with the whole decode; where one does
not decode to the same frames (an open GOP, a keyframe that is not an IDR) or
the codec has no fragmented-MP4 mapping, the member is decoded whole by the
loaders (``meta["window_cut"]`` False, with the reason).
"""
from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import io
import itertools
import math
import os
import re
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Iterator

import av
import av.logging
import numpy as np
from av.sidedata.sidedata import Type as SideDataType
from av.video.frame import PictureType
from av.video.reformatter import VideoReformatter

from loaders.fragments import Fragments, whole_member
from shard_tools import fmp4
from shard_tools.sources import IMAGE_EXTS

# container / member extension for each output codec: fragmented MP4 for both
MEMBER_EXT = {"h264": "mp4", "vp9": "mp4"}
ENCODER = {"h264": "libx264", "vp9": "libvpx-vp9"}
_DEFAULT_CRF = {"h264": 23, "vp9": 32}
# image demuxers: a lone picture is not a video
_IMAGE_FORMATS = {"image2", "png_pipe", "jpeg_pipe", "bmp_pipe", "webp_pipe", "gif", "tiff_pipe"}


class BadVideo(Exception):
    """The input cannot be packed; ``str(exc)`` is the reason for failed.jsonl."""


@dataclass(frozen=True)
class EncodeSettings:
    codec: str = "h264"          # h264 | vp9 | copy
    fps: float | None = 30.0     # None: keep (copy only)
    short_side: int | None = 256  # None or 0: keep the size (even dimensions)
    gop: int = 16
    crf: int | None = None       # None: codec default (h264 23, vp9 32)
    preset: str = "veryfast"     # x264 preset; vp9 uses realtime/cpu-used 8
    bframes: int | None = None   # x264 B-frames; None: the preset's (3 for veryfast)
    b_refs: bool = False         # x264's B-pyramid + adaptive B placement; off: every B-frame is disposable
    threads: int = 1             # codec threads per worker process
    min_frames: int = 1
    square_pixels: bool = False  # stretch non-square pixels to their display aspect (default: keep the grid)
    frame_rate: float | None = None  # the rate of videos given as folders of numbered frames

    def as_dict(self) -> dict:
        return asdict(self)


def output_size(width: int, height: int, short_side: int | None) -> tuple[int, int]:
    """Scale so the short side is ``short_side`` (aspect kept), both sides even."""
    def even(x: float) -> int:
        return max(2, int(round(x / 2)) * 2)

    if not short_side:
        return even(width), even(height)
    short = even(short_side)
    if width <= height:
        return short, even(height * short / width)
    return even(width * short / height), short


def _open(path: str):
    if os.path.islink(path) and not os.path.exists(path):
        raise BadVideo("unreadable: broken symbolic link")
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise BadVideo("missing: the file does not exist") from None
    except OSError as e:
        raise BadVideo(f"unreadable: {e.strerror or e}") from None
    if size == 0:
        raise BadVideo("empty file (0 bytes)")
    if not os.access(path, os.R_OK):
        raise BadVideo("unreadable: permission denied")
    try:
        container = av.open(path, metadata_errors="ignore")
    except PermissionError:
        raise BadVideo("unreadable: permission denied") from None
    except av.error.FFmpegError as e:
        raise BadVideo(f"cannot open it as a video (FFmpeg: {_msg(e)}): not a video file, "
                       "or truncated/corrupt") from None
    except OSError as e:
        if e.errno == errno.EACCES:
            raise BadVideo("unreadable: permission denied") from None
        raise BadVideo(f"unreadable: {e}") from None
    if container.format.name in _IMAGE_FORMATS:
        container.close()
        raise BadVideo(f"not a video: a still image ({container.format.name})")
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams})
        container.close()
        if "audio" in kinds:
            raise BadVideo("no video stream (audio only)")
        raise BadVideo(f"no video stream (streams: {', '.join(kinds) or 'none'})")
    return container


def video_stream(container):
    """The video stream to pack: FFmpeg's best video stream that is not an
    attached picture (cover art is a one-frame "video" stream in MP4/MKV)."""
    pictures = {s.index for s in container.streams.video if s.disposition & av.stream.Disposition.attached_pic}
    candidates = [s for s in container.streams.video if s.index not in pictures]
    if not candidates:
        raise BadVideo("no video stream (only an attached picture: cover art)")
    best = container.streams.best("video")
    return best if best is not None and best.index not in pictures else candidates[0]


# the eight orientations of a display matrix, as ops on [H, W] planes (rows top to bottom)
ORIENTATIONS = {
    "upright": lambda p: p, "hflip": lambda p: p[:, ::-1], "vflip": lambda p: p[::-1],
    "rot180": lambda p: p[::-1, ::-1], "cw": lambda p: np.rot90(p, -1), "ccw": lambda p: np.rot90(p, 1),
    "transpose": lambda p: p.T, "antitranspose": lambda p: p[::-1, ::-1].T,
}


def orientation(matrix) -> str:
    """The op that shows frames as a player does, for a display matrix (9
    int32 in FFmpeg's layout, or None): one of ORIENTATIONS, decided as
    FFmpeg's own autorotation does (fftools: rotation from
    av_display_rotation_get, flips from the matrix's signs). A rotation that
    is not a multiple of 90 degrees raises BadVideo."""
    if matrix is None:
        return "upright"
    m = [v / 65536 for v in matrix[:6]]
    s0, s1 = math.hypot(m[0], m[3]), math.hypot(m[1], m[4])
    if s0 == 0 or s1 == 0:
        raise BadVideo(f"corrupt: a display matrix that maps the frame to nothing ({list(matrix)})")
    theta = round(math.degrees(math.atan2(m[1] / s1, m[0] / s0)))  # fftools: -av_display_rotation_get()
    theta -= 360 * math.floor(theta / 360 + 0.9 / 360)
    if abs(theta - 90) < 1:
        return "transpose" if m[3] > 0 else "cw"
    if abs(theta - 180) < 1:
        return {(True, True): "rot180", (True, False): "hflip", (False, True): "vflip",
                (False, False): "upright"}[(m[0] < 0, m[4] < 0)]
    if abs(theta - 270) < 1:
        return "antitranspose" if m[3] < 0 else "ccw"
    if abs(theta) > 1:
        raise BadVideo(f"its display matrix rotates by {theta:g} degrees: not a multiple of 90, so it cannot be "
                       "packed upright")
    return "vflip" if m[4] < 0 else "upright"


def _sample_aspect_ratio(stream) -> Fraction:
    """The stream's pixel aspect (width / height of one pixel); 1 where unset or implausible."""
    sar = stream.codec_context.sample_aspect_ratio or stream.sample_aspect_ratio
    return Fraction(sar).limit_denominator(10000) if sar and 0.1 < float(sar) < 10 else Fraction(1)


def display_matrix(frame):
    """The frame's display matrix (9 ints), or None."""
    data = frame.side_data.get(SideDataType.DISPLAYMATRIX)
    if data is None:
        return None
    raw = bytes(data)
    return tuple(np.frombuffer(raw[:36], "<i4").tolist()) if len(raw) >= 36 else None


def _oriented(frame, op: str):
    """A yuv420p frame with ``op`` applied to each of its planes."""
    if op == "upright":
        return frame
    h, w = frame.height, frame.width
    arr = frame.to_ndarray()  # [h * 3/2, w]: Y, then U and V flattened
    y = arr[:h]
    u, v = (arr[h:].reshape(-1)[k * (h * w // 4):(k + 1) * (h * w // 4)].reshape(h // 2, w // 2) for k in (0, 1))
    y, u, v = (ORIENTATIONS[op](p) for p in (y, u, v))
    out = np.concatenate([y.reshape(-1), u.reshape(-1), v.reshape(-1)]).reshape(-1, y.shape[1])
    return av.VideoFrame.from_ndarray(np.ascontiguousarray(out), format="yuv420p")


def _msg(e: Exception) -> str:
    return getattr(e, "strerror", None) or str(e)


def _input_rate(stream) -> Fraction:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return Fraction(rate) if rate else Fraction(30)


@functools.cache
def x264_asm() -> str:
    """x264's ``asm`` parameter for reproducible output: the CPU features
    x264 detects, less AVX-512 ("" where libx264 cannot be asked; its default).

    On CPUs with AVX-512, x264's AVX-512 code path made the same input encode
    differently from run to run: 2 to 11 distinct outputs in 40-100 transcodes
    of one file in one process (short sides 64 to 256, synthetic and the real
    videos alike; measured with the PyAV 18.1 wheel's x264 core 165). The
    output depended on the heap's state (the same frames, allocated afresh,
    gave another stream), and every variant went away with AVX-512 off, or with
    ``no-mbtree`` / ``rc-lookahead=0`` (which cost 0.5 dB at 7 % fewer
    bytes). Without AVX-512 the bytes and the PSNR of the default settings
    were the same to 0.1 % and 0.01 dB, and the encode no slower. Asked of the
    libx264 this process has loaded (its exported ``x264_cpu_detect`` and
    ``x264_cpu_names``), once per process (a forked child's CPU and library
    are its parent's)."""
    import ctypes
    import glob

    class CpuName(ctypes.Structure):
        _fields_ = [("name", ctypes.c_char_p), ("flags", ctypes.c_uint32)]

    try:
        with open("/proc/self/maps") as f:  # Linux: the libx264 libavcodec loaded
            paths = [line.split()[-1] for line in f if "libx264" in line.rsplit("/", 1)[-1]]
    except OSError:
        paths = []
    base = os.path.dirname(os.path.dirname(av.__file__))
    for bundled in ("av.libs", os.path.join("av", ".dylibs")):  # the wheels' copies (Linux, macOS)
        paths += glob.glob(os.path.join(base, bundled, "libx264*"))
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
            lib.x264_cpu_detect.restype = ctypes.c_uint32
            names = {}
            for entry in (CpuName * 64).in_dll(lib, "x264_cpu_names"):
                if not entry.flags:
                    break
                names[entry.name.decode()] = entry.flags
            detected = lib.x264_cpu_detect()
        except (OSError, AttributeError, ValueError):
            continue
        if "AVX512" not in names or "AVX2" not in names:
            return ""
        avx512 = names["AVX512"] & ~names["AVX2"]  # the table's flags are cumulative
        return f"asm={detected & ~avx512}" if detected & avx512 else ""
    return ""


def x264_params(*params: str) -> str:
    """``x264-params`` joined with ':', ending with :func:`x264_asm`."""
    return ":".join(p for p in (*params, x264_asm()) if p)


def _check_complete(decoded: int, stream) -> None:
    declared = stream.frames or 0
    if declared and decoded < declared - max(2, declared // 20):
        raise BadVideo(
            f"truncated or corrupt: decoded {decoded} of the {declared} frames the container declares"
        )


@contextlib.contextmanager
def _ffmpeg_errors():
    """FFmpeg's error-level log messages while inside, from every thread
    (frame-threaded decoders log from theirs); the log level is restored after."""
    level = av.logging.get_level()
    av.logging.set_level(av.logging.ERROR)
    try:
        with av.logging.Capture(local=False) as logs:
            yield logs
    finally:
        av.logging.set_level(level)


def _decoded_frames(container, stream, whole: bool = True, threaded: bool = True):
    """Yield (time_in_seconds, frame) for every decodable frame, in order
    (``whole``: the caller reads the stream to its end, so a stream that
    decodes to far fewer frames than it declares is refused as truncated).
    ``threaded``: FFmpeg's slice threads, never its frame threads. A frame
    thread works on after a decode call returns, and one that logs an error
    while the decoder is being freed (which holds the GIL) waits for the GIL
    in PyAV's log callback forever: make_shards hung so on corrupt inputs
    (py-spy: the worker in avcodec_free_context, a frame thread in
    logging_log_callback; PyAV issues 751 and 909). Slice threads log only
    inside a decode call, which releases the GIL. Without ``threaded`` the
    decoder runs on this thread alone.

    A decoder that reports an error is not trusted to go on: it conceals the
    damage (the frames come out, wrong), so the video is refused with the
    error, as it is when decoding stops. (Damage a codec cannot see — bytes
    that happen to decode — cannot be told from content by any decoder.)"""
    if threaded:
        stream.thread_type = "SLICE"
    else:
        stream.codec_context.thread_count = 1
    rate = _input_rate(stream)
    n = 0
    with _ffmpeg_errors() as errors:
        try:
            for frame in container.decode(stream):
                if errors:
                    break
                t = frame.time
                yield (float(n / rate) if t is None else t), frame
                n += 1
        except av.error.FFmpegError as e:
            raise BadVideo(f"corrupt: decoding failed after {n} frames ({_msg(e)})") from None
        if errors:
            _, name, message = errors[0]
            raise BadVideo(f"corrupt: the decoder reported {len(errors)} error(s) by frame {n} ({name}: "
                           f"{message.strip()[:120]}): the frames it would conceal are not the video's")
    if whole:
        _check_complete(n, stream)


def resample_times(times_and_frames, fps: float, last_duration: float, origin: float | None = None,
                   slots: int | None = None):
    """Place frames on a constant ``fps`` grid: slot k shows the frame whose
    presentation time rounds to k, or the latest earlier one (duplicates fill
    gaps, later frames win a shared slot). Yields frames.

    The grid starts at the first frame's time, or at ``origin`` (seconds on
    the frames' clock: slot 0 then shows the latest frame at or before it);
    ``slots`` ends it after that many frames, without reading further."""
    t0 = origin
    end = slots if slots is not None else float("inf")
    pending, pending_slot, last_t = None, 0, 0.0
    for t, frame in times_and_frames:
        if t0 is None:
            t0 = t
        slot = int(round((t - t0) * fps))
        if pending is not None:
            for _ in range(pending_slot, min(slot, end)):
                yield pending
            pending_slot = max(pending_slot, slot)
            if pending_slot >= end:
                return
        pending, last_t = frame, t
    if pending is None:
        return
    end_slot = min(end, max(pending_slot + 1, int(round((last_t - t0 + last_duration) * fps))))
    for _ in range(pending_slot, end_slot):
        yield pending


def encoder_options(s: EncodeSettings) -> dict[str, str]:
    """The encoder's options for ``s`` (h264: libx264, vp9: libvpx-vp9)."""
    crf = s.crf if s.crf is not None else _DEFAULT_CRF[s.codec]
    if s.codec == "h264":
        return {
            "crf": str(crf),
            "preset": s.preset,
            "x264-params": x264_params(
                f"keyint={s.gop}:min-keyint={s.gop}:scenecut=0:open-gop=0",
                f"bframes={s.bframes}" if s.bframes is not None else "",
                # no B-frame is a reference: a clip decode skips every one it does not keep
                "" if s.b_refs else "b-pyramid=none:b-adapt=0"),
        }
    return {"crf": str(crf), "b": "0", "deadline": "realtime", "cpu-used": "8",
            "g": str(s.gop), "keyint_min": str(s.gop), "row-mt": "1"}


# a span that starts later than this (seconds) is reached by a seek, not by decoding up to it
_SEEK_AFTER = 10.0


def _span_frames(container, stream, span: tuple[float, float]):
    """(time, frame) from the latest frame at or before ``span[0]`` (seconds
    from the stream's start), reached by a seek to a keyframe before it where
    that is far; and the span's start on the frames' clock."""
    tb = float(stream.time_base)
    zero = (stream.start_time or 0) * tb
    origin = zero + span[0]
    if span[0] > _SEEK_AFTER:
        container.seek(int((origin - 2.0) / tb), stream=stream, backward=True, any_frame=False)
        frames = _decoded_frames(container, stream, whole=False)
        first = next(frames, None)
        if first is not None and first[0] <= origin:
            return itertools.chain([first], frames), origin
        frames.close()  # the seek overshot: decode from the start instead
        container.seek(0, stream=stream, backward=True, any_frame=False)
    return _decoded_frames(container, stream, whole=False), origin


@dataclass
class _Frames:
    """What an encode reads: (time, frame) pairs, the frames' stored size, the source's rate and pixel
    aspect, and where a span starts on the frames' clock (None: at the first frame)."""
    frames: Iterator
    width: int
    height: int
    rate: Fraction
    sar: Fraction = Fraction(1)
    origin: float | None = None


def _stream_frames(container, stream, span: tuple[float, float] | None) -> _Frames:
    width, height = stream.codec_context.width, stream.codec_context.height
    if not width or not height:
        raise BadVideo("corrupt: the video stream has no frame size")
    frames, origin = (_decoded_frames(container, stream), None) if span is None else \
        _span_frames(container, stream, span)
    return _Frames(frames, width, height, _input_rate(stream), _sample_aspect_ratio(stream), origin)


_NUMBER = re.compile(r"(\d+)(?!.*\d)")


def frame_files(folder: str) -> list[str]:
    """The image files of a frame folder in frame order (by the last number in each name)."""
    numbered = []
    for name in os.listdir(folder):
        if os.path.splitext(name)[1].lower() not in IMAGE_EXTS or name.startswith("."):
            continue
        m = _NUMBER.search(os.path.splitext(name)[0])
        if m is None:
            raise BadVideo(f"frame folder: {name} has no frame number in its name")
        numbered.append((int(m.group(1)), name))
    numbered.sort()
    for (a, x), (b, y) in zip(numbered, numbered[1:]):
        if a == b:
            raise BadVideo(f"frame folder: {x} and {y} have the same frame number {a}")
    return [os.path.join(folder, name) for _, name in numbered]


def _folder_frames(folder: str, rate: float, span: tuple[float, float] | None) -> _Frames:
    """A folder of numbered frames as a video at ``rate`` fps: frame k at k / rate (from its first frame)."""
    files = frame_files(folder)
    if not files:
        raise BadVideo("frame folder: no image files (jpg, png, ...)")

    def decode(path: str):
        try:
            with av.open(path) as c:
                frame = next(c.decode(video=0))
                # a copy: the decoded frame's buffers go back to the decoder's pool with its container
                return av.VideoFrame.from_ndarray(frame.to_ndarray(format="rgb24"), format="rgb24")
        except (av.error.FFmpegError, StopIteration) as e:
            raise BadVideo(f"frame folder: {os.path.basename(path)} is not a readable image ({_msg(e)})") from None

    first = decode(files[0])
    start = 0 if span is None else max(0, int(math.floor(span[0] * rate)))

    def frames():
        for k in range(start, len(files)):
            frame = first if k == 0 else decode(files[k])
            if (frame.width, frame.height) != (first.width, first.height):
                raise BadVideo(f"frame folder: {os.path.basename(files[k])} is {frame.width}x{frame.height}, "
                               f"the first frame {first.width}x{first.height}")
            yield k / rate, frame

    return _Frames(frames(), first.width, first.height, Fraction(rate).limit_denominator(1001),
                   origin=None if span is None else span[0])


def _encode(src: _Frames, s: EncodeSettings, span: tuple[float, float] | None = None) -> tuple[bytes, dict]:
    in_w, in_h, origin, slots = src.width, src.height, src.origin, None
    frames = src.frames
    first = next(frames, None)
    if first is None:
        raise BadVideo("corrupt: no frame could be decoded")
    frames = itertools.chain([first], frames)
    # frames turned as a player shows them (the display matrix); non-square pixels (a sample aspect ratio,
    # e.g. the 340x256 Kinetics releases' 64/51) kept as they are stored, which is what PySlowFast, decord and
    # DALI decode, and written into the member, or with square_pixels stretched to their display width
    sar = src.sar
    shown_w = in_w * float(sar) if s.square_pixels else in_w
    op = orientation(display_matrix(first[1]))
    swaps = op in ("cw", "ccw", "transpose", "antitranspose")
    w, h = output_size(*((in_h, shown_w) if swaps else (shown_w, in_h)), s.short_side)
    scale_w, scale_h = (h, w) if swaps else (w, h)  # the size to scale to before the planes are turned
    out_sar = Fraction(1) if s.square_pixels else (1 / sar if swaps else sar)
    fps = Fraction(s.fps).limit_denominator(1001) if s.fps else src.rate
    if span is not None:
        slots = max(1, int(math.ceil((span[1] - span[0]) * float(fps) - 1e-9)))
    buf = io.BytesIO()
    out = av.open(buf, "w", format=MEMBER_EXT[s.codec], options={"movflags": fmp4.MOVFLAGS})
    ost = out.add_stream(ENCODER[s.codec], rate=fps)
    ost.width, ost.height, ost.pix_fmt = w, h, "yuv420p"
    if out_sar != 1:
        ost.codec_context.sample_aspect_ratio = out_sar
    ost.codec_context.thread_count = s.threads
    ost.options = encoder_options(s)
    tb = Fraction(1, 1) / fps
    n = 0
    # one swscale context for the video: frame.reformat builds one per frame (0.28 instead of 0.09 ms a frame)
    scaler = VideoReformatter()
    last_time = [first[0]]

    def timed(items):  # the latest source time read, to tell a span that lies past the video's end
        for t, f in items:
            last_time[0] = t
            yield t, f

    for frame in resample_times(timed(frames), float(fps), float(1 / src.rate), origin, slots):
        # limited ("MPEG") range out, what the member signals, from the range the frame says it has (a
        # full-range source, such as PNG or MJPEG pictures, is scaled down; the frame's flag alone would leave
        # full-range values in a stream read as limited)
        img = scaler.reformat(frame, width=scale_w, height=scale_h, format="yuv420p", interpolation="AREA",
                              src_color_range=frame.color_range or None, dst_color_range="MPEG", threads=s.threads)
        img = _oriented(img, op)
        # the source's frame type would be forced on the encoder (an I-frame wherever the source had one, ...),
        # overriding --gop/--bframes
        img.pict_type = PictureType.NONE
        img.pts, img.time_base = n, tb
        for packet in ost.encode(img):
            out.mux(packet)
        n += 1
    for packet in ost.encode():
        out.mux(packet)
    out.close()
    if span is not None and last_time[0] < origin - 0.5 / float(fps):
        raise BadVideo(f"the video ends at {last_time[0] - origin + span[0]:.2f} s, before the span to pack "
                       f"({span[0]:.2f}-{span[1]:.2f} s): are its annotations for another cut of it (--time-offset)?")
    data = buf.getvalue()
    meta = {"num_frames": n, "fps": float(fps), "width": w, "height": h, "codec": s.codec, "orientation": op,
            "sample_aspect_ratio": str(out_sar)}
    try:  # closed GOPs of ``gop`` frames: every fragment starts with a keyframe that decodes alone
        frags = fmp4.parse(data)
        if int(frags.frames[-1]) != n:
            raise ValueError(f"its fragments hold {int(frags.frames[-1])} frames, {n} were encoded")
        meta.update(fragments=frags, window_cut=True)
    except ValueError as e:  # not expected: say so, and decode that member whole
        meta.update(fragments=whole_member(len(data), n), window_cut=False,
                    window_cut_reason=f"the encoded MP4 cannot be cut: {e}")
    return data, meta


# containers for --codec copy: a fragmented MP4 where the codec has an MP4 mapping, else its own container
_COPY_CONTAINER = {"vp8": "webm", "vp9": "mp4", "av1": "mp4", "h264": "mp4", "hevc": "mp4", "mpeg4": "mp4"}


def _with_dts(packets, step: int):
    """Packets with a decode timestamp each. Matroska leaves it unset on the
    first packets of a stream with B-frames (the keyframe among them): those
    get the known one's, less one frame ``step`` per packet before it, instead
    of being dropped (which lost the first GOP). Flush packets are left out."""
    held = []
    for packet in packets:
        if packet.size == 0:
            continue
        if packet.dts is None and packet.pts is None:
            continue  # nothing to place it by
        if packet.dts is None:
            held.append(packet)
            continue
        for k, early in enumerate(held):
            early.dts = packet.dts - (len(held) - k) * step
            yield early
        held = []
        yield packet
    for k, early in enumerate(held):  # no packet had one: decode order from the presentation times
        early.dts = early.pts if early.pts is not None else k * step
        yield early


def _remux(container, stream, fmt: str, options: dict | None = None) -> bytes:
    buf = io.BytesIO()
    out = av.open(buf, "w", format=fmt, options=options or {})
    ost = out.add_stream_from_template(stream)
    step = max(1, round(1 / (_input_rate(stream) * stream.time_base))) if stream.time_base else 1
    try:
        for packet in _with_dts(container.demux(stream), step):
            packet.stream = ost
            out.mux(packet)
    except av.error.FFmpegError as e:
        raise BadVideo(f"corrupt: demuxing failed ({_msg(e)})") from None
    finally:
        out.close()
    return buf.getvalue()


def _frame_digests(data: bytes) -> list[bytes]:
    """A digest of every frame a decoder gets back from ``data``, in display order."""
    with av.open(io.BytesIO(data)) as c:
        return [hashlib.blake2b(b"".join(bytes(p) for p in f.planes), digest_size=16).digest()
                for _, f in _decoded_frames(c, c.streams.video[0], threaded=False)]


def cut_check(data: bytes, frags: Fragments, digests: list[bytes]) -> str | None:
    """None if every fragment, decoded alone after the init segment, gives
    exactly its frames of the whole decode (``digests``); else why not."""
    if int(frags.frames[-1]) != len(digests):
        return f"its fragments hold {int(frags.frames[-1])} frames, the whole decode {len(digests)}"
    for g in range(frags.count):
        lo, hi = int(frags.frames[g]), int(frags.frames[g + 1])
        try:
            alone = _frame_digests(data[:frags.init_size] + data[int(frags.bytes[g]):int(frags.bytes[g + 1])])
        except BadVideo as e:
            alone = str(e)
        if alone != digests[lo:hi]:
            return (f"fragment {g} (frames {lo}-{hi - 1}) does not decode alone to the same frames "
                    "(an open GOP, or a keyframe that is not an IDR)")
    return None


# what --codec copy keeps: 8-bit 4:2:0, what NVDEC decodes for every codec here
_COPY_PIXEL_FORMATS = {"yuv420p", "yuvj420p", "nv12"}


def _first_frame(path: str, index: int):
    """The first decoded frame of stream ``index`` of ``path`` (another handle: the caller's is left as it is)."""
    with av.open(path, metadata_errors="ignore") as c:
        try:
            return next(c.decode(c.streams[index]), None)
        except av.error.FFmpegError as e:
            raise BadVideo(f"corrupt: decoding failed at the first frame ({_msg(e)})") from None


def _copy(container, stream, path: str) -> tuple[bytes, dict]:
    """The source's stream re-muxed unchanged: a fragmented MP4 (a fragment at
    each keyframe) that is cut only where every fragment decodes alone."""
    name = stream.codec_context.name
    pix = stream.codec_context.pix_fmt
    if pix not in _COPY_PIXEL_FORMATS:
        raise BadVideo(f"--codec copy keeps the stream, and it is {pix} ({name}): the loaders' GPU path (DALI on "
                       "NVDEC) decodes 8-bit 4:2:0; pack it with the default transcode, which makes 8-bit 4:2:0")
    op = orientation(display_matrix(_first_frame(path, stream.index)))
    if op != "upright":
        raise BadVideo(f"--codec copy keeps the stream, and it is shown {op} (its display matrix): the loaders "
                       "decode frames as stored, so they would see it turned; pack it with the default transcode, "
                       "which turns the frames upright")
    fmt = _COPY_CONTAINER.get(name, "matroska")
    reason = None if fmt == "mp4" else f"{name} has no fragmented-MP4 mapping (kept in {fmt})"
    data = _remux(container, stream, fmt, {"movflags": fmp4.MOVFLAGS} if fmt == "mp4" else None)
    # count exactly what a decoder gets back from the packed member
    digests = _frame_digests(data)
    n = len(digests)
    frags = None
    if reason is None:
        try:
            frags = fmp4.parse(data)
            reason = cut_check(data, frags, digests)
        except ValueError as e:
            reason = f"the re-muxed MP4 cannot be cut: {e}"
    ext = {"webm": "webm", "mp4": "mp4"}.get(fmt, "mkv")
    meta = {
        "num_frames": n,
        "fps": float(_input_rate(stream)),
        "width": stream.codec_context.width,
        "height": stream.codec_context.height,
        "codec": name,
        "ext": ext,
        "fragments": frags if reason is None else whole_member(len(data), n),
        "window_cut": reason is None,
        "orientation": "upright",
        "sample_aspect_ratio": str(_sample_aspect_ratio(stream)),
    }
    if reason is not None:
        meta["window_cut_reason"] = reason
    return data, meta


def transcode(path: str, settings: EncodeSettings, span: tuple[float, float] | None = None,
              frame_rate: float | None = None) -> tuple[bytes, dict]:
    """Return (member bytes, meta) for one input video, or raise BadVideo.

    ``path`` is a video file, or a folder of numbered frames (``frame_rate``
    frames a second: Something-Something V1 and frame copies of UCF101 and
    HMDB51 ship so). ``span``: pack only the seconds [start, end) of the
    video (from its stream's start; the end is clipped to the video): frame
    k of the member shows the source at ``start + k / fps``, and
    ``meta["span"]`` is ``[start, start + num_frames / fps]``. Not with
    ``codec="copy"``, which keeps the stream whole."""
    if os.path.isdir(path):
        if settings.codec == "copy":
            raise BadVideo("a frame folder has no stream to copy: pack it with --codec h264 or vp9")
        if not frame_rate or frame_rate <= 0:
            raise BadVideo("a frame folder needs its frame rate (--frame-rate)")
        data, meta = _encode(_folder_frames(path, frame_rate, span), settings, span)
        return data, _finish(meta, settings, span, MEMBER_EXT[settings.codec])
    container = _open(path)
    try:
        stream = video_stream(container)
        if settings.codec == "copy":
            if span is not None:
                raise BadVideo("--codec copy keeps the stream whole: it cannot pack a span of it")
            data, meta = _copy(container, stream, path)
            ext = meta["ext"]  # (the source's container decides)
        else:
            data, meta = _encode(_stream_frames(container, stream, span), settings, span)
            ext = MEMBER_EXT[settings.codec]
    except BadVideo:
        raise
    except av.error.FFmpegError as e:
        raise BadVideo(f"corrupt: {_msg(e)}") from None
    finally:
        container.close()
    return data, _finish(meta, settings, span, ext)


def _finish(meta: dict, settings: EncodeSettings, span, ext: str) -> dict:
    """``meta`` checked (frames decoded, --min-frames) and completed (ext, duration, span)."""
    meta["ext"] = ext
    if meta["num_frames"] == 0:
        raise BadVideo("corrupt: no frame could be decoded")
    if span is not None:
        meta["span"] = [span[0], span[0] + meta["num_frames"] / meta["fps"]]
    if meta["num_frames"] < settings.min_frames:
        raise BadVideo(f"too short: {meta['num_frames']} frames < --min-frames {settings.min_frames}")
    meta["duration"] = round(meta["num_frames"] / meta["fps"], 6)
    return meta
