"""The `crop_video` tool: its JSON schema, pulling calls out of generated text (never raising: the text is whatever
a policy sampled), argument checks (ours clamp the window; LongVT's refuse one outside the video), and decoding the
window's frames with PyAV by seeking, so that a crop near the end of a one-hour video costs about what one in a
one-minute video does (`decode_frames` is also the global view's sampler). Bad calls raise `ToolError`, whose
message is the error observation the model sees. Times are seconds from the start of the video stream
(pts - stream.start_time: `frame.time` for the usual file that starts at 0).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
from collections import Counter
from dataclasses import dataclass

import av
import numpy as np
from av.video.reformatter import VideoReformatter

CROP_VIDEO_SCHEMA: dict = {
    "type": "function",
    "function": {
        "name": "crop_video",
        "description": (
            "Crop a time window out of the video and return its frames sampled densely, to "
            "look closely at a moment the global view only shows sparsely. Times are in "
            "seconds from the start of the video."
        ),
        "parameters": {
            "type": "object",
            "properties": {
                "start_time": {"type": "number", "description": "Window start, in seconds."},
                "end_time": {"type": "number", "description": "Window end, in seconds; greater than start_time."},
                "video_path": {"type": "string",
                               "description": "Optional: the video to crop (default: the question's video)."},
            },
            "required": ["start_time", "end_time"],
        },
    },
}

# Qwen-VL sees 14-px patches merged 2x2, so image sides must be multiples of 28.
PATCH = 28

# Counters for tests and bench/crop.py: frames the decoder produced and seeks made, summed
# over every call in this process. Lets a test prove "it seeks" without timing anything.
DECODE_STATS: Counter = Counter()

# Seek instead of decoding forward when the next target is further ahead than this (or than
# the keyframe spacing learned so far, whichever is larger): below it a seek would land on a
# keyframe behind us and re-decode frames we already passed.
MIN_SEEK_GAP_S = 2.0


class ToolError(Exception):
    """A tool call that cannot run; str(err) is shown to the model as the observation."""


@dataclass
class ToolCall:
    raw: str                 # text between <tool_call> and </tool_call> (or the unterminated tail)
    name: str | None
    arguments: dict | None
    error: str | None        # None when parsed fine, else a short message for the model


@dataclass
class Clip:
    frames: np.ndarray       # (N, H, W, 3) uint8, H and W multiples of 28
    timestamps: list[float]  # seconds, presentation time of each returned frame
    start: float             # the window actually used, after clamping to [0, duration]
    end: float


def fmt_time(t: float) -> str:
    """Seconds with at most one decimal, half rounded up, no trailing '.0': 12.0->'12', 12.25->'12.3'."""
    if not math.isfinite(t):
        return str(t)
    tenths = math.floor(t * 10 + 0.5)  # integer tenths: one rounding, so 12.25 and 12.35 behave alike
    if tenths % 10 == 0:
        return str(tenths // 10)
    return f"{'-' if tenths < 0 else ''}{abs(tenths) // 10}.{abs(tenths) % 10}"


# ----------------------------------------------------------------------------- parsing

_OPEN, _CLOSE = "<tool_call>", "</tool_call>"


def _parse_one(raw: str, terminated: bool) -> ToolCall:
    """One block's text -> ToolCall; every failure becomes `error`, nothing is raised."""
    if not terminated:
        return ToolCall(raw, None, None, "unterminated <tool_call>: no closing </tool_call>")
    body = raw.strip()
    if not body:
        return ToolCall(raw, None, None, "empty <tool_call> block")
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, int-digit limit, deep nesting
        return ToolCall(raw, None, None, f"tool call is not valid JSON ({str(e)[:80]})")
    if not isinstance(obj, dict):
        return ToolCall(raw, None, None, "tool call must be a JSON object with \"name\" and \"arguments\"")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return ToolCall(raw, None, None, "tool call has no \"name\" string")
    args = obj.get("arguments", {})
    if isinstance(args, str):  # OpenAI style: arguments as a JSON-encoded string
        try:
            args = json.loads(args) if args.strip() else {}
        except (ValueError, RecursionError):
            return ToolCall(raw, name, None, "\"arguments\" string is not valid JSON")
    if not isinstance(args, dict):
        return ToolCall(raw, name, None, "\"arguments\" must be a JSON object")
    return ToolCall(raw, name, args, None)


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every <tool_call> block of `text`, in order. Never raises, whatever the string.

    A block ends at the next </tool_call>; a new <tool_call> before that (or the end of the
    text) ends it unterminated, so a nested or truncated call yields an error entry rather
    than swallowing the next call. Stray </tool_call> tags outside blocks are ignored.
    """
    calls: list[ToolCall] = []
    if not isinstance(text, str):
        return calls
    # One left-to-right pass: `close` is re-searched only once passed, so a text of many
    # openings and no closing stays linear instead of rescanning to the end per opening.
    pos, close = text.find(_OPEN), text.find(_CLOSE)
    while pos != -1:
        body_start = pos + len(_OPEN)
        if close != -1 and close < body_start:
            close = text.find(_CLOSE, body_start)
        nxt = text.find(_OPEN, body_start)
        terminated = close != -1 and (nxt == -1 or close < nxt)
        end = close if terminated else (nxt if nxt != -1 else len(text))
        calls.append(_parse_one(text[body_start:end], terminated))
        pos = nxt  # when terminated, nxt is past `close` already
    return calls


# -------------------------------------------------------------------------- validation

_NUMBER = re.compile(r"^\s*[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?\s*$")


def _as_seconds(value, key: str) -> float:
    """A finite float from a JSON value; numeric strings ("12.5") are tolerated, bools are not."""
    if value is None:
        raise ToolError(f"missing argument {key!r}")
    if isinstance(value, bool):
        raise ToolError(f"{key} must be a number of seconds, got {value!r}")
    if isinstance(value, str) and _NUMBER.match(value):
        value = float(value)
    if not isinstance(value, numbers.Real):  # int, float, numpy scalars
        raise ToolError(f"{key} must be a number of seconds, got {str(value)[:40]!r}")
    try:
        x = float(value)
    except OverflowError:  # a JSON integer with hundreds of digits
        raise ToolError(f"{key} must be a finite number of seconds") from None
    if not math.isfinite(x):
        raise ToolError(f"{key} must be a finite number of seconds, got {x}")
    return x


def _clamp_window(start: float, end: float, duration: float) -> tuple[float, float]:
    """Check a window against [0, duration] and clamp a partly-outside one into it."""
    if end <= start:
        raise ToolError(f"end_time ({fmt_time(end)}) must be greater than start_time ({fmt_time(start)})")
    if end <= 0 or start >= duration:
        raise ToolError(f"window [{fmt_time(start)}, {fmt_time(end)}] s is outside the video "
                        f"(0 to {fmt_time(duration)} s)")
    return max(0.0, start), min(float(duration), end)


def _video_name(path: str) -> str:
    """Basename of a path or file:// URL, for comparing the model's video_path with the sample's."""
    p = path.strip()
    if p.startswith("file://"):
        p = p[len("file://"):]
    return os.path.basename(p.rstrip("/\\").replace("\\", "/"))


def _crop_call(call: ToolCall) -> dict:
    """The arguments of a parsed crop_video call, or ToolError (unparsed, another tool)."""
    if call.error is not None:
        raise ToolError(call.error)
    if call.name != "crop_video":
        raise ToolError(f"unknown tool {call.name!r}; the only tool is 'crop_video'")
    return call.arguments or {}


def validate_crop_args(call: ToolCall, video_path: str, duration: float) -> tuple[float, float]:
    """The clamped (start, end) window of a parsed call, or ToolError saying what is wrong."""
    args = _crop_call(call)
    named = args.get("video_path")
    if named not in (None, ""):
        # LongVT's traces pass the video's path; it must be this sample's video, whatever folder.
        if not isinstance(named, str):
            raise ToolError("video_path must be a string")
        if _video_name(named) != _video_name(str(video_path)):
            raise ToolError(f"video_path {named[:80]!r} is not this question's video")
    start = _as_seconds(args.get("start_time"), "start_time")
    end = _as_seconds(args.get("end_time"), "end_time")
    return _clamp_window(start, end, duration)


LONGVT_OK = "The tool executed successfully. Here are the processed result"


def longvt_crop_args(call: ToolCall, video_path: str, duration: float) -> tuple[float, float]:
    """LongVT's tool checks, in its order and with its messages (../FORMATS.md): the path and both times are
    required, the window must lie inside the video (an error, not a clamp). Returns the raw (start, end)."""
    args = _crop_call(call)
    for k in ("video_path", "start_time", "end_time"):
        if k not in args:
            raise ToolError(f"{k} parameter is required")
    named = args["video_path"]
    if not isinstance(named, str) or not named.strip():
        raise ToolError("video_path parameter is required")
    # numbers as the call wrote them (LongVT's messages print 10 and 10.0 apart); else our message or a float
    start, end = (args[k] if _as_seconds(args[k], k) == args[k] else _as_seconds(args[k], k)
                  for k in ("start_time", "end_time"))
    if start < 0:
        raise ToolError(f"start_time must be non-negative, got {start}")
    if end <= start:
        raise ToolError(f"end_time ({end}) must be greater than start_time ({start})")
    if _video_name(named) != _video_name(str(video_path)):  # LongVT opens any path; we read only the sample's
        raise ToolError(f"Video file not found: {named[:200]}")
    if start >= duration:
        raise ToolError(f"start_time ({start}s) exceeds video duration ({duration:.2f}s)")
    if end > duration:
        raise ToolError(f"end_time ({end}s) exceeds video duration ({duration:.2f}s)")
    return float(start), float(end)


# ---------------------------------------------------------------------------- decoding

def _open(path):
    """(container, video stream) or ToolError naming the file; the caller closes the container."""
    path = str(path)
    if not os.path.isfile(path):
        raise ToolError(f"video file not found: {path}")
    try:
        container = av.open(path)
    except (av.FFmpegError, OSError, ValueError) as e:
        raise ToolError(f"cannot read video {path}: {e}") from None
    if not container.streams.video:
        container.close()
        raise ToolError(f"no video stream in {path}")
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
        raise ToolError(f"cannot determine the duration of video {path}")
    width, height = stream.codec_context.width, stream.codec_context.height
    if not width or not height:
        raise ToolError(f"video {path} has no frame size")
    return {"duration": duration, "fps": fps, "width": int(width), "height": int(height)}


def video_info(path) -> dict:
    """{"duration": s, "fps": float, "width": int, "height": int}; ToolError when unreadable."""
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
            raise ToolError(f"frame time must be finite, got {t}")
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
                raise ToolError(f"no frame could be decoded from video {path}")
            if frame is last_frame:  # times denser than the video's frames: duplicate
                out[i] = out[last_i]
            else:
                rgb = scaler.reformat(frame, width=w, height=h, format="rgb24", interpolation="AREA")
                out[i] = rgb.to_ndarray()
            stamps[i] = float((frame.pts - start_pts) * tb)
            last_frame, last_i = frame, i
    except av.FFmpegError as e:
        raise ToolError(f"cannot decode video {path}: {e}") from None
    return out, stamps


def decode_frames(path, times: list[float], max_pixels: int) -> tuple[np.ndarray, list[float]]:
    """For each time (s), the frame displayed then, resized to fit max_pixels (28-multiples).

    Returns ((len(times), H, W, 3) uint8, the actual frame times), in the order of `times`.
    Seeks to the keyframe before a far target and decodes forward to near ones, so the cost
    depends on the number of targets and the keyframe spacing, not on where they are.
    """
    container, stream = _open(path)
    try:
        info = _probe(container, stream, path)
        size = fit_size(info["width"], info["height"], max_pixels)
        frames, stamps = _decode(container, stream, path, list(times), size)
    finally:
        container.close()
    _check_decoded(path, times, stamps, info)
    return frames, stamps


def _check_decoded(path, times, stamps, info):
    """A truncated file decodes without error and repeats its last decodable frame: a frame more than about one
    frame (and 2 s) older than the time asked is a ToolError, never passed on as that time's frame."""
    slack = max(2.0, 2.5 / info["fps"]) if info["fps"] > 0 else 2.0  # headers may run a little past the frames
    short = [(t, st) for t, st in zip(times, stamps) if t - st > slack]
    if short:
        t, st = short[0]
        raise ToolError(f"video {path} has no frame at {t:.1f}s (the last one decoded there is at {st:.1f}s of its "
                        f"{info['duration']:.1f}-s header): the file is truncated or damaged")


def crop_times(start, end, fps=1.0, max_frames=64, min_frames=4):
    """The times a crop of [start, end] samples: n = clamp(round((end-start)*fps), min_frames, max_frames) frames
    at the centres of n equal slices of the window."""
    n = max(1, min(max_frames, max(min_frames, round((end - start) * fps))))
    step = (end - start) / n
    return [start + (i + 0.5) * step for i in range(n)]


def crop_video(video_path, start_time, end_time, fps=1.0, max_frames=64, min_frames=4,
               max_pixels=56 * 56) -> Clip:
    """Frames of [start_time, end_time] (clamped to the video) sampled at about `fps`.

    n = clamp(round((end-start)*fps), min_frames, max_frames) frames at the centres of n
    equal slices of the window. ToolError for an invalid window or an unreadable file.
    """
    start = _as_seconds(start_time, "start_time")
    end = _as_seconds(end_time, "end_time")
    container, stream = _open(video_path)
    try:
        info = _probe(container, stream, video_path)
        start, end = _clamp_window(start, end, info["duration"])
        times = crop_times(start, end, fps, max_frames, min_frames)
        size = fit_size(info["width"], info["height"], max_pixels)
        frames, stamps = _decode(container, stream, video_path, times, size)
    finally:
        container.close()
    _check_decoded(video_path, times, stamps, info)
    return Clip(frames=frames, timestamps=stamps, start=start, end=end)


# --------------------------------------------------------------------------- the observation a call produces
def observe(turn_text, video_path, duration, fps=1.0, max_frames=64, min_frames=4, max_pixels=56 * 56,
            protocol="ours") -> dict:
    """Run the last tool call of an assistant turn. Returns the observation the model sees next:
    dict(frames (N, H, W, 3) or None, timestamps, text, window [s, e] or None, error str or None, raw).
    Never raises: every failure (unparseable call, unknown tool, bad window, unreadable video) becomes an
    error observation, so the episode goes on. protocol "longvt"/"longvt_eval": LongVT's checks and texts."""
    longvt = protocol.startswith("longvt")
    calls = parse_tool_calls(turn_text)
    raw = calls[-1].raw if calls else ""
    try:
        if not calls:
            raise ToolError("no <tool_call> block found")
        start, end = (longvt_crop_args if longvt else validate_crop_args)(calls[-1], video_path, duration)
        clip = crop_video(video_path, start, end, fps=fps, max_frames=max_frames, min_frames=min_frames,
                          max_pixels=max_pixels)
    except ToolError as e:
        return dict(frames=None, timestamps=[], text=f"Tool execution failed: {e}", window=None, error=str(e), raw=raw)
    ok = LONGVT_OK if longvt else f"Frames from {fmt_time(clip.start)}s to {fmt_time(clip.end)}s."
    return dict(frames=clip.frames, timestamps=list(clip.timestamps), text=ok, window=[clip.start, clip.end],
                error=None, raw=raw)
