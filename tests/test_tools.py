"""Tests of tools.py: parsing tool calls, validating crop arguments, observations (the test videos and their
fixture are test_video.py's)."""

from __future__ import annotations

import json
import random

import pytest

import tools
import video
from test_video import SIZE, _check_frames, _video, tool_videos  # noqa: F401, F811  (a fixture)
from tools import ToolCall, ToolError


def _call(args: dict, name="crop_video", indent=None) -> str:
    return json.dumps({"name": name, "arguments": args}, indent=indent)


WELL_FORMED = [
    ('<tool_call>{"name": "crop_video", "arguments": {"start_time": 1, "end_time": 2}}</tool_call>',
     [("crop_video", {"start_time": 1, "end_time": 2})]),
    ('<think>look closer</think><tool_call>\n{"name": "crop_video", "arguments": {"start_time": 1.5, '
     '"end_time": 20}}\n</tool_call>', [("crop_video", {"start_time": 1.5, "end_time": 20})]),
    ('<tool_call> {"name":"crop_video","arguments":{"video_path":"ab12.mp4","start_time":118.0,'
     '"end_time":145.0}} </tool_call>',
     [("crop_video", {"video_path": "ab12.mp4", "start_time": 118.0, "end_time": 145.0})]),
    ('a<tool_call>{"name":"crop_video","arguments":"{\\"start_time\\": 3, \\"end_time\\": 4}"}</tool_call>b',
     [("crop_video", {"start_time": 3, "end_time": 4})]),
    ('<tool_call>{"name":"zoom","arguments":{}}</tool_call><tool_call>{"name":"crop_video",'
     '"arguments":{"start_time":0,"end_time":9}}</tool_call>',
     [("zoom", {}), ("crop_video", {"start_time": 0, "end_time": 9})]),
    ('<tool_call>{"name": "crop_video", "arguments": {"start_time": "12", "end_time": "13é"}}</tool_call>',
     [("crop_video", {"start_time": "12", "end_time": "13é"})]),
]


@pytest.mark.parametrize("text,expect", WELL_FORMED)
def test_parse_well_formed(text, expect):
    calls = tools.parse_tool_calls(text)
    assert [(c.name, c.arguments) for c in calls] == expect
    assert all(c.error is None for c in calls)


MALFORMED = [  # (text, number of calls, which of them parse fine)
    ("", 0, []), ("no tools here", 0, []), ("</tool_call>", 0, []),
    ("<tool_call></tool_call>", 1, []),
    ('<tool_call>{"name":"crop_video","arguments":{"start_time":1', 1, []),
    ('<tool_call>{"name":"crop_video","arguments":{"start_time":1}}', 1, []),
    ("<tool_call>[1, 2]</tool_call>", 1, []),
    ('<tool_call>{"name":"crop_video","arguments":[1,2]}</tool_call>', 1, []),
    ('<tool_call>{"arguments":{}}</tool_call>', 1, []),
    ('<tool_call>{"name": 7, "arguments":{}}</tool_call>', 1, []),
    ('<tool_call>{"name":"crop_video","arguments":"{oops"}</tool_call>', 1, []),
    ('<tool_call><tool_call>{"name":"crop_video","arguments":{}}</tool_call>', 2, [1]),
    ('<tool_call>{"name":"crop_video","arguments":{}}</tool_call></tool_call><tool_call>', 2, [0]),
    ("<tool_call>" + "[" * 100_000 + "</tool_call>", 1, []),
    ("<tool_call>" + "9" * 5000 + "</tool_call>", 1, []),
]


@pytest.mark.parametrize("text,count,ok", MALFORMED)
def test_parse_malformed(text, count, ok):
    calls = tools.parse_tool_calls(text)
    assert len(calls) == count
    assert [i for i, c in enumerate(calls) if c.error is None] == ok
    for c in calls:
        if c.error is not None:
            assert isinstance(c.error, str) and 0 < len(c.error) < 200


def test_parse_fuzz_never_raises():
    """Hundreds of random strings glued from nasty pieces; invariants hold for each."""
    rnd = random.Random(1234)
    pieces = ["<tool_call>", "</tool_call>", "<tool_call", "{", "}", "[", "]", '"', ":", ",", "\n", " ",
              '"name"', '"crop_video"', '"arguments"', '"start_time"', '"end_time"', "1e400", "-1e400",
              "NaN", "Infinity", "-0", "12.5", "null", "true", "😀", "é", "\x00", "\\", "\\u12",
              '"video_path"', '"file:///a/b.mp4"', "<think>", "</think>", "<answer>"]
    texts = ["".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 40))) for _ in range(300)]
    for _ in range(100):  # well-formed calls with random spacing and values, then mangled
        args = {"start_time": rnd.choice([0, 1.5, -3, 1e300, 10**30]), "end_time": rnd.uniform(-5, 5000)}
        body = _call(args, indent=rnd.choice([None, 0, 2]))
        text = f"pre{rnd.choice(['', ' ', chr(10)])}<tool_call>{rnd.choice(['', chr(10)])}{body}"
        text += f"{rnd.choice(['', chr(10), '  '])}</tool_call>post"
        calls = tools.parse_tool_calls(text)
        assert [(c.name, c.arguments, c.error) for c in calls] == [("crop_video", args, None)]
        texts.append(text[: rnd.randrange(len(text) + 1)])
    for text in texts:
        calls = tools.parse_tool_calls(text)
        assert len(calls) == text.count("<tool_call>")
        for c in calls:
            assert isinstance(c, ToolCall) and isinstance(c.raw, str)
            if c.error is None:
                assert isinstance(c.name, str) and isinstance(c.arguments, dict)
            else:
                assert isinstance(c.error, str) and c.error


VIDEO = "/data/v/ab12.mp4"


ARG_CASES = [  # (arguments, name, expected window or None for ToolError)
    ({"start_time": 10, "end_time": 20}, "crop_video", (10.0, 20.0)),
    ({"start_time": 10.5, "end_time": 20.25}, "crop_video", (10.5, 20.25)),
    ({"start_time": "10", "end_time": " 20.5 "}, "crop_video", (10.0, 20.5)),
    ({"start_time": -5, "end_time": 10}, "crop_video", (0.0, 10.0)),
    ({"start_time": 90, "end_time": 150}, "crop_video", (90.0, 100.0)),
    ({"start_time": -5, "end_time": 150}, "crop_video", (0.0, 100.0)),
    ({"start_time": 0, "end_time": 100}, "crop_video", (0.0, 100.0)),
    ({"video_path": "file:///data/v/ab12.mp4", "start_time": 1, "end_time": 2}, "crop_video", (1.0, 2.0)),
    ({"video_path": "ab12.mp4", "start_time": 1, "end_time": 2}, "crop_video", (1.0, 2.0)),
    ({"video_path": "/elsewhere/ab12.mp4", "start_time": 1, "end_time": 2}, "crop_video", (1.0, 2.0)),
    ({"video_path": "", "start_time": 1, "end_time": 2}, "crop_video", (1.0, 2.0)),
    ({"video_path": "other.mp4", "start_time": 1, "end_time": 2}, "crop_video", None),
    ({"video_path": 12, "start_time": 1, "end_time": 2}, "crop_video", None),
    ({"start_time": 20, "end_time": 20}, "crop_video", None),
    ({"start_time": 30, "end_time": 20}, "crop_video", None),
    ({"start_time": float("nan"), "end_time": 20}, "crop_video", None),
    ({"start_time": 1, "end_time": float("inf")}, "crop_video", None),
    ({"start_time": 1, "end_time": "1e400"}, "crop_video", None),
    ({"start_time": 1, "end_time": 10**400}, "crop_video", None),
    ({"end_time": 20}, "crop_video", None),
    ({"start_time": 1}, "crop_video", None),
    ({"start_time": "abc", "end_time": 20}, "crop_video", None),
    ({"start_time": True, "end_time": 20}, "crop_video", None),
    ({"start_time": [1], "end_time": 20}, "crop_video", None),
    ({"start_time": None, "end_time": 20}, "crop_video", None),
    ({"start_time": 100, "end_time": 110}, "crop_video", None),
    ({"start_time": -10, "end_time": 0}, "crop_video", None),
    ({"start_time": 1, "end_time": 2}, "zoom_video", None),
]


@pytest.mark.parametrize("args,name,expect", ARG_CASES)
def test_validate_crop_args(args, name, expect):
    call = ToolCall(raw="", name=name, arguments=args, error=None)
    if expect is None:
        with pytest.raises(ToolError) as info:
            tools.validate_crop_args(call, VIDEO, 100.0)
        assert str(info.value)
    else:
        assert tools.validate_crop_args(call, VIDEO, 100.0) == pytest.approx(expect)


def test_validate_passes_parse_errors_and_parsed_text():
    bad = tools.parse_tool_calls("<tool_call>{nope}</tool_call>")[0]
    with pytest.raises(ToolError, match="JSON"):
        tools.validate_crop_args(bad, VIDEO, 100.0)
    huge = tools.parse_tool_calls('<tool_call>{"name":"crop_video","arguments":{"start_time":1,'
                                  '"end_time":1e400}}</tool_call>')[0]
    assert huge.error is None
    with pytest.raises(ToolError, match="finite"):
        tools.validate_crop_args(huge, VIDEO, 100.0)


def test_schema_shape():
    fn = tools.CROP_VIDEO_SCHEMA["function"]
    assert tools.CROP_VIDEO_SCHEMA["type"] == "function" and fn["name"] == "crop_video"
    assert fn["parameters"]["required"] == ["start_time", "end_time"]
    assert {k: v["type"] for k, v in fn["parameters"]["properties"].items()} == {
        "start_time": "number", "end_time": "number", "video_path": "string"}
    json.dumps(tools.CROP_VIDEO_SCHEMA)  # must be serialisable into the system prompt


def test_observe_success_and_errors(tool_videos, tmp_path):
    path, fps, _, _ = _video(tool_videos, "h264-10")
    duration = video.video_info(path)["duration"]
    turn = '<think>zoom</think><tool_call>\n' + _call({"start_time": 4, "end_time": 12}) + '\n</tool_call>'
    o = tools.observe(turn, path, duration, fps=1.0, max_frames=6, max_pixels=SIZE * SIZE)
    assert o["error"] is None and list(o["window"]) == [4.0, 12.0] and o["raw"].strip().startswith("{")
    assert o["frames"].shape == (6, SIZE, SIZE, 3) and len(o["timestamps"]) == 6
    assert "4s" in o["text"] and "12s" in o["text"]
    _check_frames(o["frames"], o["timestamps"], fps)
    o = tools.observe(turn, path, duration, protocol="longvt")
    assert o["error"] == "video_path parameter is required"  # LongVT's tool wants the path
    # LongVT's call names the video by its path: accepted when it is this video.
    named = "<tool_call>" + _call({"video_path": "file:///x/h264-10.mp4", "start_time": 1, "end_time": 3}) + "</tool_call>"
    assert tools.observe(named, path, duration)["error"] is None
    failing = ["no call at all", "<tool_call>{bad json</tool_call>", "<tool_call>" + _call({"start_time": 1}),
               "<tool_call>" + _call({"start_time": 900, "end_time": 950}) + "</tool_call>",
               "<tool_call>" + _call({"start_time": 1, "end_time": 2}, name="zoom") + "</tool_call>",
               "<tool_call>" + _call({"video_path": "b.mp4", "start_time": 1, "end_time": 2}) + "</tool_call>"]
    for text in failing:
        o = tools.observe(text, path, duration)
        assert o["error"] and o["window"] is None and o["frames"] is None and o["timestamps"] == []
        assert o["text"].startswith("Tool execution failed: ")
    o = tools.observe(turn, tmp_path / "gone.mp4", 100.0)
    assert "gone.mp4" in o["error"]


def test_longvt_protocol_runs_longvts_tool_checks_with_its_messages(tool_videos):
    """protocol=longvt: LongVT's checks in its order and words; a window past the end is an error, not a clamp;
    a good call gets its success text and the raw window; a path to another video is refused (we read only the
    question's video)."""
    path, _, _, _ = _video(tool_videos, "h264-10")
    duration = video.video_info(path)["duration"]
    vp = "/any/where/h264-10.mp4"

    def run(args):
        return tools.observe("<tool_call>" + _call(args) + "</tool_call>", path, duration, max_frames=4,
                             protocol="longvt")
    cases = [({"start_time": 1, "end_time": 2}, "video_path parameter is required"),
             ({"video_path": vp, "end_time": 2}, "start_time parameter is required"),
             ({"video_path": vp, "start_time": 1}, "end_time parameter is required"),
             ({"video_path": " ", "start_time": 1, "end_time": 2}, "video_path parameter is required"),
             ({"video_path": vp, "start_time": -1, "end_time": 2}, "start_time must be non-negative, got -1"),
             ({"video_path": vp, "start_time": 5, "end_time": 5.0}, "end_time (5.0) must be greater than start_time (5)"),
             ({"video_path": "/v/other.mp4", "start_time": 1, "end_time": 2}, "Video file not found: /v/other.mp4"),
             ({"video_path": vp, "start_time": 99, "end_time": 120},
              f"start_time (99s) exceeds video duration ({duration:.2f}s)"),
             ({"video_path": vp, "start_time": 2, "end_time": 99},
              f"end_time (99s) exceeds video duration ({duration:.2f}s)")]
    for args, message in cases:
        o = run(args)
        assert o["error"] == message and o["text"] == "Tool execution failed: " + message and o["frames"] is None
    ours = tools.observe("<tool_call>" + _call({"start_time": 2, "end_time": 99}) + "</tool_call>", path, duration)
    assert ours["error"] is None and ours["window"][1] == pytest.approx(duration)  # ours clamps
    o = run({"video_path": vp, "start_time": 2, "end_time": 6})
    assert o["error"] is None and o["window"] == [2.0, 6.0] and o["text"] == tools.LONGVT_OK and len(o["frames"]) == 4
