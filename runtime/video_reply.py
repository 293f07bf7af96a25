"""A video pipeline's output options and reply: ``video_format``, ``fps`` and ``quality`` taken out of
the request before validation (as runtime.execute.pop_options takes ``timeout``), and the frames
-> ``video`` (a data URI, or a presigned URL with ``BUCKET_ENDPOINT_URL``), ``frames``, ``fps``,
``seed``.

Taken out before validation because they shape the reply, not the pipeline call: the request
schema read from the pipeline (runtime.artifact.CallSchema) stays the pipeline's own, and these
rules are written once here (video_options_schema is their JSON Schema twin for ``describe``).
A video request that asks for ``image_format`` is refused: silently answering with a video
where the client asked for a PNG would break the client later, and worse.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from runtime.artifact import Manifest
from runtime.schema import RequestError, quote
from runtime.settings import Bucket
from runtime.upload import upload
from runtime.video import MAX_FPS, MIN_FPS, VIDEO_FORMATS, VideoFormat, encode_video

VIDEO_OPTION_FIELDS = ("video_format", "fps", "quality")
DEFAULT_FORMAT: VideoFormat = "mp4"
# The frame rate each model's own examples export at (diffusers' docs and model cards): what
# its training clips played at, so motion looks as it should. A pipeline whose __call__ takes
# ``frame_rate`` (LTX-Video: its transformer is told the rate) defaults to that instead.
DEFAULT_FPS: dict[str, int] = {
    "CogVideoXPipeline": 8,
    "CogVideoXImageToVideoPipeline": 8,
    "CogVideoXVideoToVideoPipeline": 8,
    "WanPipeline": 16,
    "WanImageToVideoPipeline": 16,
    "WanVideoToVideoPipeline": 16,
    "HunyuanVideoPipeline": 15,
    "MochiPipeline": 30,
    "AllegroPipeline": 15,
    "AnimateDiffPipeline": 8,
}
FALLBACK_FPS = 16  # a class in none of the above: Wan's rate, the middle of the common range
FRAME_RATE_PARAM = "frame_rate"


@dataclass(frozen=True)
class VideoOptions:
    video_format: VideoFormat
    fps: int
    quality: int | None  # webp only; None: runtime.video.WEBP_QUALITY


def default_fps(pipeline_class: str, call_defaults: Mapping[str, Any]) -> int:
    """The reply's fps when a request gives none: the pipeline's own ``frame_rate`` default when
    its __call__ takes one, else DEFAULT_FPS by class, else FALLBACK_FPS."""
    rate = call_defaults.get(FRAME_RATE_PARAM)
    if isinstance(rate, int | float) and not isinstance(rate, bool) and MIN_FPS <= rate <= MAX_FPS:
        return round(rate)
    return DEFAULT_FPS.get(pipeline_class, FALLBACK_FPS)


def pop_video_options(
    raw: Any, pipeline_class: str, call_defaults: Mapping[str, Any]
) -> tuple[VideoOptions, Any, list[str]]:
    """``video_format``, ``fps`` and ``quality`` out of a video request: (options, the rest, warnings).
    ``call_defaults``: the pipeline's own plain parameters and their defaults (a request's
    ``frame_rate`` sets the default fps; a pipeline parameter named ``fps`` keeps its value).
    Raises RequestError listing every problem, ``image_format`` included."""
    if not isinstance(raw, dict):
        return VideoOptions(DEFAULT_FORMAT, default_fps(pipeline_class, call_defaults), None), raw, []
    rest = dict(raw)
    errors: list[str] = []
    if "image_format" in rest:
        errors.append(
            f"image_format: this model makes videos, not images; send video_format ({', '.join(VIDEO_FORMATS)}; "
            f"default {DEFAULT_FORMAT}) instead"
        )
    video_format = rest.pop("video_format", None)
    if video_format is not None and video_format not in VIDEO_FORMATS:
        errors.append(f"video_format: expected one of {', '.join(VIDEO_FORMATS)}, got {quote(video_format)}")
    fps = rest.get("fps") if "fps" in call_defaults else rest.pop("fps", None)
    if fps is not None and not _whole(fps, MIN_FPS, MAX_FPS):
        errors.append(f"fps: expected a whole number from {MIN_FPS} to {MAX_FPS}, got {quote(fps)}")
    quality = rest.pop("quality", None)
    if quality is not None and not _whole(quality, 1, 100):
        errors.append(f"quality: expected a whole number from 1 to 100, got {quote(quality)}")
    if errors:
        raise RequestError(errors)
    chosen: VideoFormat = video_format or DEFAULT_FORMAT
    warnings = []
    if quality is not None and chosen != "webp":
        warnings.append(f"quality: ignored, it applies to video_format webp ({chosen} has its own fixed settings)")
        quality = None
    if fps is None:
        # The rate the model is told (a request's frame_rate, else the pipeline's default) plays right.
        rate = rest.get(FRAME_RATE_PARAM, call_defaults.get(FRAME_RATE_PARAM))
        fps = default_fps(pipeline_class, {FRAME_RATE_PARAM: rate} if FRAME_RATE_PARAM in call_defaults else {})
    return VideoOptions(chosen, fps, quality), rest, warnings


def video_request(raw: Any, manifest: Manifest) -> tuple[VideoOptions | None, Any, list[str]]:
    """pop_video_options for an artifact whose pipeline makes videos; (None, raw, []) otherwise."""
    call = manifest.call
    if call is None or call.output != "frames":
        return None, raw, []
    return pop_video_options(raw, manifest.pipeline_class, {p.name: p.default for p in call.extras})


def describe_video_options(manifest: Manifest, props: dict[str, Any]) -> None:
    """A video artifact's ``describe`` schema: its output fields replace the image ones."""
    call = manifest.call
    if call is None or call.output != "frames":
        return
    props.pop("image_format", None)
    props.update(video_options_schema(default_fps(manifest.pipeline_class, {p.name: p.default for p in call.extras})))


def _whole(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def video_options_schema(default: int) -> dict[str, dict[str, Any]]:
    """The JSON Schema of the fields pop_video_options takes, for ``describe`` (``default``: the
    artifact's default fps)."""
    return {
        "video_format": {
            "anyOf": [{"type": "string", "enum": list(VIDEO_FORMATS)}, {"type": "null"}],
            "default": DEFAULT_FORMAT,
            "title": "video_format",
            "description": "encoding of the reply's video: mp4 (H.264), animated webp or gif",
        },
        "fps": {
            "anyOf": [{"type": "integer", "minimum": MIN_FPS, "maximum": MAX_FPS}, {"type": "null"}],
            "default": default,
            "title": "fps",
            "description": "frames per second of the reply's video (not of the model's sampling)",
        },
        "quality": {
            "anyOf": [{"type": "integer", "minimum": 1, "maximum": 100}, {"type": "null"}],
            "title": "quality",
            "description": "webp quality (default 90); mp4 and gif: ignored",
        },
    }


@dataclass(frozen=True)
class DeliveredVideo:
    values: tuple[str, ...]  # one per video, in order: data URIs or URLs
    frames: int  # frames per video
    fps: int
    encode_s: float
    upload_s: float  # 0.0 when no bucket is configured
    nbytes: int  # encoded bytes, all videos together

    def reply(self, seed: int) -> dict[str, Any]:
        """``video`` (the first; ``videos`` all, as worker-sdxl's ``image_url`` and ``images``),
        ``frames``, ``fps``, ``seed``."""
        return {
            "video": self.values[0],
            "videos": list(self.values),
            "frames": self.frames,
            "fps": self.fps,
            "seed": seed,
        }


def deliver_video(videos: Sequence[Any], options: VideoOptions, job_id: str, bucket: Bucket | None) -> DeliveredVideo:
    """Encode every video (frames x H x W x C, runtime.video.as_uint8_frames' forms) as asked;
    upload them when a bucket is given. Raises runtime.upload.UploadError when an upload fails,
    runtime.video.VideoError for frames over the encoder's bounds."""
    if not videos:
        raise ValueError("deliver_video: no video to deliver")
    t0 = time.perf_counter()
    encoded = [encode_video(v, options.video_format, options.fps, options.quality) for v in videos]
    t1 = time.perf_counter()
    nbytes = sum(len(e.data) for e in encoded)
    if bucket is None:
        values = tuple(e.data_uri() for e in encoded)
        return DeliveredVideo(values, encoded[0].frames, options.fps, time.perf_counter() - t0, 0.0, nbytes)
    urls = tuple(upload(bucket, job_id, encoded))
    return DeliveredVideo(urls, encoded[0].frames, options.fps, t1 - t0, time.perf_counter() - t1, nbytes)
