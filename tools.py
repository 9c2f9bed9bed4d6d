"""The `crop_video` tool: its JSON schema, pulling calls out of generated text (never raising: the text is whatever
a policy sampled), argument checks (ours clamp the window; LongVT's refuse one outside the video), the window's
frames (video.py decodes them by seeking) and the observation the model sees next. Bad calls and unreadable videos
raise `ToolError`, whose message is the error observation; `observe` never raises.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
from dataclasses import dataclass

import numpy as np

from video import VideoError, crop_times, decode_frames, fmt_time

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


def crop_video(video_path, start_time, end_time, fps=1.0, max_frames=64, min_frames=4,
               max_pixels=56 * 56) -> Clip:
    """Frames of [start_time, end_time] (clamped to the video) sampled at about `fps`.

    n = clamp(round((end-start)*fps), min_frames, max_frames) frames at the centres of n
    equal slices of the window. ToolError for an invalid window or an unreadable file.
    """
    start = _as_seconds(start_time, "start_time")
    end = _as_seconds(end_time, "end_time")
    window = []

    def times(info):  # the window clamped to the header's duration: one open of the file
        window.extend(_clamp_window(start, end, info["duration"]))
        return crop_times(*window, fps, max_frames, min_frames)
    try:
        frames, stamps = decode_frames(video_path, times, max_pixels)
    except VideoError as e:  # the model sees it as the call's error observation
        raise ToolError(str(e)) from None
    start, end = window
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
