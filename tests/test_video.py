"""Tests of video.py (seek-and-decode, frame sizes, time formatting) and of the crop tool on real files.

The test videos are written with PyAV and every frame shows its own index as a 4x4 grid of
black/white blocks (bit b of the index -> block b), coarse enough to survive lossy coding and
downscaling. So a returned frame can be checked against its returned timestamp:
index(pixels) == round(t * fps), and against a plain sequential decode of the same file.
"""

from __future__ import annotations

import bisect
import math
import random
from fractions import Fraction

import av
import numpy as np
import pytest

import tools
import video
from tools import ToolError
from video import VideoError


GRID = 4  # 4x4 blocks -> 16 bits of frame index


def _index_image(i: int, size: int) -> np.ndarray:
    """(size, size, 3) uint8 frame whose blocks spell `i` in binary (white = 1)."""
    img = np.zeros((size, size, 3), np.uint8)
    b = size // GRID
    for bit in range(GRID * GRID):
        if (i >> bit) & 1:
            r, c = divmod(bit, GRID)
            img[r * b:(r + 1) * b, c * b:(c + 1) * b] = 255
    return img


def _read_index(img: np.ndarray) -> int:
    """Inverse of _index_image at any resolution: the mean of each block's central half."""
    h, w = img.shape[:2]
    value = 0
    for bit in range(GRID * GRID):
        r, c = divmod(bit, GRID)
        y0, y1 = int((r + 0.25) * h / GRID), int((r + 0.75) * h / GRID)
        x0, x1 = int((c + 0.25) * w / GRID), int((c + 0.75) * w / GRID)
        if img[y0:y1, x0:x1].mean() > 127:
            value |= 1 << bit
    return value


def _codec_options(codec: str, gop: int) -> dict:
    """Encoder settings with a real GOP (no scene-cut keyframes) and B-frames where possible."""
    if codec == "libx264":
        return {"preset": "ultrafast", "crf": "18",
                "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes=2"}
    if codec == "mpeg4":
        # Every frame differs a lot, so without sc_threshold mpeg4 makes them all I-frames.
        return {"g": str(gop), "bf": "2", "sc_threshold": "1000000000", "qscale": "3"}
    return {"g": str(gop), "keyint_min": str(gop), "deadline": "realtime", "cpu-used": "8", "crf": "20", "b": "0"}


def _write_video(path, codec: str, rate: Fraction, n_frames: int, size: int, gop: int) -> None:
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate, options=_codec_options(codec, gop))
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(_index_image(i, size), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _has_encoder(codec: str) -> bool:
    try:
        av.codec.Codec(codec, "w")
    except (ValueError, av.FFmpegError):
        return False
    return True


def _ground_truth(path) -> list[float]:
    """Presentation times (s from the stream start) of every frame, by a plain full decode."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        start = s.start_time or 0
        return [float((f.pts - start) * s.time_base) for f in c.decode(s)]


def _shown_at(truth: list[float], t: float) -> float:
    """Time of the frame displayed at t: largest frame time <= t, else the first frame."""
    k = bisect.bisect_right(truth, t + 1e-6) - 1
    return truth[max(k, 0)]


SIZE = 112  # 4 blocks of 28 px; max_pixels=SIZE*SIZE returns frames at native size


VARIANTS = [  # (id, codec, container suffix, fps, seconds, gop in frames)
    ("h264-10", "libx264", "mp4", Fraction(10), 30, 20),
    ("h264-2997", "libx264", "mp4", Fraction(30000, 1001), 20, 60),
    ("mpeg4-10", "mpeg4", "mp4", Fraction(10), 30, 20),
    ("mpeg4-2997", "mpeg4", "mp4", Fraction(30000, 1001), 20, 60),
    ("vp9-10", "libvpx-vp9", "webm", Fraction(10), 30, 20),
    ("vp9-2997", "libvpx-vp9", "webm", Fraction(30000, 1001), 12, 60),
    # MPEG-TS: the stream starts at a non-zero pts and its seeks land imprecisely.
    ("h264-ts", "libx264", "ts", Fraction(30000, 1001), 12, 30),
]


@pytest.fixture(scope="session")
def tool_videos(tmp_path_factory):
    """{variant id: (path, fps, n_frames, ground-truth frame times)}; None where no encoder."""
    root = tmp_path_factory.mktemp("tool_videos")
    made = {}
    for vid, codec, ext, fps, seconds, gop in VARIANTS:
        if not _has_encoder(codec):
            made[vid] = None
            continue
        path = root / f"{vid}.{ext}"
        n = int(seconds * fps)
        _write_video(path, codec, fps, n, SIZE, gop)
        made[vid] = (str(path), float(fps), n, _ground_truth(path))
    return made


def _video(tool_videos, vid):
    if tool_videos[vid] is None:
        pytest.skip(f"{vid}: encoder not in this PyAV build")
    return tool_videos[vid]


def _check_frames(frames, stamps, fps):
    for img, t in zip(frames, stamps):
        assert _read_index(img) == round(t * fps), (t, _read_index(img))


@pytest.mark.parametrize("vid", [v[0] for v in VARIANTS])
def test_test_video_is_what_we_think(tool_videos, vid):
    """The generator itself: frame i at i/fps, index readable, and a real GOP to seek over."""
    path, fps, n, truth = _video(tool_videos, vid)
    assert len(truth) == n
    assert [round(t * fps) for t in truth] == list(range(n))
    with av.open(path) as c:
        s = c.streams.video[0]
        keys = [f.pts for f in c.decode(s) if f.key_frame]
        assert len(keys) <= n // 20 + 2  # so seeking matters
    info = video.video_info(path)
    assert info["width"] == info["height"] == SIZE
    assert info["fps"] == pytest.approx(fps, rel=1e-3)
    assert info["duration"] == pytest.approx(n / fps, abs=2 / fps)


@pytest.mark.parametrize("vid", [v[0] for v in VARIANTS])
def test_crop_windows_return_the_frames_shown(tool_videos, vid):
    path, fps, n, truth = _video(tool_videos, vid)
    duration = video.video_info(path)["duration"]
    windows = [(0.0, 3.0), (duration / 2 - 2.5, duration / 2 + 2.5), (duration - 4.0, duration),
               (duration - 2.0, duration + 50.0), (-7.0, 1.5)]
    for start, end in windows:
        clip = tools.crop_video(path, start, end, fps=2.0, max_pixels=SIZE * SIZE)
        s, e = max(0.0, start), min(duration, end)
        assert (clip.start, clip.end) == pytest.approx((s, e))
        k = len(clip.timestamps)
        assert k == min(64, max(4, round((e - s) * 2.0)))
        assert clip.frames.shape == (k, SIZE, SIZE, 3) and clip.frames.dtype == np.uint8
        wanted = [s + (i + 0.5) * (e - s) / k for i in range(k)]
        assert clip.timestamps == pytest.approx([_shown_at(truth, t) for t in wanted], abs=1e-9)
        _check_frames(clip.frames, clip.timestamps, fps)


@pytest.mark.parametrize("vid", ["h264-2997", "mpeg4-10", "vp9-2997", "h264-ts"])
def test_decode_frames_random_times_match_sequential_decode(tool_videos, vid):
    """Unsorted, duplicated, out-of-range and exact-frame times, with jumps near keyframes."""
    path, fps, n, truth = _video(tool_videos, vid)
    rnd = random.Random(vid)
    for _ in range(6):
        times = [rnd.uniform(-1.0, truth[-1] + 1.0) for _ in range(rnd.randint(1, 12))]
        times += [truth[rnd.randrange(n)] for _ in range(3)] + [times[0]]
        frames, stamps = video.decode_frames(path, times, max_pixels=SIZE * SIZE)
        assert stamps == pytest.approx([_shown_at(truth, t) for t in times], abs=1e-9)
        _check_frames(frames, stamps, fps)


def test_decode_frames_resizes_and_handles_empty(tool_videos):
    path, fps, _, _ = _video(tool_videos, "h264-10")
    frames, stamps = video.decode_frames(path, [1.0, 2.0], max_pixels=56 * 56)
    assert frames.shape == (2, 56, 56, 3)
    _check_frames(frames, stamps, fps)  # the index survives the 2x downscale
    frames, stamps = video.decode_frames(path, [], max_pixels=56 * 56)
    assert frames.shape == (0, 56, 56, 3) and stamps == []
    with pytest.raises(VideoError):
        video.decode_frames(path, [float("nan")], max_pixels=56 * 56)


@pytest.mark.parametrize("w,h,max_pixels,expect", [
    (112, 112, 112 * 112, (112, 112)),
    (64, 64, 56 * 56, (56, 56)),
    (1920, 1080, 224 * 224, None),
    (320, 180, 56 * 56, None),
    (100, 4000, 28 * 28 * 4, (28, 112)),  # extreme aspect: budget wins
    (640, 480, 10, (28, 28)),  # below one patch: 28x28 is the floor
])
def test_fit_size(w, h, max_pixels, expect):
    fw, fh = video.fit_size(w, h, max_pixels)
    assert fw % 28 == 0 and fh % 28 == 0 and fw >= 28 and fh >= 28
    if expect is not None:
        assert (fw, fh) == expect
    else:
        assert fw * fh <= max_pixels
        assert abs(math.log((fw / fh) / (w / h))) < 0.7  # aspect roughly kept


def test_one_hour_video_crop_near_end_seeks(tmp_path):
    """A crop at 59:50 must decode about one GOP + the window, not the hour before it."""
    path = tmp_path / "hour.mp4"
    fps, n, gop = 1, 3600, 120
    _write_video(path, "libx264", Fraction(fps), n, 64, gop)
    before = dict(video.DECODE_STATS)
    clip = tools.crop_video(path, 3590.0, 3600.0, fps=1.0, max_pixels=64 * 64)
    decoded = video.DECODE_STATS["frames"] - before.get("frames", 0)
    assert video.DECODE_STATS["seeks"] > before.get("seeks", 0)
    assert decoded <= gop + 20, decoded  # a sequential decode would be 3600
    assert clip.frames.shape == (10, 56, 56, 3)
    assert clip.timestamps == [float(t) for t in range(3590, 3600)]
    _check_frames(clip.frames, clip.timestamps, fps)
    # A sparse global view over the whole hour also stays far from a full decode.
    times = [(i + 0.5) * 3600 / 16 for i in range(16)]
    before = video.DECODE_STATS["frames"]
    frames, stamps = video.decode_frames(path, times, max_pixels=64 * 64)
    assert video.DECODE_STATS["frames"] - before <= 16 * (gop + 1)
    _check_frames(frames, stamps, fps)


@pytest.mark.parametrize("t,s", [(12.0, "12"), (12.25, "12.3"), (12.35, "12.4"), (0.04, "0"),
                                 (0.05, "0.1"), (59.96, "60"), (3599.5, "3599.5"), (-0.06, "-0.1"),
                                 (-2.0, "-2"), (7, "7")])
def test_fmt_time(t, s):
    assert video.fmt_time(t) == s


def test_crops_from_threads_match_sequential(tool_videos):
    """rollout.py runs observe() in a thread pool: calls share no decoder state."""
    from concurrent.futures import ThreadPoolExecutor
    path, _, _, _ = _video(tool_videos, "h264-2997")
    windows = [(s, s + 3.0) for s in (0.0, 4.5, 9.0, 15.0, 16.9)] * 2
    seq = [tools.crop_video(path, s, e, fps=3.0, max_pixels=SIZE * SIZE) for s, e in windows]
    with ThreadPoolExecutor(4) as pool:
        par = list(pool.map(lambda w: tools.crop_video(path, *w, fps=3.0, max_pixels=SIZE * SIZE), windows))
    for a, b in zip(seq, par):
        assert a.timestamps == b.timestamps and np.array_equal(a.frames, b.frames)


def test_a_file_cut_short_with_its_index_first_is_an_error_not_repeated_frames(tmp_path):
    """An mp4 written with its index first (faststart) and cut at 50% opens and decodes without an FFmpeg error:
    a crop past the cut used to return copies of the last decodable frame as "Frames from 100s to 120s", and the
    global view repeated it. Frames whose decoded time falls short of the asked one are a ToolError naming the
    file (an error observation in a rollout, a named skip for a sample); times before the cut still decode."""
    path = tmp_path / "cut.mp4"
    with av.open(str(path), "w", options={"movflags": "faststart"}) as out:
        st = out.add_stream("libx264", rate=2, options={"preset": "ultrafast"})
        st.width = st.height = 64
        st.pix_fmt = "yuv420p"
        for i in range(2 * 160):
            for packet in st.encode(av.VideoFrame.from_ndarray(_index_image(i, 64), format="rgb24")):
                out.mux(packet)
        for packet in st.encode():
            out.mux(packet)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert video.video_info(path)["duration"] == pytest.approx(160, abs=1)  # the header still says 160 s
    with pytest.raises(ToolError, match=r"cut.mp4 has no frame at 1\d\d\.\ds .*truncated or damaged"):
        tools.crop_video(path, 100, 120)
    obs = tools.observe(tools_call(100, 120), str(path), 160.0)
    assert obs["frames"] is None and "truncated or damaged" in obs["text"]
    frames, stamps = video.decode_frames(path, [1.0, 10.0], 64 * 64)  # before the cut (at ~48 s here): fine
    assert stamps == [1.0, 10.0]


def tools_call(a, b):
    return f'<tool_call>{{"name": "crop_video", "arguments": {{"start_time": {a}, "end_time": {b}}}}}</tool_call>'


def test_crop_errors(tool_videos, tmp_path):
    path, _, _, _ = _video(tool_videos, "h264-10")
    duration = video.video_info(path)["duration"]
    bad_windows = [(5.0, 5.0), (6.0, 5.0), (float("nan"), 5.0), (1.0, float("inf")),
                   (duration, duration + 5), (duration + 10, duration + 20), (-10.0, 0.0), ("a", 3)]
    for start, end in bad_windows:
        with pytest.raises(ToolError):
            tools.crop_video(path, start, end)
    missing = tmp_path / "nope.mp4"
    with pytest.raises(ToolError, match="nope.mp4"):
        tools.crop_video(missing, 0, 5)
    with pytest.raises(VideoError, match="nope.mp4"):
        video.video_info(missing)
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    with pytest.raises(ToolError, match="corrupt.mp4"):
        tools.crop_video(corrupt, 0, 5)
    truncated = tmp_path / "truncated.mp4"  # moov atom is at the end, so half a file is unreadable
    data = open(path, "rb").read()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ToolError, match="truncated.mp4"):
        tools.crop_video(truncated, 0, 5)
