"""Video decoding for the Qwen-VL family: client bytes -> the sampled RGB frames.

FFmpeg parses the bytes (PyAV), but only through the demuxers and decoders named here: the
container is recognised from its magic bytes (MP4/MOV ``ftyp``, Matroska/WebM EBML) and opened
with that demuxer alone, never by FFmpeg's probing over every format it knows, and only the video
codecs people send are decoded. Everything a limit bounds is checked from the container's header
before any frame is decoded: codec, frame size, frame rate, duration, the number of frames the
model would see and their pixels. Decoding is strict (``err_detect=explode``): a damaged bitstream
is refused, not concealed into frames the model would describe. Frames are sampled as the model's Hugging Face video processor
samples them (``sample_frames``: ``fps`` frames per second within its min/max frames, a multiple
of the temporal patch), the source's own frame count and ``average_rate`` as transformers' PyAV
loader reads them; only the sampled frames are converted to RGB.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from cluster.request_types import video_container

VIDEO_CODECS = ("h264", "hevc", "vp8", "vp9", "av1")
# the FFmpeg decoders of those codecs (stream.codec_context.codec.name): AV1 decodes with libdav1d
_DECODERS = frozenset(VIDEO_CODECS) | {"libdav1d", "libvpx", "libvpx-vp9"}
MAX_SOURCE_FPS = 240.0


class VideoError(ValueError):
    """The bytes are not a video this server decodes, or one over a limit."""


@dataclass(frozen=True)
class VideoLimits:
    max_seconds: float
    max_frame_pixels: int  # width x height of one frame
    max_aspect_ratio: float
    max_frames: int  # frames the model sees, after sampling
    max_total_pixels: int  # width x height x sampled frames: the decoded frames' memory bound


@dataclass
class SampledVideo:
    frames: np.ndarray  # [num_sampled, H, W, 3] uint8 RGB
    source_fps: float
    source_frames: int
    indices: list[int]  # of the sampled frames in the source

    @property
    def sampled_fps(self) -> float:
        """Frames per second of the sampled sequence, as transformers' ``VideoMetadata`` defines
        it (Qwen2.5-VL's seconds per temporal patch are ``temporal_patch_size / sampled_fps``)."""
        return len(self.indices) / self.source_frames * self.source_fps


def decode_video(data: bytes, limits: VideoLimits, sample_indices) -> SampledVideo:
    """``sample_indices(total_frames, fps) -> list[int]`` picks the frames (the processor's rule).
    Raises VideoError with a message for the client."""
    import av

    demuxer = video_container(data[:12])
    if demuxer is None:
        raise VideoError("cannot decode video: the bytes are not an MP4/MOV, WebM or MKV file")
    try:
        with av.open(io.BytesIO(data), format=demuxer, mode="r") as container:
            if not container.streams.video:
                raise VideoError("the file has no video stream")
            stream = container.streams.video[0]
            # a bitstream error fails the decode instead of giving a damaged frame to the model
            stream.codec_context.options = {"err_detect": "explode"}
            fps, total = _check_header(container, stream, limits)
            if total == 0:  # Matroska keeps no frame count: count the packets (no decoding)
                total = _count_packets(container, stream, fps, limits)
                container.seek(0)
            indices = _sample(sample_indices, total, fps, stream, limits)
            wanted, frames = set(indices), []
            decoded = 0
            for i, frame in enumerate(container.decode(stream)):
                decoded = i + 1
                if i in wanted:
                    if (frame.width, frame.height) != (stream.width, stream.height):
                        raise VideoError(f"frame {i} is {frame.width}x{frame.height}, the stream says "
                                         f"{stream.width}x{stream.height}; frame size changes are not supported")
                    frames.append(frame.to_ndarray(format="rgb24"))
                if i >= indices[-1]:
                    break
    except VideoError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever FFmpeg raises on client bytes is the client's
        raise VideoError(f"cannot decode video: the data is corrupt or truncated ({type(exc).__name__})") from None
    if len(frames) != len(indices):
        raise VideoError(f"the video is truncated or corrupt: its header says {total} frames, {decoded} decode")
    return SampledVideo(np.stack(frames), fps, total, indices)


def _check_header(container, stream, limits: VideoLimits) -> tuple[float, int]:
    codec = stream.codec_context.codec.name
    if codec not in _DECODERS:
        raise VideoError(f"video codec {codec!r} is not accepted; send {', '.join(VIDEO_CODECS)}")
    width, height = stream.width, stream.height
    if width < 1 or height < 1:
        raise VideoError(f"video frames are {width}x{height} pixels: they have no pixels")
    if width * height > limits.max_frame_pixels:
        raise VideoError(f"video frames are {width}x{height} pixels; the limit is {limits.max_frame_pixels} pixels")
    if max(width, height) / min(width, height) > limits.max_aspect_ratio:
        raise VideoError(f"video frames are {width}x{height} pixels, an aspect ratio over the limit of "
                         f"{limits.max_aspect_ratio:g}:1")
    rate = stream.average_rate
    fps = float(rate) if rate else 0.0
    if not 0 < fps <= MAX_SOURCE_FPS:
        raise VideoError(f"video frame rate is {fps:g} fps; accepted: up to {MAX_SOURCE_FPS:g} fps")
    seconds = 0.0
    if stream.duration and stream.time_base:
        seconds = float(stream.duration * stream.time_base)
    if container.duration:  # microseconds; the longer claim counts
        seconds = max(seconds, container.duration / 1e6)
    if seconds > limits.max_seconds:
        raise VideoError(f"video is {seconds:.1f} s long; the limit is {limits.max_seconds:g} s")
    total = int(stream.frames or 0)
    if total:
        _check_frames(total, fps, limits)
    return fps, total


def _check_frames(total: int, fps: float, limits: VideoLimits) -> None:
    if total < 1:
        raise VideoError("the video has no frames")
    if total / fps > limits.max_seconds:
        raise VideoError(f"video is {total / fps:.1f} s long ({total} frames at {fps:g} fps); "
                         f"the limit is {limits.max_seconds:g} s")


def _count_packets(container, stream, fps: float, limits: VideoLimits) -> int:
    """Frames of a stream whose header has no count, from its packets (one frame each), stopping
    as soon as they are over the duration limit."""
    most = int(limits.max_seconds * fps) + 1
    total = 0
    for packet in container.demux(stream):
        total += 1 if packet.size else 0
        if total > most:
            break
    _check_frames(total, fps, limits)
    return total


def _sample(sample_indices, total: int, fps: float, stream, limits: VideoLimits) -> list[int]:
    try:
        indices = [int(i) for i in sample_indices(total, fps)]
    except (ValueError, ZeroDivisionError):
        indices = []
    if not indices:
        raise VideoError(f"the video has {total} frame(s); too few for the model to sample any")
    if len(indices) > limits.max_frames:
        raise VideoError(f"the video gives {len(indices)} frames at the sampling rate; the limit is "
                         f"{limits.max_frames}")
    pixels = len(indices) * stream.width * stream.height
    if pixels > limits.max_total_pixels:
        raise VideoError(f"the video's {len(indices)} sampled frames of {stream.width}x{stream.height} are "
                         f"{pixels} pixels; the limit is {limits.max_total_pixels}")
    return indices
