"""Video frames -> an encoded file: MP4 (H.264), animated WebP or GIF, with its MIME type.

MP4 goes through PyAV (the ``av`` wheels bundle FFmpeg with libx264), so no system ffmpeg is
assumed; animated WebP and GIF through Pillow, which writes both natively. Frames arrive as
diffusers' video pipelines return them with ``output_type="np"`` (floats in [0, 1], frames x
height x width x channels) or as PIL images; each becomes 8-bit RGB exactly as diffusers'
``numpy_to_pil`` rounds (``(x * 255).round()``), so what is encoded is what the plain pipeline
would have shown.

Sizes are bounded before any encoding (MAX_FRAMES, MAX_VIDEO_PIXELS): an encoder's memory grows
with frames x pixels, and a reply is one JSON message.
"""

from __future__ import annotations

import base64
import io
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

from runtime.artifact import MAX_FRAMES

VideoFormat = Literal["mp4", "webp", "gif"]
VIDEO_FORMATS: tuple[VideoFormat, ...] = ("mp4", "webp", "gif")
MIME: dict[VideoFormat, str] = {"mp4": "video/mp4", "webp": "image/webp", "gif": "image/gif"}
EXTENSION: dict[VideoFormat, str] = {"mp4": ".mp4", "webp": ".webp", "gif": ".gif"}

MIN_FPS, MAX_FPS = 1, 60
# Hard ceilings whatever a recipe says: MAX_FRAMES (runtime.artifact) frames, and 2^28 pixels over
# all frames (e.g. 257 frames of 1024x1024), ~800 MB of RGB held while encoding.
MAX_VIDEO_PIXELS = 2**28
# libx264's constant-rate factor: 0 lossless .. 51 worst; 18 is x264's "visually lossless" point.
MP4_CRF = 18
# The x264 preset trades encode time for size at the same quality; "veryfast" keeps encoding a
# small share of a request next to the model (a denoise of the same frames is seconds per step).
MP4_PRESET = "veryfast"
WEBP_QUALITY = 90
WEBP_METHOD = 2  # libwebp 0 fastest .. 6 smallest, as runtime.encode chose for still images


class VideoError(ValueError):
    """Frames that cannot be encoded as asked (shape, size, fps, format); says what and a hint."""


@dataclass(frozen=True)
class EncodedVideo:
    data: bytes
    video_format: VideoFormat
    frames: int
    fps: int
    width: int
    height: int

    @property
    def mime(self) -> str:
        return MIME[self.video_format]

    @property
    def extension(self) -> str:
        return EXTENSION[self.video_format]

    def data_uri(self) -> str:
        return f"data:{self.mime};base64," + base64.b64encode(self.data).decode("ascii")


def as_uint8_frames(video: Any) -> Any:
    """One video (a frames x H x W x C array of floats in [0, 1] or of uint8, a torch tensor in the
    same layout, or a sequence of PIL images) -> a contiguous uint8 RGB array F x H x W x 3."""
    import numpy as np

    if isinstance(video, Sequence) and video and hasattr(video[0], "convert"):
        arr = np.stack([np.asarray(frame.convert("RGB")) for frame in video])
    else:
        arr = np.asarray(video.float().cpu() if hasattr(video, "cpu") else video)
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3, 4) or min(arr.shape) == 0:
        raise VideoError(
            f"video: expected frames x height x width x channels (1, 3 or 4), got shape {tuple(arr.shape)}. "
            "hint: pass one video of the pipeline's output (output_type='np'), not the batch"
        )
    _check_size(arr.shape[0], arr.shape[1], arr.shape[2])
    if arr.dtype != np.uint8:
        # diffusers' numpy_to_pil: (images * 255).round().astype("uint8"), after its own clamp.
        arr = (np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return np.ascontiguousarray(arr[..., :3])


def _check_size(frames: int, height: int, width: int) -> None:
    if frames > MAX_FRAMES or frames * height * width > MAX_VIDEO_PIXELS:
        raise VideoError(
            f"video: {frames} frames of {width}x{height} is over the encoder's bounds "
            f"({MAX_FRAMES} frames, {MAX_VIDEO_PIXELS} pixels in all). hint: ask for fewer frames or a smaller size"
        )


def encode_video(video: Any, video_format: VideoFormat, fps: int, quality: int | None = None) -> EncodedVideo:
    """Encode one video at ``fps`` frames per second. ``quality`` (1-100) applies to webp only:
    mp4 uses a constant-rate factor (MP4_CRF), gif a per-frame palette."""
    if video_format not in VIDEO_FORMATS:
        raise VideoError(f"video_format: {video_format!r} is not one of {', '.join(VIDEO_FORMATS)}")
    if isinstance(fps, bool) or not isinstance(fps, int) or not MIN_FPS <= fps <= MAX_FPS:
        raise VideoError(f"fps: {fps!r} is not a whole number from {MIN_FPS} to {MAX_FPS}")
    frames = as_uint8_frames(video)
    n, height, width = frames.shape[:3]
    if video_format == "mp4":
        data, width, height = _mp4(frames, fps)
    else:
        data = _pillow(frames, video_format, fps, quality)
    return EncodedVideo(data, video_format, int(n), fps, int(width), int(height))


def _even(frames: Any) -> Any:
    """H.264 in 4:2:0 (the only chroma layout every player decodes) needs even sizes: an odd
    row or column is padded by repeating the edge, never cropped away."""
    import numpy as np

    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if not (pad_h or pad_w):
        return frames
    return np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")


def _mp4(frames: Any, fps: int) -> tuple[bytes, int, int]:
    import av

    frames = _even(frames)
    height, width = frames.shape[1:3]
    # faststart puts the index (moov) before the media, so a browser plays from a URL before the
    # file is whole; FFmpeg does it by re-reading its output by name, hence a file, not a BytesIO.
    with tempfile.TemporaryDirectory(prefix="uiw-video-") as tmp:
        path = Path(tmp) / "video.mp4"
        with av.open(str(path), mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
            stream = container.add_stream("libx264", rate=Fraction(fps))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = {"crf": str(MP4_CRF), "preset": MP4_PRESET}
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode(None))  # flush the encoder's delayed frames
        return path.read_bytes(), int(width), int(height)


def _pillow(frames: Any, video_format: VideoFormat, fps: int, quality: int | None) -> bytes:
    from PIL import Image

    images = [Image.fromarray(frame, "RGB") for frame in frames]
    buf = io.BytesIO()
    # Milliseconds per frame; GIF stores hundredths of a second, so Pillow rounds it there.
    duration = round(1000 / fps)
    common: dict[str, Any] = {"save_all": True, "append_images": images[1:], "duration": duration, "loop": 0}
    if video_format == "webp":
        images[0].save(buf, format="WEBP", quality=quality or WEBP_QUALITY, method=WEBP_METHOD, **common)
    else:
        images[0].save(buf, format="GIF", optimize=False, **common)
    return buf.getvalue()


def decode_video(data: bytes) -> Any:
    """An encoded video's frames as a uint8 F x H x W x 3 array: what a client would see. MP4
    through PyAV; animated WebP and GIF through Pillow (FFmpeg's WebP decoder reads still images
    only). For checks and tests; the worker never decodes its own replies."""
    import numpy as np

    if data[4:8] == b"ftyp":  # ISO base media (MP4): the box type after the first box's size
        import av

        with av.open(io.BytesIO(data), mode="r") as container:
            return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])
    from PIL import Image, ImageSequence

    with Image.open(io.BytesIO(data)) as image:
        return np.stack([np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(image)])
