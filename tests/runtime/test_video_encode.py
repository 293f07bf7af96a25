"""Video encoding (runtime.video) and a video request's output options and reply
(runtime.video_reply), called directly: every file decodes to the frames, size and rate asked
for; the 8-bit frames are diffusers' own rounding; bad options are refused with their field."""

from __future__ import annotations

import base64
import io

import av
import numpy as np
import pytest
from PIL import Image, ImageSequence

from runtime.schema import RequestError
from runtime.video import MAX_FRAMES, VideoError, as_uint8_frames, decode_video, encode_video
from runtime.video_reply import DEFAULT_FPS, VideoOptions, deliver_video, pop_video_options


def smooth_video(frames: int = 6, height: int = 32, width: int = 48, seed: int = 0) -> np.ndarray:
    """Floats in [0, 1] that move from frame to frame: gradients plus a moving bright square
    (smooth content, so a lossy codec's error stays small and a frame swap shows)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    video = np.empty((frames, height, width, 3), np.float32)
    for i in range(frames):
        for c in range(3):
            video[i, ..., c] = 0.5 + 0.4 * np.sin(x / (5 + c) + y / 7 + i / 2 + rng.random())
        video[i, 4 : 4 + 8, 2 + 4 * i : 10 + 4 * i] = 1.0
    return video


def reference_uint8(video: np.ndarray) -> np.ndarray:
    """diffusers' own float -> 8-bit conversion (VaeImageProcessor.numpy_to_pil), frame by frame."""
    from diffusers.image_processor import VaeImageProcessor

    return np.stack([np.asarray(img) for img in VaeImageProcessor.numpy_to_pil(video)])


def test_frames_become_diffusers_own_8_bit_pixels():
    video = smooth_video()
    ref = reference_uint8(video)
    assert np.array_equal(as_uint8_frames(video), ref)
    pil = [Image.fromarray(frame) for frame in ref]
    assert np.array_equal(as_uint8_frames(pil), ref)
    import torch

    assert np.array_equal(as_uint8_frames(torch.from_numpy(video)), ref)


@pytest.mark.parametrize("fmt", ["mp4", "webp", "gif"])
def test_each_format_decodes_to_the_frames_size_and_rate_asked_for(fmt: str):
    video = smooth_video(frames=7)
    encoded = encode_video(video, fmt, fps=8)
    assert (encoded.frames, encoded.fps, encoded.width, encoded.height) == (7, 8, 48, 32)
    decoded = decode_video(encoded.data)
    assert decoded.shape == (7, 32, 48, 3)
    ref = reference_uint8(video).astype(int)
    # Lossy codecs (4:2:0 chroma, palettes): close on average, and each decoded frame is nearest
    # to its own source frame, so none is dropped, repeated or out of order.
    assert np.abs(decoded - ref).mean() < 8, np.abs(decoded - ref).mean()
    distance = np.abs(decoded[:, None].astype(int) - ref[None]).mean(axis=(2, 3, 4))
    assert list(distance.argmin(axis=1)) == list(range(7))
    if fmt == "mp4":
        with av.open(io.BytesIO(encoded.data)) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
            assert stream.average_rate == 8
        assert encoded.mime == "video/mp4"
    else:
        with Image.open(io.BytesIO(encoded.data)) as image:
            assert image.format == fmt.upper() and image.n_frames == 7 and image.info["loop"] == 0
            durations = []
            for frame in ImageSequence.Iterator(image):
                frame.load()  # WebP fills in a frame's duration when it is decoded
                durations.append(frame.info["duration"])
        assert durations == [120 if fmt == "gif" else 125] * 7  # 1000/8 ms; GIF keeps hundredths
        assert encoded.mime == f"image/{fmt}"
    assert encoded.data_uri().startswith(f"data:{encoded.mime};base64,")


def test_mp4_pads_an_odd_size_to_even_by_repeating_the_edge():
    video = smooth_video(frames=3, height=31, width=45)
    encoded = encode_video(video, "mp4", fps=12)
    decoded = decode_video(encoded.data)
    assert decoded.shape == (3, 32, 46, 3) and (encoded.width, encoded.height) == (46, 32)
    inner = np.abs(decoded[:, :31, :45].astype(int) - reference_uint8(video).astype(int))
    assert inner.mean() < 8


def test_bad_frames_fps_and_formats_are_refused_before_encoding():
    with pytest.raises(VideoError, match="video_format: 'avi'"):
        encode_video(smooth_video(), "avi", 8)  # type: ignore[arg-type]
    for fps in (0, 61, 8.5, True):
        with pytest.raises(VideoError, match="fps"):
            encode_video(smooth_video(), "mp4", fps)  # type: ignore[arg-type]
    with pytest.raises(VideoError, match="frames x height x width"):
        encode_video(smooth_video()[0], "gif", 8)
    # Over the frame bound: refused from the shape, without materialising the frames.
    huge = np.broadcast_to(np.zeros((1, 8, 8, 3), np.uint8), (MAX_FRAMES + 1, 8, 8, 3))
    with pytest.raises(VideoError, match=f"{MAX_FRAMES + 1} frames of 8x8 is over"):
        encode_video(huge, "mp4", 8)


def test_video_options_defaults_and_frame_rate():
    opts, rest, warnings = pop_video_options({"prompt": "a", "num_frames": 9}, "CogVideoXPipeline", {})
    assert opts == VideoOptions("mp4", DEFAULT_FPS["CogVideoXPipeline"], None)
    assert rest == {"prompt": "a", "num_frames": 9} and warnings == []
    opts, rest, _ = pop_video_options({"prompt": "a", "video_format": "gif", "fps": 24}, "WanPipeline", {})
    assert opts == VideoOptions("gif", 24, None) and rest == {"prompt": "a"}
    # LTX-Video's transformer is told frame_rate: the reply plays at it unless fps says otherwise.
    ltx = {"frame_rate": 25}
    assert pop_video_options({"prompt": "a"}, "LTXPipeline", ltx)[0].fps == 25
    opts, rest, _ = pop_video_options({"prompt": "a", "frame_rate": 30}, "LTXPipeline", ltx)
    assert opts.fps == 30 and rest == {"prompt": "a", "frame_rate": 30}
    # A pipeline parameter named fps keeps its value (it goes to the call too).
    opts, rest, _ = pop_video_options({"prompt": "a", "fps": 10}, "I2VGenXLPipeline", {"fps": 16})
    assert opts.fps == 10 and rest == {"prompt": "a", "fps": 10}
    opts, _, warnings = pop_video_options({"prompt": "a", "quality": 50}, "WanPipeline", {})
    assert opts.quality is None and warnings == [
        "quality: ignored, it applies to video_format webp (mp4 has its own fixed settings)"
    ]
    assert pop_video_options({"prompt": "a", "quality": 50, "video_format": "webp"}, "WanPipeline", {})[0].quality == 50


def test_bad_video_options_are_request_errors_naming_each_field():
    with pytest.raises(RequestError) as e:
        pop_video_options(
            {"prompt": "a", "image_format": "png", "video_format": "avi", "fps": True, "quality": 0},
            "WanPipeline",
            {},
        )
    assert e.value.errors == [
        "image_format: this model makes videos, not images; send video_format (mp4, webp, gif; default mp4) instead",
        "video_format: expected one of mp4, webp, gif, got 'avi'",
        "fps: expected a whole number from 1 to 60, got True",
        "quality: expected a whole number from 1 to 100, got 0",
    ]


def test_the_reply_carries_the_video_frames_fps_and_seed():
    videos = [smooth_video(frames=5, seed=1), smooth_video(frames=5, seed=2)]
    delivered = deliver_video(videos, VideoOptions("webp", 10, 70), "job-1", None)
    reply = delivered.reply(seed=42)
    assert set(reply) == {"video", "videos", "frames", "fps", "seed"}
    assert reply["video"] == reply["videos"][0] and len(reply["videos"]) == 2
    assert (reply["frames"], reply["fps"], reply["seed"]) == (5, 10, 42)
    header, _, data = reply["videos"][1].partition(",")
    assert header == "data:image/webp;base64"
    assert base64.b64decode(data) == encode_video(videos[1], "webp", 10, 70).data
    assert delivered.nbytes == sum(len(base64.b64decode(v.partition(",")[2])) for v in reply["videos"])
