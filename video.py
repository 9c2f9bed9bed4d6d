"""Reading videos with PyAV: headers (`video_info`), the frames shown at given times (`decode_frames`, by seeking, so
that a window near the end of a one-hour video costs about what one in a one-minute video does), the frame sizes
Qwen-VL takes (`fit_size`) and the times a window is sampled at (`crop_times`). The global view (data.py) and the
crop tool (tools.py) both read through here. An unreadable, missing or truncated file is a `VideoError` naming it.
Times are seconds from the start of the video stream (pts - stream.start_time: `frame.time` for the usual file that
starts at 0).
"""
import math
import os
from collections import Counter

import av
import numpy as np
from av.video.reformatter import VideoReformatter

# Qwen-VL sees 14-px patches merged 2x2, so image sides must be multiples of 28.
PATCH = 28

# Counters for tests and bench/crop.py: frames the decoder produced and seeks made, summed
# over every call in this process. Lets a test prove "it seeks" without timing anything.
DECODE_STATS: Counter = Counter()

# Seek instead of decoding forward when the next target is further ahead than this (or than
# the keyframe spacing learned so far, whichever is larger): below it a seek would land on a
# keyframe behind us and re-decode frames we already passed.
MIN_SEEK_GAP_S = 2.0


class VideoError(Exception):
    """A video that cannot be read (missing, not a video, damaged, truncated); str(err) names the file."""


def fmt_time(t: float) -> str:
    """Seconds with at most one decimal, half rounded up, no trailing '.0': 12.0->'12', 12.25->'12.3'."""
    if not math.isfinite(t):
        return str(t)
    tenths = math.floor(t * 10 + 0.5)  # integer tenths: one rounding, so 12.25 and 12.35 behave alike
    if tenths % 10 == 0:
        return str(tenths // 10)
    return f"{'-' if tenths < 0 else ''}{abs(tenths) // 10}.{abs(tenths) % 10}"



def _open(path):
    """(container, video stream) or VideoError naming the file; the caller closes the container."""
    path = str(path)
    if not os.path.isfile(path):
        raise VideoError(f"video file not found: {path}")
    try:
        container = av.open(path)
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoError(f"cannot read video {path}: {e}") from None
    if not container.streams.video:
        container.close()
        raise VideoError(f"no video stream in {path}")
    return container, container.streams.video[0]


def _probe(container, stream, path) -> dict:
    """Duration (s), fps and size from the headers; no frame is decoded in the common case."""
    fps = float(stream.average_rate or stream.guessed_rate or stream.base_rate or 0)
    duration = None
    if stream.duration and stream.time_base:
        duration = float(stream.duration * stream.time_base)  # mp4: exact, in the stream's clock
    elif container.duration:
        duration = container.duration / av.time_base           # webm/mkv: microseconds
    elif stream.frames and fps > 0:
        duration = stream.frames / fps
    if not duration or not math.isfinite(duration) or duration <= 0:
        raise VideoError(f"cannot determine the duration of video {path}")
    width, height = stream.codec_context.width, stream.codec_context.height
    if not width or not height:
        raise VideoError(f"video {path} has no frame size")
    return {"duration": duration, "fps": fps, "width": int(width), "height": int(height)}


def video_info(path) -> dict:
    """{"duration": s, "fps": float, "width": int, "height": int}; VideoError when unreadable."""
    container, stream = _open(path)
    try:
        return _probe(container, stream, path)
    finally:
        container.close()


def fit_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """(w, h), multiples of 28, aspect kept, w*h <= max_pixels (28x28 at least, even if larger).

    Qwen-VL's smart_resize rule: round each side to 28, shrink both by one factor if over budget.
    """
    w = max(PATCH, round(width / PATCH) * PATCH)
    h = max(PATCH, round(height / PATCH) * PATCH)
    if w * h > max_pixels:
        scale = math.sqrt(width * height / max_pixels)
        w = max(PATCH, math.floor(width / scale / PATCH) * PATCH)
        h = max(PATCH, math.floor(height / scale / PATCH) * PATCH)
    if w * h > max_pixels:  # extreme aspect: the short side hit 28, so cut the long one
        if w > h:
            w = max(PATCH, max_pixels // (h * PATCH) * PATCH)
        else:
            h = max(PATCH, max_pixels // (w * PATCH) * PATCH)
    return w, h


class _Cursor:
    """Forward frame reader over one stream that jumps ahead by seeking.

    Holds at most two decoded frames: `prev` (last frame with pts <= the last target served)
    and `ahead` (the first frame past it), so memory does not grow with the window.
    Targets (pts units) must come in increasing order.
    """

    def __init__(self, container, stream, start_pts: int, one_second: int):
        self.container, self.stream = container, stream
        self.start_pts, self.one_second = start_pts, one_second
        # A freshly opened container sits at the true start: read from there until a far
        # target asks for a seek. (Rewinding later is what needs care, see _rewind.)
        self.frames = container.decode(stream)
        self.prev = self.ahead = self.last_key = self.last_pts = None
        self.done = False           # decoder ran out: `prev` is the last frame of the video
        self.gop = 0                # learned lower bound on keyframe spacing, pts units

    def _pull(self):
        """Next decoded frame in presentation order, or None at the end of the stream."""
        frame = next(self.frames, None)
        if frame is None:
            self.done = True
            return None
        DECODE_STATS["frames"] += 1
        if frame.pts is None:       # rare (raw streams): assume one tick after the last frame
            frame.pts = (self.last_pts if self.last_pts is not None else self.start_pts) + 1
        self.last_pts = frame.pts
        if frame.key_frame:
            if self.last_key is not None:
                self.gop = max(self.gop, frame.pts - self.last_key)
            self.last_key = frame.pts
        return frame

    def _restart(self) -> None:
        self.frames = self.container.decode(self.stream)
        self.prev = self.ahead = None
        self.done, self.last_key = False, None

    def _rewind(self) -> None:
        """Back to the first packet. Seeking to 0 in AV_TIME_BASE with no stream works for
        mp4/mkv/webm/ts/avi/flv alike; seeking the stream to start_time does not (mpegts lands
        a GOP late, avi/flv refuse a target before their first packet)."""
        DECODE_STATS["seeks"] += 1
        self.container.seek(0)
        self._restart()

    def _seek(self, target: int) -> None:
        """Land on a keyframe at or before `target`, stepping back if the demuxer lands after."""
        back = max(self.gop, self.one_second)
        while True:
            if target <= self.start_pts:
                self._rewind()
                first = self._pull()
                break
            DECODE_STATS["seeks"] += 1
            try:
                self.container.seek(target, stream=self.stream, backward=True)
            except av.FFmpegError:  # some demuxers cannot seek this stream: start over
                self._rewind()
                first = self._pull()
                break
            self._restart()
            first = self._pull()
            # mp4 indexes keyframes by decode time, which B-frames put before presentation
            # time, and mpegts seeks by bisection: the landing keyframe can be shown after
            # `target` (or be past the last one). Step back (doubling) and retry.
            if first is not None and first.pts <= target:
                break
            target -= back
            back *= 2
        if first is not None:
            self.gop = max(self.gop, target - first.pts)  # the next keyframe is past target
            if first.pts <= target:
                self.prev = first
            else:
                self.ahead = first  # the video's first frame starts after target: serve it

    def frame_at(self, target: int, seek_gap: int):
        """The frame displayed at pts `target`: the last frame with pts <= target, else the first."""
        pos = self.ahead if self.ahead is not None else self.prev
        pos_pts = pos.pts if pos is not None else self.start_pts
        if not self.done and target - pos_pts > max(seek_gap, self.gop):
            self._seek(target)
        while not self.done and (self.ahead is None or self.ahead.pts <= target):
            if self.ahead is not None:
                self.prev = self.ahead
            self.ahead = self._pull()
        # prev is None only when target precedes the first frame, which is then what is shown.
        return self.prev if self.prev is not None else self.ahead


def _decode(container, stream, path, times, size):
    """Core of decode_frames on an open container; `size` = (w, h) of the output frames."""
    tb = stream.time_base
    start_pts = stream.start_time or 0
    w, h = size
    for t in times:
        if not math.isfinite(t):
            raise VideoError(f"frame time must be finite, got {t}")
    # Targets in pts units; a microsecond of slack so a time computed as i/fps in floats
    # still selects frame i rather than i-1.
    targets = [start_pts + math.floor((t + 1e-6) / tb) for t in times]
    order = sorted(range(len(times)), key=lambda i: targets[i])
    out = np.empty((len(times), h, w, 3), np.uint8)
    stamps = [0.0] * len(times)
    stream.thread_type = "AUTO"  # frame threads: seek() flushes them, so results are unchanged
    one_second = max(1, int(1 / tb))
    cursor = _Cursor(container, stream, start_pts, one_second)
    seek_gap = int(MIN_SEEK_GAP_S * one_second)
    # One scaler for the whole call: frame.to_ndarray(width=...) builds a new SwsContext per
    # frame, which costs ~5x the conversion itself at these sizes.
    scaler = VideoReformatter()
    last_frame, last_i = None, None
    try:
        for i in order:
            frame = cursor.frame_at(targets[i], seek_gap)
            if frame is None:
                raise VideoError(f"no frame could be decoded from video {path}")
            if frame is last_frame:  # times denser than the video's frames: duplicate
                out[i] = out[last_i]
            else:
                rgb = scaler.reformat(frame, width=w, height=h, format="rgb24", interpolation="AREA")
                out[i] = rgb.to_ndarray()
            stamps[i] = float((frame.pts - start_pts) * tb)
            last_frame, last_i = frame, i
    except av.FFmpegError as e:
        raise VideoError(f"cannot decode video {path}: {e}") from None
    return out, stamps


def decode_frames(path, times, max_pixels: int) -> tuple[np.ndarray, list[float]]:
    """For each time (s), the frame displayed then, resized to fit max_pixels (28-multiples).

    `times`: a list, or a function of the header info (video_info's dict) returning one, for times that depend on
    the duration (a crop's window is clamped to it), so the file is opened once. Returns ((len(times), H, W, 3)
    uint8, the actual frame times), in the order of `times`. Seeks to the keyframe before a far target and decodes
    forward to near ones, so the cost depends on the number of targets and the keyframe spacing, not on where they
    are.
    """
    container, stream = _open(path)
    try:
        info = _probe(container, stream, path)
        times = list(times(info) if callable(times) else times)
        size = fit_size(info["width"], info["height"], max_pixels)
        frames, stamps = _decode(container, stream, path, times, size)
    finally:
        container.close()
    _check_decoded(path, times, stamps, info)
    return frames, stamps


def _check_decoded(path, times, stamps, info):
    """A truncated file decodes without error and repeats its last decodable frame: a frame more than about one
    frame (and 2 s) older than the time asked is a VideoError, never passed on as that time's frame."""
    slack = max(2.0, 2.5 / info["fps"]) if info["fps"] > 0 else 2.0  # headers may run a little past the frames
    short = [(t, st) for t, st in zip(times, stamps) if t - st > slack]
    if short:
        t, st = short[0]
        raise VideoError(f"video {path} has no frame at {t:.1f}s (the last one decoded there is at {st:.1f}s of its "
                        f"{info['duration']:.1f}-s header): the file is truncated or damaged")


def crop_times(start, end, fps=1.0, max_frames=64, min_frames=4):
    """The times a crop of [start, end] samples: n = clamp(round((end-start)*fps), min_frames, max_frames) frames
    at the centres of n equal slices of the window."""
    n = max(1, min(max_frames, max(min_frames, round((end - start) * fps))))
    step = (end - start) / n
    return [start + (i + 0.5) * step for i in range(n)]
