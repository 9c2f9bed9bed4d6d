"""Bring your own videos: a folder of long videos -> SFT, RL and eval rows, through any OpenAI-compatible VLM
(LongVT's data pipeline, minimal). The server is judge.Client's: OPENAI_BASE_URL, OPENAI_API_KEY, OPENAI_MODEL_NAME.

    OPENAI_BASE_URL=http://localhost:8000 python make_data.py --videos=my_videos --out=data/mine --workers=16
    python train_sft.py --data=data/mine/sft.jsonl        # then GRPO on data/mine/rl.jsonl, eval on eval.jsonl

Stages, each a JSONL in --out written line by line as items finish (a rerun skips what is done: no request is sent
twice for a done item; an item that failed is retried on the next run):
1. segments.jsonl: per video, scene cuts from frame differences on a sparse decode (--scan_fps), merged or split to
   --min_seconds..--max_seconds (--segments=fixed: windows of --max_seconds).
2. captions.jsonl: per segment, its frames (--caption_fps, at most --caption_frames) to the VLM -> a caption.
3. questions.jsonl: per video, the time-stamped caption timeline to the model -> questions, each with its answer and
   the evidence window: answerable from that window, not from a sparse view of the whole video.
4. checks.jsonl: per question, a text check (specific, the answer not in the question, not general knowledge) and a
   visual check (the VLM, shown the window's frames, agrees with the answer); rejected.jsonl keeps each reason.
5. trajectories.jsonl (iMCoTT): the teacher sees the sparse global view and plans where to look (thought 1), the crop
   call goes to the evidence window, and shown that window it writes the thought reading the evidence (thought 2).
Then sft.jsonl (rows with `turns`: train_sft re-runs their calls), rl.jsonl (question, answer, window) and eval.jsonl
(the videos of --eval_fraction, held out whole), and summary.json (requests, tokens, failures per stage).
"""
import hashlib
import json
import os
import re
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
from tqdm import tqdm

from checkpoint import complete_lines, write_jsonl, write_text
from data import ViewConfig, global_times
from judge import Client
from model import parse_config
from report import jpeg_uri
from video import VideoError, decode_frames, fmt_time, video_info

VIDEO_EXT = (".mp4", ".mkv", ".webm", ".mov", ".avi")


@dataclass
class Config:
    videos: str = "videos"          # folder of videos (searched recursively)
    out: str = "data/mine"          # output folder: the stages' JSONL, sft/rl/eval.jsonl, summary.json
    segments: str = "scenes"        # "scenes" (cuts from frame differences) | "fixed" (windows of max_seconds)
    scan_fps: float = 1.0           # frames per second decoded to find scene cuts
    cut_threshold: float = 30.0     # mean absolute difference (0-255) of two scanned frames that makes a cut
    min_seconds: float = 8.0        # segments shorter than this merge into their neighbour
    max_seconds: float = 60.0       # segments longer than this are split evenly
    caption_fps: float = 1.0        # frames per second of a segment shown to the VLM for its caption
    caption_frames: int = 16        # ... at most this many
    frame_pixels: int = 224 * 224   # pixel budget of every frame sent (JPEG data URIs)
    questions: int = 4              # questions asked per video
    skim_frames: int = 16           # frames of the sparse global view the teacher plans from
    window_frames: int = 16         # frames of the evidence window (visual check, thought 2)
    eval_fraction: float = 0.2      # share of the videos held out for eval.jsonl (by video)
    seed: int = 0                   # the eval split's draw
    workers: int = 8                # requests in flight
    timeout: float = 120.0          # seconds per request
    retries: int = 3                # extra attempts after a failed one (then the item is skipped with its reason)
    max_tokens: int = 1024          # tokens per reply


# --------------------------------------------------------------------------- local work: frames and segments
def frame_parts(frames, stamps):
    """Chat content parts of decoded frames: a time label, then the frame as a JPEG data URI (report.jpeg_uri at the
    frame's own size)."""
    return [p for f, t in zip(frames, stamps)
            for p in ({"type": "text", "text": f"{fmt_time(t)}s:"},
                      {"type": "image_url", "image_url": {"url": jpeg_uri(f, max_side=max(f.shape[:2]), quality=90)}})]


def frames_content(path, start, end, fps, max_frames, pixels):
    """Chat content of [start, end): a time label and an image per frame, at about fps (at most max_frames)."""
    n = int(max(1, min(max_frames, round((end - start) * fps))))
    times = [start + (i + 0.5) * (end - start) / n for i in range(n)]
    return frame_parts(*decode_frames(path, times, pixels))


def scene_segments(path, cfg: Config):
    """[(start, end)] of the video: cuts where two consecutive scanned frames differ by more than cut_threshold,
    then segments under min_seconds merged into the previous one (the first into the next), and segments over
    max_seconds split evenly. With segments="fixed": windows of max_seconds."""
    duration = video_info(path)["duration"]
    cuts = []
    if cfg.segments == "scenes":
        times = list(np.arange(0.5 / cfg.scan_fps, duration, 1 / cfg.scan_fps))
        frames, stamps = decode_frames(path, times, 32 * 32)
        diff = np.abs(np.diff(frames.astype(np.float32), axis=0)).mean(axis=(1, 2, 3))
        cuts = [round((stamps[i] + stamps[i + 1]) / 2, 2) for i in np.flatnonzero(diff > cfg.cut_threshold)]
    bounds = [0.0] + cuts + [duration]
    segs = [[a, b] for a, b in zip(bounds, bounds[1:]) if b > a]
    merged = []
    for s in segs:
        if merged and (s[1] - s[0] < cfg.min_seconds or merged[-1][1] - merged[-1][0] < cfg.min_seconds):
            merged[-1][1] = s[1]
        else:
            merged.append(s)
    out = []
    for a, b in merged:
        k = int(np.ceil((b - a) / cfg.max_seconds - 1e-9))
        out += [(round(a + i * (b - a) / k, 2), round(a + (i + 1) * (b - a) / k, 2)) for i in range(k)]
    return duration, out


# --------------------------------------------------------------------------- prompts and reply parsers
def thought(text):
    """A teacher's thought as a <think> body: tags it wrote removed, whitespace collapsed; None when empty."""
    text = " ".join(re.sub(r"</?(?:think|answer|tool_call|tool_response)>", " ", text or "").split())
    return text or None


def parse_questions(text):
    """The JSON list of {question, answer, start, end} in a reply (the first [...] block), or None."""
    m = re.search(r"\[.*\]", text or "", re.S)
    try:
        items = json.loads(m.group(0)) if m else None
        return [dict(question=str(q["question"]).strip(), answer=str(q["answer"]).strip(), start=float(q["start"]),
                     end=float(q["end"])) for q in items]
    except (ValueError, TypeError, KeyError):
        return None


def parse_check(text):
    """(ok, reason) of a "yes" / "no: <reason>" reply, or None when it is neither."""
    t = (text or "").strip().lower()
    if t.startswith("yes"):
        return True, ""
    return (False, (text or "").strip()[3:].strip(" :.-") or "no reason given") if t.startswith("no") else None


CAPTION = ("Describe what is visible in these frames of {name}, from {a}s to {b}s, and what changes, with the time in "
           "seconds of each change. Be specific: colours, objects, people, actions, on-screen text.")
QUESTIONS = ("The timeline of the video {name} ({d}s long), one caption per segment:\n{timeline}\n\nWrite up to {n} "
             "questions about fine details of this video. Each must be answerable from one short window of it, "
             "and not from a few frames spread over the whole video. Reply with a JSON list only: "
             '[{{"question": "...", "answer": "a short answer", "start": seconds, "end": seconds}}] where start '
             "and end bound the window that holds the evidence.")
TEXT_CHECK = ("A question about a video, with its answer.\nQuestion: {q}\nAnswer: {a}\nReply \"yes\" if the question "
              "is specific, does not give its answer away, and cannot be answered from general knowledge without "
              "watching the video; otherwise reply \"no: <the reason>\".")
VISUAL_CHECK = ("Question: {q}\nProposed answer: {a}\nLooking only at these frames ({s}s to {e}s), is the proposed "
                "answer correct? Reply \"yes\" or \"no: <the reason>\".")
PLAN = ("These frames are a sparse skim of a {d}s video. Question: {q}\nThe evidence is between {s}s and {e}s. Write "
        "the thought of someone who, from this skim and the question, decides to look closely at that window (do "
        "not say you were told, do not answer yet). The thought only.")
READ = ("These are the frames of the video between {s}s and {e}s. Question: {q}\nThe answer is: {a}. Write the "
        "thought that reads the evidence for this answer from these frames. The thought only.")


def call_text(s, e):
    return f'<tool_call>{json.dumps({"name": "crop_video", "arguments": {"start_time": s, "end_time": e}})}</tool_call>'


def user(*parts):
    content = [p if isinstance(p, dict) else {"type": "text", "text": p} for part in parts
               for p in (part if isinstance(part, list) else [part])]
    return [{"role": "user", "content": content}]


# --------------------------------------------------------------------------- the job
class Stage:
    """One stage's JSONL: done keys read back (a line cut by a kill is dropped and its item redone), new lines
    appended and flushed as items finish, failures counted and named."""

    def __init__(self, out, name):
        self.path, self.name, self.lock = os.path.join(out, name + ".jsonl"), name, threading.Lock()
        self.rows, good = {}, complete_lines(self.path)  # a line cut by a kill is left out
        for line in good:
            row = json.loads(line)
            self.rows[row["key"]] = row
        with open(self.path, "w") as f:
            f.write("".join(line + "\n" for line in good))
        self.failures = {}

    def run(self, items, work, workers):
        """work(item) -> row (a dict) for each (key, item) not done yet, in a thread pool; a RuntimeError or a
        VideoError skips the item with its reason."""
        todo = [(k, it) for k, it in items if k not in self.rows]

        def one(pair):
            k, it = pair
            try:
                row = dict(work(it), key=k)
            except (RuntimeError, VideoError) as e:
                with self.lock:
                    self.failures[k] = str(e)
                return
            with self.lock, open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
                self.rows[k] = row
        with ThreadPoolExecutor(workers) as pool:
            list(tqdm(pool.map(one, todo), total=len(todo), desc=self.name, unit="item", file=sys.stdout))
        for k, why in list(self.failures.items())[:5]:
            print(f"warning: {self.name}: {k} skipped: {why}")
        return [self.rows[k] for k, _ in items if k in self.rows]


def make(cfg: Config, client: Client):
    os.makedirs(cfg.out, exist_ok=True)
    videos = sorted(os.path.join(r, f) for r, _, fs in os.walk(cfg.videos) for f in fs if f.lower().endswith(VIDEO_EXT))
    if not videos:
        raise SystemExit(f"--videos={cfg.videos}: no video files ({', '.join(VIDEO_EXT)})")
    name = {v: os.path.relpath(v, cfg.videos) for v in videos}
    stages, px, w = {}, cfg.frame_pixels, cfg.workers

    def stage(n):
        stages[n] = Stage(cfg.out, n)
        return stages[n]
    segs = stage("segments").run([(name[v], v) for v in videos], lambda v: dict(
        zip(("duration", "segments"), scene_segments(v, cfg)), video=v), 1)
    caps = stage("captions").run(
        [(f"{name[s['video']]}@{a}-{b}", (s["video"], a, b)) for s in segs for a, b in s["segments"]],
        lambda x: dict(video=x[0], start=x[1], end=x[2], caption=client.chat(user(
            frames_content(*x, cfg.caption_fps, cfg.caption_frames, px),
            CAPTION.format(name=name[x[0]], a=fmt_time(x[1]), b=fmt_time(x[2]))), thought)), w)
    timeline, n_segs = {}, {s["video"]: len(s["segments"]) for s in segs}
    for c in caps:
        timeline.setdefault(c["video"], []).append(f"[{fmt_time(c['start'])}s-{fmt_time(c['end'])}s] {c['caption']}")
    timeline = {v: t for v, t in timeline.items() if len(t) == n_segs[v]}  # a video with a caption missing waits
    dur = {s["video"]: s["duration"] for s in segs}
    qs = stage("questions").run(
        [(name[v], v) for v in videos if v in timeline],
        lambda v: dict(video=v, items=client.chat(user(QUESTIONS.format(
            name=name[v], d=fmt_time(dur[v]), timeline="\n".join(timeline[v]), n=cfg.questions)), parse_questions)), w)
    items = [dict(q, video=x["video"], id=f"{name[x['video']]}#{i}") for x in qs for i, q in enumerate(x["items"])]

    def check(q):
        if not q["question"] or not q["answer"]:
            return dict(ok=False, reason="text: an empty question or answer")
        if not 0 <= q["start"] < q["end"] <= dur[q["video"]] + 1e-6:
            return dict(ok=False, reason=f"window [{q['start']}, {q['end']}] outside the video")
        if re.search(rf"\b{re.escape(q['answer'])}\b", q["question"], re.I):  # the cheapest check, no request
            return dict(ok=False, reason="text: the answer is in the question")
        ok, why = client.chat(user(TEXT_CHECK.format(q=q["question"], a=q["answer"])), parse_check)
        if not ok:
            return dict(ok=False, reason=f"text: {why}")
        ok, why = client.chat(user(frames_content(q["video"], q["start"], q["end"], 1e9, cfg.window_frames, px),
                                   VISUAL_CHECK.format(q=q["question"], a=q["answer"], s=fmt_time(q["start"]),
                                                       e=fmt_time(q["end"]))), parse_check)
        return dict(ok=ok, reason="" if ok else f"visual: {why}")
    checks = {c["key"]: c for c in stage("checks").run([(q["id"], q) for q in items], check, w)}
    kept = [q for q in items if checks.get(q["id"], {}).get("ok")]
    write_jsonl(os.path.join(cfg.out, "rejected.jsonl"),
                [dict(q, reason=checks[q["id"]]["reason"]) for q in items if q["id"] in checks and q not in kept])

    def trajectory(q):
        d, s, e = dur[q["video"]], fmt_time(q["start"]), fmt_time(q["end"])
        skim = global_times(d, ViewConfig(global_frames=cfg.skim_frames, global_fps=1.0, time_grid=0))
        plan = client.chat(user(frame_parts(*decode_frames(q["video"], skim, px)),
                                PLAN.format(d=fmt_time(d), q=q["question"], s=s, e=e)), thought)
        read = client.chat(user(frames_content(q["video"], q["start"], q["end"], 1e9, cfg.window_frames, px),
                                READ.format(s=s, e=e, q=q["question"], a=q["answer"])), thought)
        return dict(turns=[f"<think>{plan}</think>{call_text(float(s), float(e))}",
                           f"<think>{read}</think><answer>{q['answer']}</answer>"])
    trajs = {t["key"]: t for t in stage("trajectories").run([(q["id"], q) for q in kept], trajectory, w)}
    write_rows(cfg, kept, trajs, dur, videos)
    summary = dict(videos=len(videos), segments=sum(len(s["segments"]) for s in segs), questions=len(items),
                   kept=len(kept), trajectories=len(trajs), requests=client.requests, tokens=client.tokens,
                   failures={n: len(st.failures) for n, st in stages.items()},
                   failed={n: st.failures for n, st in stages.items() if st.failures}, config=asdict(cfg))
    write_text(os.path.join(cfg.out, "summary.json"), json.dumps(summary, indent=1))
    return summary


def write_rows(cfg, kept, trajs, dur, videos):
    """sft.jsonl and rl.jsonl from the training videos, eval.jsonl from round(eval_fraction x videos) held-out ones
    (at least one of two or more; the videos ordered by a seeded hash of their names)."""
    order = sorted(videos, key=lambda v: hashlib.sha256(f"{cfg.seed}:{os.path.relpath(v, cfg.videos)}".encode()).digest())
    k = max(1, round(cfg.eval_fraction * len(videos))) if cfg.eval_fraction > 0 and len(videos) > 1 else 0
    held_out = set(order[:k])
    rows = {"sft": [], "rl": [], "eval": []}
    for q in kept:
        row = dict(id=q["id"], video=os.path.relpath(q["video"], cfg.out), question=q["question"],
                   answer=q["answer"], answer_type="text", window=[q["start"], q["end"]], duration=dur[q["video"]])
        if q["video"] in held_out:
            rows["eval"].append(row)
            continue
        rows["rl"].append(row)
        if q["id"] in trajs:
            rows["sft"].append(dict(row, turns=trajs[q["id"]]["turns"]))
    for split, r in rows.items():
        write_jsonl(os.path.join(cfg.out, f"{split}.jsonl"), r)


def connect(cfg: Config, base_url=None):
    """The VLM client with cfg's settings: at base_url, else from the environment (None when it names none)."""
    kw = dict(timeout=cfg.timeout, retries=cfg.retries, workers=cfg.workers, max_tokens=cfg.max_tokens)
    return Client(base_url, **kw) if base_url else Client.from_env(**kw)


def main(argv=None):
    cfg = parse_config(Config, sys.argv[1:] if argv is None else argv)
    client = connect(cfg)
    if client is None:
        raise SystemExit("set OPENAI_BASE_URL (and OPENAI_API_KEY, OPENAI_MODEL_NAME) to an OpenAI-compatible VLM server")
    client.health_check()
    s = make(cfg, client)
    print(f"{s['videos']} videos, {s['segments']} segments, {s['questions']} questions, {s['kept']} kept, "
          f"{s['trajectories']} trajectories; {s['requests']} requests, {s['tokens']} tokens, failures {s['failures']}"
          f" -> {cfg.out}/sft.jsonl, rl.jsonl, eval.jsonl, summary.json")


if __name__ == "__main__":
    main()
