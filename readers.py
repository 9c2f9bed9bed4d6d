"""The data readers: every supported row format -> samples, bad rows stopped (or skipped) with file:line.

A sample is a dict: id, video, question, answer, optional choices, window ([start, end] s of the evidence),
duration, answer_type, and for SFT rows `turns` (the assistant texts; tool observations are re-created by
running the calls they contain, so SFT data and rollouts tokenize identically) or `observations` (stored
tool responses from LongVT's SFT rows). Readers: our JSONL, LongVT RL rows, LongVT SFT rows, VideoSIAH-Eval,
Video-MME and LVBench rows; .parquet through pyarrow. Rendering them is data.py's.
"""
import json
import math
import os


class DataError(ValueError):
    pass


def _resolve(path, base):
    path = str(path)
    if path.startswith("file://"):
        path = path[len("file://"):]
    return path if os.path.isabs(path) else os.path.join(base, path)


def normalize_row(row, base):
    """One row of any supported format -> our sample dict. Raises DataError on a row it cannot use: not an object,
    a field missing, a question or answer that is null or empty, a duration that is not a positive finite number of
    seconds (at most a day), a malformed window or turns."""
    s = _normalize(row, base)
    if not isinstance(s.get("question"), str) or not s["question"].strip():
        raise DataError(f"question must be a non-empty string, got {s.get('question')!r}")
    if s.get("answer") is None or not str(s["answer"]).strip():
        raise DataError(f"answer must not be null or empty, got {s.get('answer')!r}")
    d = s.get("duration")
    if d is not None and (isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d)
                          or not 0 < d <= 86400):
        raise DataError(f"duration must be a positive number of seconds (at most a day), got {d!r}")
    return s


def _text(v):
    """A field of another format as our text, None kept (normalize_row refuses it, instead of the text "None")."""
    return None if v is None else str(v)


def _normalize(row, base):
    if not isinstance(row, dict):
        raise DataError("row is not a JSON object")
    if "prompt" in row and "videos" in row:  # LongVT RL row (verl)
        extra = row.get("extra_info") or {}
        text = next((m["content"] for m in row["prompt"] if m.get("role") == "user"), "")
        question = extra.get("question") or text.replace("<video>", "").split("\n")[0].strip()
        seg = extra.get("video_segment")
        return dict(id=str(extra.get("index", row.get("id", ""))), video=_resolve(row["videos"][0]["video"], base),
                    question=question, answer=_text((row.get("reward_model") or {}).get("ground_truth", extra.get("answer"))),
                    window=list(map(float, seg)) if seg is not None and len(seg) == 2 else None)
    if "messages" in row:  # LongVT SFT/RFT row (lmms-engine): tool responses carry their frames as images
        return _from_messages(row, base)
    if "video_path" in row and "question" in row:  # VideoSIAH-Eval or LVBench
        q = row["question"]
        return dict(id=str(row.get("id", row.get("uid", ""))), video=_resolve(row["video_path"], base), question=q,
                    answer=_text(row["answer"]), answer_type="choice" if "\n(A)" in q else None)
    if "videoID" in row and "options" in row:  # Video-MME
        vid = os.path.join(base, "data", row["videoID"])
        video = next((vid + e for e in (".mp4", ".MP4", ".mkv") if os.path.exists(vid + e)), vid + ".mp4")
        return dict(id=str(row.get("question_id", row["videoID"])), video=video, question=row["question"],
                    choices=list(row["options"]), answer=_text(row["answer"]), answer_type="choice")
    missing = [k for k in ("video", "question", "answer") if k not in row]
    if missing:
        raise DataError(f"missing field(s) {missing}")
    s = dict(row)
    s["video"] = _resolve(row["video"], base)
    s["id"] = str(row.get("id", ""))
    if s.get("window") is not None and (len(s["window"]) != 2 or not all(isinstance(x, (int, float)) for x in s["window"])):
        raise DataError(f"window must be [start, end] seconds, got {s['window']!r}")
    if "turns" in s and not (isinstance(s["turns"], list) and all(isinstance(t, str) for t in s["turns"])):
        raise DataError("turns must be a list of strings")
    return s


def _from_messages(row, base):
    def items(m):
        c = m["content"]
        return [{"type": "text", "text": c}] if isinstance(c, str) else c
    video, question, turns, observations = None, "", [], []
    for m in row["messages"]:
        parts = items(m)
        texts = "".join(p.get("text") or "" for p in parts if p.get("type") == "text")
        if m["role"] == "assistant":
            turns.append(texts)
        elif m["role"] == "user" and video is None:
            vids = [p["video_url"]["url"] for p in parts if p.get("type") == "video_url"]
            video = _resolve(vids[0], base) if vids else None
            question = texts.split("\n The video path is")[0].strip()
        elif m["role"] in ("user", "tool") and turns:  # a tool response
            imgs = [_resolve(p["image_url"]["url"], base) for p in parts if p.get("type") == "image_url"]
            observations.append(dict(images=imgs, text=texts))
    if video is None or not turns:
        raise DataError("messages row without a video or an assistant turn")
    from reward import extract_answer
    return dict(id=str(row.get("id", "")), video=video, question=question,
                answer=extract_answer(turns[-1]) or "", turns=turns, observations=observations)


def read_rows(path, tolerant=False):
    """(line, row) of a .jsonl / .json / .parquet file. A malformed JSONL line is a DataError naming file:line, or
    (tolerant) yielded as that DataError in place of its row, so the lines after it are still read."""
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise SystemExit(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)") from None
        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield i + 1, row
        return
    with open(path, encoding="utf-8-sig") as f:  # a BOM (as Windows tools write it) is read as absent
        if path.endswith(".json"):
            for i, row in enumerate(json.load(f)):
                yield i + 1, row
            return
        for i, line in enumerate(f):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    if not tolerant:
                        raise DataError(f"{path}:{i + 1}: malformed JSON: {e.msg}") from None
                    row = DataError(f"malformed JSON: {e.msg}")
                yield i + 1, row


def load_samples(path, skip_bad=False, check=None, skipped=None):
    """All samples of a file. The one rule of every script for a bad row (malformed JSON, a field normalize_row
    refuses, or one check(sample) raises DataError for): a DataError naming file:line, or with skip_bad (the scripts'
    --skip_bad_rows=true) the row is skipped with a warning naming file:line, appended to `skipped` when given."""
    if not os.path.isfile(path):
        raise SystemExit(f"data file {path} does not exist (the embedded default's files: python needle.py)")
    from model import print0
    base = os.path.dirname(os.path.abspath(path))
    out = []
    for line, row in read_rows(path, tolerant=skip_bad):
        try:
            if isinstance(row, DataError):
                raise row
            s = normalize_row(row, base)
            if check:
                check(s)
        except (DataError, KeyError, TypeError, IndexError) as e:
            if not skip_bad:
                raise DataError(f"{path}:{line}: {e}") from None
            print0(f"warning: skipping {path}:{line}: {e} (--skip_bad_rows=true)")
            if skipped is not None:
                skipped.append(f"{path}:{line}")
            continue
        s["id"] = s["id"] or f"{os.path.basename(path)}:{line}"
        out.append(s)
    return out
