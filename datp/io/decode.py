"""Video decoding: exactly the frames that decode, upright, as uint8 arrays.

The backend is PyAV (FFmpeg). docs/decoding.md has the evidence: on the shared stress files
OpenCV 5.0 reads 0 frames of an AV1 clip, 28 of 49 decodable frames of a corrupt h264 clip
(without saying anything was wrong) and reports frame counts that lie; PyAV decodes them all, reports
decoder errors per packet, and exposes rotation metadata per frame.

Rules:
- The container's frame count is never trusted: `num_frames` is what decoding yielded.
- Rotation metadata (the display matrix) is applied, so frames come out as a player shows them.
- 10-bit and odd-sized streams are converted by FFmpeg's swscale to 8-bit RGB.
- Any decoder or demuxer error becomes `DecodeError` (the whole video fails) or, for errors on
  single packets, an entry in `DecodedVideo.errors`; callers decide (extract-flow treats a video
  with packet errors as failed, since its frames are not the video's real frames).
This is the only module, with `datp.flows`, that touches a video decoder.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np


class DecodeError(RuntimeError):
    """A video that cannot be decoded at all (missing, empty, no video stream, broken container)."""


@dataclass
class VideoInfo:
    """What decoding learned about a video (filled in while frames are read).

    Attributes:
        path: the file.
        fps: average frame rate from the stream (frames / duration when the stream has none).
        num_frames: frames actually decoded so far (final once iteration ends).
        rotation: clockwise degrees applied to make frames upright (0, 90, 180, 270).
        height, width: size of the returned (rotated, resized) frames.
        source_height, source_width: coded size before rotation and resizing.
        codec: decoder name.
        errors: per-packet decoder errors seen (frames around them may be missing).
        timestamps: presentation time in seconds of each returned frame (variable frame rate
            videos have uneven gaps).
    """

    path: str
    fps: float = 0.0
    num_frames: int = 0
    rotation: int = 0
    height: int = 0
    width: int = 0
    source_height: int = 0
    source_width: int = 0
    codec: str = ""
    errors: list[str] = field(default_factory=list)
    timestamps: list[float] = field(default_factory=list)


def output_size(height: int, width: int, *, short_side: int | None = None,
                size: tuple[int, int] | None = None) -> tuple[int, int]:
    """Frame size (H, W) after resizing.

    Args:
        height, width: upright input size.
        short_side: scale so the shorter side has this length, keeping the aspect ratio
            (rounded to the nearest integer, at least 1).
        size: (W, H) fixed output size, as TSN's 340x256; exclusive with short_side.

    Returns:
        (H, W) of the output; the input size when neither option is given.
    """
    if short_side is not None and size is not None:
        raise ValueError("give either short_side or size, not both")
    if size is not None:
        w, h = size
        if w <= 0 or h <= 0:
            raise ValueError(f"size {size} must be positive (W, H)")
        return h, w
    if short_side is not None:
        if short_side <= 0:
            raise ValueError(f"short_side {short_side} must be positive")
        scale = short_side / min(height, width)
        return max(1, round(height * scale)), max(1, round(width * scale))
    return height, width


def iter_frames(path: str | Path, info: VideoInfo | None = None, *, gray: bool = False,
                short_side: int | None = None, size: tuple[int, int] | None = None
                ) -> Iterator[np.ndarray]:
    """Yield the decodable frames of a video, upright and optionally resized.

    Args:
        path: video file.
        info: filled in as decoding proceeds (fps, rotation, sizes, frame count, errors).
        gray: yield (H, W) uint8 luma instead of (H, W, 3) uint8 RGB.
        short_side, size: resize as in `output_size` (area interpolation when shrinking,
            bilinear when enlarging), done by FFmpeg's swscale together with the colour
            conversion.

    Yields:
        uint8 frames, (H, W) or (H, W, 3) RGB.

    Raises:
        DecodeError: the file is missing, empty, has no video stream, or the container breaks.
    """
    info = info if info is not None else VideoInfo(path=str(path))
    fmt = "gray" if gray else "rgb24"
    for frame, time_base in _decoded(path, info):
        yield _convert(frame, info, fmt, short_side, size, time_base)
    _finish(path, info)


def read_frames(path: str | Path, pick, info: VideoInfo | None = None, *, gray: bool = False,
                short_side: int | None = None, size: tuple[int, int] | None = None
                ) -> tuple[dict[int, np.ndarray], VideoInfo]:
    """Decode every frame of a video but convert only the frames `pick(T)` selects.

    Colour conversion and resizing (swscale) cost about five times the decoding itself for
    340x256 h264, and a segment sampler keeps some 10 of T frames. So the video is decoded twice:
    once to count T (what decodes, as `iter_frames`; never the container's count), then to
    convert only the picked frames. Time and memory scale with the frames kept, not with T.

    Args:
        path: video file.
        pick: `pick(T) -> array of frame indices` in [0, T - 1] (repeats allowed); `info.fps`
            is already filled in when it is called (stride sampling in seconds needs it).
        info: filled in as by `iter_frames` (every frame counted, timestamps of all frames).
        gray, short_side, size: as in `iter_frames`.

    Returns:
        ({index: frame} for the picked indices, info).

    Raises:
        DecodeError: as `iter_frames`, or when the two passes disagree on T.
    """
    picked, info = read_picked(path, {"frames": (pick, {"short_side": short_side, "size": size})},
                               info, gray=gray)
    return picked["frames"], info


def read_picked(path: str | Path, picks: dict, info: VideoInfo | None = None, *,
                gray: bool = False) -> tuple[dict[str, dict[int, np.ndarray]], VideoInfo]:
    """`read_frames` for several sets of frames, each at its own size, in the same two passes.

    extract-features reads RGB frames at the source size (resized later by torchvision, as the
    weights were trained) and the frames of on-the-fly flow at the flow's size (swscale).

    Args:
        path: video file.
        picks: {name: (pick, {"short_side": ..., "size": ...})}; `info.height`/`info.width` are
            the size of the first entry's frames.
        info, gray: as in `read_frames`.

    Returns:
        ({name: {index: frame}}, info).
    """
    counting = VideoInfo(path=str(path))
    T = sum(1 for _ in _decoded(path, counting))
    if T == 0:
        _finish(path, counting)  # raises: no decodable frames
    info = info if info is not None else VideoInfo(path=str(path))
    info.fps = counting.fps
    sizes = {name: resize for name, (_, resize) in picks.items()}
    keep = {name: {int(i) for i in np.asarray(pick(T), dtype=np.int64).ravel()}
            for name, (pick, _) in picks.items()}
    first = next(iter(picks))
    fmt = "gray" if gray else "rgb24"
    frames: dict[str, dict[int, np.ndarray]] = {name: {} for name in picks}
    for i, (frame, time_base) in enumerate(_decoded(path, info)):
        if i == 0:  # the first frame sets rotation and sizes
            _orient(frame, info, **sizes[first])
        for name, indices in keep.items():
            if i in indices:
                frames[name][i] = _to_array(frame, info, fmt, **sizes[name])
        info.num_frames += 1
        info.timestamps.append(float((frame.pts if frame.pts is not None else i) * time_base))
    _finish(path, info)
    if info.num_frames != T:
        raise DecodeError(f"{path}: {T} frames decoded, then {info.num_frames}; the decoder is "
                          "not deterministic on this file")
    return frames, info


def _decoded(path: str | Path, info: VideoInfo):
    """Yield (frame, time_base) for every decodable frame (not converted); errors as iter_frames."""
    import av  # optional heavy backend: imported where used

    path = Path(path)
    if not path.is_file():
        raise DecodeError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise DecodeError(f"{path}: empty file (0 bytes)")
    try:
        # metadata_errors="ignore": some HMDB51 AVIs carry non-UTF-8 tags that abort opening.
        container = av.open(str(path), metadata_errors="ignore")
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as err:
        raise DecodeError(f"{path}: cannot open ({err})") from err
    count = 0
    with container:
        if not container.streams.video:
            raise DecodeError(f"{path}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        info.codec = stream.codec_context.name
        rate = stream.average_rate or stream.guessed_rate
        info.fps = float(rate) if rate else 0.0
        time_base = stream.time_base or Fraction(1, 1)
        try:
            for packet in container.demux(stream):
                try:
                    frames = packet.decode()
                except av.error.FFmpegError as err:
                    info.errors.append(f"packet at pts {packet.pts}: {err}")
                    continue
                for frame in frames:
                    count += 1
                    yield frame, time_base
        except av.error.FFmpegError as err:
            raise DecodeError(f"{path}: demuxing failed after {count} frames ({err})") from err


def _finish(path, info: VideoInfo) -> None:
    if info.num_frames == 0:
        raise DecodeError(f"{path}: no decodable video frames"
                          + (f" ({info.errors[0]})" if info.errors else ""))
    if info.fps <= 0 and len(info.timestamps) > 1 and info.timestamps[-1] > info.timestamps[0]:
        info.fps = (len(info.timestamps) - 1) / (info.timestamps[-1] - info.timestamps[0])


def _orient(frame, info: VideoInfo, short_side=None, size=None) -> None:
    """From the first frame: rotation, the coded size, and the output size (`info.height/width`)."""
    # The display matrix gives the counter-clockwise angle; players rotate clockwise by -angle.
    info.rotation = int(round(-getattr(frame, "rotation", 0) or 0)) % 360
    info.source_height, info.source_width = frame.height, frame.width
    info.height, info.width = output_size(*_upright(info), short_side=short_side, size=size)


def _upright(info: VideoInfo) -> tuple[int, int]:
    """(H, W) of the source frames once rotated upright."""
    if info.rotation in (90, 270):
        return info.source_width, info.source_height
    return info.source_height, info.source_width


def _to_array(frame, info: VideoInfo, fmt: str, short_side=None, size=None) -> np.ndarray:
    """One frame, converted to `fmt`, resized (swscale) as `output_size` says, rotated upright."""
    height, width = output_size(*_upright(info), short_side=short_side, size=size)
    # swscale resizes in coded orientation, so swap the target for 90/270 degree rotations.
    target_h, target_w = (width, height) if info.rotation in (90, 270) else (height, width)
    if (target_h, target_w) != (frame.height, frame.width):
        shrink = target_h * target_w < frame.height * frame.width
        frame = frame.reformat(width=target_w, height=target_h, format=fmt,
                               interpolation="AREA" if shrink else "BILINEAR")
    array = frame.to_ndarray(format=fmt)
    if info.rotation:
        array = np.ascontiguousarray(np.rot90(array, k=-info.rotation // 90))
    return array


def _convert(frame, info: VideoInfo, fmt: str, short_side, size, time_base) -> np.ndarray:
    if info.num_frames == 0:
        _orient(frame, info, short_side, size)
    array = _to_array(frame, info, fmt, short_side, size)
    info.num_frames += 1
    pts = frame.pts if frame.pts is not None else info.num_frames - 1
    info.timestamps.append(float(pts * time_base))
    return array


def read_video(path: str | Path, **kwargs) -> tuple[np.ndarray, VideoInfo]:
    """Decode a whole video into memory.

    Args:
        path: video file.
        **kwargs: options of `iter_frames` (gray, short_side, size).

    Returns:
        frames (T, H, W[, 3]) uint8 and the filled-in VideoInfo.
    """
    info = VideoInfo(path=str(path))
    frames = list(iter_frames(path, info, **kwargs))
    return np.stack(frames), info
