"""Deterministic synthetic media for tests and demos: PNG images and WAV clips as encoded bytes.

Both are pure functions of their arguments (same seed -> same bytes), so tests can hash them,
send them over the wire as a client would, and compare encoder outputs across runs.
"""

from __future__ import annotations

import io

import numpy as np


def make_test_image(seed: int, size: tuple[int, int] = (256, 192)) -> bytes:
    """PNG bytes of a `size` = (width, height) RGB image: a smooth colour gradient, a few solid
    rectangles and light noise, so resizing and cropping change the pixels in a visible way."""
    from PIL import Image, ImageDraw

    width, height = size
    rng = np.random.default_rng(seed)
    # Gradient background: [H, W, 3] uint8, one random direction and colour pair per seed.
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    t = (np.cos(angle) * xs / max(width, 1) + np.sin(angle) * ys / max(height, 1) + 1.0) / 2.0
    color_a, color_b = rng.uniform(0, 255, size=(2, 3))
    pixels = color_a * (1.0 - t[..., None]) + color_b * t[..., None]
    pixels += rng.normal(0.0, 6.0, size=pixels.shape)  # light sensor-like noise
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")

    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, x1 = sorted(rng.integers(0, width, size=2).tolist())
        y0, y1 = sorted(rng.integers(0, height, size=2).tolist())
        fill = tuple(int(c) for c in rng.integers(0, 256, size=3))
        draw.rectangle([x0, y0, x1, y1], fill=fill)

    buf = io.BytesIO()
    # PNG is lossless; fixed options (no timestamp chunk) keep the bytes deterministic.
    image.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def make_test_audio(seed: int, seconds: float = 2.0, sr: int = 16000) -> bytes:
    """WAV bytes (16-bit PCM, mono, `sr` Hz) of `seconds` of audio: three tones with a slow
    amplitude envelope plus low-level noise."""
    import soundfile as sf

    rng = np.random.default_rng(seed)
    num_samples = int(round(seconds * sr))
    t = np.arange(num_samples, dtype=np.float64) / sr  # [num_samples] seconds
    freqs = rng.uniform(110.0, 2000.0, size=3)  # Hz, well under Nyquist for sr >= 8 kHz
    phases = rng.uniform(0, 2 * np.pi, size=3)
    tones = sum(np.sin(2 * np.pi * f * t + p) for f, p in zip(freqs, phases)) / 3.0
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.5, 3.0) * t)
    wave = 0.5 * envelope * tones + 0.02 * rng.standard_normal(num_samples)

    buf = io.BytesIO()
    sf.write(buf, np.clip(wave, -1.0, 1.0).astype(np.float32), sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


VIDEO_FORMATS = {"mp4": ("mp4", "libx264"), "webm": ("webm", "libvpx-vp9"), "mkv": ("matroska", "libx264")}


def make_test_video(seed: int, size: tuple[int, int] = (112, 84), num_frames: int = 8, fps: int = 4,
                    kind: str = "mp4", codec: str | None = None) -> bytes:
    """Encoded bytes of a `num_frames`-frame video at `fps` (`kind`: mp4 = H.264, webm = VP9,
    mkv = H.264 in Matroska; `codec` overrides the encoder): a gradient scene whose rectangles
    move from frame to frame, so frame sampling changes what the model sees."""
    from PIL import Image

    base = np.asarray(Image.open(io.BytesIO(make_test_image(seed, size))).convert("RGB"))
    frames = [np.roll(base, shift=(3 * i, 5 * i), axis=(0, 1)) for i in range(num_frames)]
    return encode_video(frames, fps, kind, codec)


def encode_video(frames, fps: int, kind: str = "mp4", codec: str | None = None,
                 pts: list[int] | None = None) -> bytes:
    """Encoded bytes of RGB ``frames`` ([H, W, 3] uint8 each) at ``fps`` (``kind`` and ``codec``
    as ``make_test_video``); ``pts``: each frame's timestamp in 1/fps units (default 0, 1, 2, ...),
    so a file can claim any duration. Deterministic: the same arguments give the same bytes."""
    import fractions

    import av

    fmt, encoder = VIDEO_FORMATS[kind]
    height, width = frames[0].shape[:2]
    buf = io.BytesIO()
    # bitexact: no muxer UIDs or dates, so the same arguments give the same bytes
    with av.open(buf, mode="w", format=fmt, options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(codec or encoder, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.options = {"threads": "1"}  # single-threaded: the same bytes every run
        for i, pixels in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[i], fractions.Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()
