"""make_data.py end to end on needle videos, against a local OpenAI-compatible VLM that really looks at the frames it
is sent (the mean colour of each image, named) and answers every prompt from what it was shown; a run killed
mid-stage and rerun; a server that answers 500, garbage or nothing."""
import base64
import http.server
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import make_data as M
from needle import COLOURS, NEEDLE_COLOURS, NeedleConfig, generate
from test_judge import JSONHandler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def colour_name(data_uri):
    from PIL import Image
    img = np.asarray(Image.open(io.BytesIO(base64.b64decode(data_uri.split(",", 1)[1]))).convert("RGB"), np.float32)
    mean = img.reshape(-1, 3).mean(0)
    return min(COLOURS, key=lambda c: float(((np.array(COLOURS[c]) - mean) ** 2).sum()))


class FakeVLM:
    """/v1/models and /v1/chat/completions on 127.0.0.1. Captions name each frame's colour (a needle colour is a
    flash); questions come from the captions' flashes (one good, one giving its answer away, one of general
    knowledge, one with a wrong answer); checks and thoughts read the frames. faults: {(kind, text in the prompt):
    "500" | "garbage" | "silent"}."""

    def __init__(self, delay=0.0, faults=None):
        self.delay, self.faults, self.lock, self.log = delay, faults or {}, threading.Lock(), []
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads, self.server.block_on_close = True, False
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def answer(self, text, frames):
        flashes = [(t, c) for t, c in frames if c in NEEDLE_COLOURS]
        if text.startswith("Describe what is visible"):
            scenes = list(dict.fromkeys(c for _, c in frames if c not in NEEDLE_COLOURS))
            out = f"Scenes: {', '.join(scenes)}."
            return out + (f" At {flashes[0][0]}s the whole frame flashes {flashes[0][1]}." if flashes else "")
        if text.startswith("The timeline of the video"):
            items, d = [], int(float(re.search(r"\(([\d.]+)s long\)", text).group(1)))
            for t, c in re.findall(r"At ([\d.]+)s the whole frame flashes (\w+)", text):
                a = max(0, min(math.floor(float(t)) - 6, d - 14))
                wrong = next(x for x in NEEDLE_COLOURS if x != c)
                items += [dict(question=f"What colour flashes between {a}s and {a + 14}s?", answer=c, start=a,
                               end=a + 14),
                          dict(question=f"Which colour, {c} or another, flashes at {t}s?", answer=c, start=a, end=a + 14),
                          dict(question="What colour is the sky on a clear day?", answer="blue", start=a, end=a + 14),
                          dict(question=f"What colour flashes briefly near {a + 6}s?", answer=wrong, start=a,
                               end=a + 14)]
            return "Here they are:\n" + json.dumps(items)
        if text.startswith("A question about a video"):
            return "no: general knowledge" if "sky" in text else "yes"
        if text.startswith("Question:"):  # the visual check
            said = re.search(r"Proposed answer: (\w+)", text).group(1)
            return "yes" if said in {c for _, c in flashes} else f"no: the frames show {[c for _, c in flashes]}"
        if "sparse skim" in text:
            s, e = re.search(r"between ([\d.]+)s and ([\d.]+)s", text).groups()
            return f"<think>The question points at {s}s to {e}s; the skim shows no flash there, so I look closer."
        if text.startswith("These are the frames"):
            return f"The frames show a {flashes[0][1]} flash at {flashes[0][0]}s." if flashes else "No flash."
        return "?"

    def _handler(self):
        fake = self

        class Handler(JSONHandler):
            def do_GET(self):
                self.send(200, {"data": [{"id": "vlm-1"}]})

            def do_POST(self):
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                parts = json.loads(raw)["messages"][-1]["content"]
                text = " ".join(p["text"] for p in parts if p["type"] == "text" and not p["text"].endswith("s:"))
                frames, stamp = [], None
                for p in parts:
                    if p["type"] == "text" and re.fullmatch(r"[\d.]+s:", p["text"]):
                        stamp = p["text"][:-2]
                    elif p["type"] == "image_url":
                        frames.append((stamp, colour_name(p["image_url"]["url"])))
                with fake.lock:
                    fake.log.append(raw)
                fault = next((f for (kind, key), f in fake.faults.items() if text.startswith(kind) and key in text), "")
                time.sleep(fake.delay + (5 if fault == "silent" else 0))
                if fault == "500":
                    return self.send(500, "oops")
                reply = "no JSON here" if fault == "garbage" else fake.answer(text, frames)
                self.send(200, {"choices": [{"message": {"content": reply}}], "usage": {"total_tokens": 10}})
        return Handler


@pytest.fixture(scope="module")
def needle_videos(tmp_path_factory):
    out = tmp_path_factory.mktemp("byov")
    rows = generate(NeedleConfig(out=str(out), num_train=5, num_rl=0, num_eval=0, num_eval_short=0, min_duration=60,
                                 max_duration=90, seed=4))["train"]
    return out / "videos", {os.path.basename(r["video"]): r["needle"] for r in rows}


def run(videos, out, url, **kw):
    cfg = M.Config(videos=str(videos), out=str(out), workers=2, eval_fraction=0.4, caption_frames=32, **kw)
    client = M.connect(cfg, url)
    client.sleep = lambda seconds: None  # the backoff, not waited for
    return M.make(cfg, client)


def rows(out, split):
    return [json.loads(x) for x in open(os.path.join(out, f"{split}.jsonl"))]


def test_rows_from_needle_videos_agree_with_the_truth_and_train(needle_videos, tmp_path):
    videos, truth = needle_videos
    fake = FakeVLM()
    s = run(videos, tmp_path / "d", fake.url)
    kept = rows(tmp_path / "d", "rl") + rows(tmp_path / "d", "eval")
    assert s["videos"] == 5 and s["kept"] == len(kept) >= 4 and s["failures"] == dict.fromkeys(s["failures"], 0)
    assert s["requests"] == len(fake.log) and s["tokens"] == 10 * len(fake.log)
    right = 0
    for r in kept:
        nd = truth[os.path.basename(r["video"])]
        right += r["answer"] == nd["colour"]
        assert r["window"][0] <= nd["start"] and nd["end"] <= r["window"][1]  # the evidence window holds the needle
    assert right >= 0.9 * len(kept)
    reasons = [r["reason"] for r in rows(tmp_path / "d", "rejected")]
    assert len(reasons) == 3 * len(kept) and {r.split(":")[0] for r in reasons} == {"text", "visual"}
    assert sum("answer is in the question" in r for r in reasons) == len(kept)
    ev = {os.path.basename(r["video"]) for r in rows(tmp_path / "d", "eval")}
    sft = rows(tmp_path / "d", "sft")
    assert len(ev) == 2 and sft and not ev & {os.path.basename(r["video"]) for r in sft}  # held out by video
    for r in sft:
        assert r["turns"][0].startswith("<think>The question points at") and "<think>" not in r["turns"][0][7:]
        assert f'"start_time": {r["window"][0]}' in r["turns"][0] and r["turns"][1].endswith(f"<answer>{r['answer']}</answer>")

    import train_sft  # the SFT rows render (their calls re-run on the videos) and train
    train_sft.main([f"--data={tmp_path}/d/sft.jsonl", "--model=tiny", "--steps=2", "--batch_size=2",
                    "--micro_batch_size=2", f"--out={tmp_path}/sft", "--global_frames=8"])
    m = [json.loads(x) for x in open(tmp_path / "sft" / "metrics.jsonl")]
    assert len(m) == 2 and m[-1]["skipped_samples"] == 0 and math.isfinite(m[-1]["loss"])
    import train_grpo  # the RL rows: one GRPO step, rewarded against their answers and windows
    from test_grpo import tiny_cfg
    train_grpo.train(tiny_cfg(str(tmp_path / "d" / "rl.jsonl"), tmp_path / "grpo", steps=1, prompts_per_step=2,
                              group_size=2))
    assert json.loads(open(tmp_path / "grpo" / "metrics.jsonl").readline())["step"] == 1


def test_a_killed_run_reruns_to_the_same_rows_without_asking_twice(needle_videos, tmp_path):
    videos, _ = needle_videos
    clean = FakeVLM()
    run(videos, tmp_path / "clean", clean.url)
    fake = FakeVLM(delay=0.2)
    env = dict(os.environ, OPENAI_BASE_URL=fake.url, PYTHONPATH=ROOT)
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "make_data.py"), f"--videos={videos}",
                          f"--out={tmp_path}/k", "--workers=2", "--eval_fraction=0.4", "--caption_frames=32"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    caps = tmp_path / "k" / "captions.jsonl"
    t0 = time.time()
    while not (caps.exists() and caps.read_text().count("\n") >= 3) and time.time() - t0 < 120:
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    with open(caps, "a") as f:
        f.write('{"key": "cut by the ki')  # a line the kill cut short: dropped, its item redone
    before = len(fake.log)
    assert 3 <= caps.read_text().count("\n") < len(rows(tmp_path / "clean", "captions"))  # killed mid-stage
    fake.delay = 0.0
    run(videos, tmp_path / "k", fake.url)
    norm = lambda rs: sorted(json.dumps(dict(r, video=os.path.basename(r["video"]))) for r in rs)  # noqa: E731
    for split in ("sft", "rl", "eval", "rejected"):
        assert norm(rows(tmp_path / "k", split)) == norm(rows(tmp_path / "clean", split))
    from collections import Counter
    extra = Counter(fake.log) - Counter(clean.log)  # requests beyond the clean run's, body by body
    assert sum(extra.values()) <= 2 and not Counter(clean.log) - Counter(fake.log)  # the items in flight at the kill
    assert before < len(fake.log)


def test_a_failing_server_is_retried_counted_and_skipped_with_reasons(needle_videos, tmp_path):
    videos, _ = needle_videos
    names = sorted(os.listdir(videos))
    fake = FakeVLM(faults={("Describe what is visible", names[0]): "500",
                           ("The timeline of the video", names[1]): "garbage",
                           ("Describe what is visible", f"{names[2]}, from 0s"): "silent"})
    s = run(videos, tmp_path / "f", fake.url, retries=1, timeout=1.0)
    failed = s["failed"]
    assert all("HTTP 500" in why for k, why in failed["captions"].items() if k.startswith(names[0]))
    assert any("Timeout" in why for k, why in failed["captions"].items() if k.startswith(names[2]))
    assert "unparseable" in failed["questions"][names[1]] and s["failures"]["questions"] == 1
    per = {}
    for raw in fake.log:
        per[raw] = per.get(raw, 0) + 1
    assert max(per.values()) == 2  # a failing item: tried once, retried once (retries=1), then skipped
    assert s["kept"] >= 1  # the healthy videos went through
    fake.faults = {}  # a rerun with the server healthy does the skipped items, and only them
    n = len(fake.log)
    s2 = run(videos, tmp_path / "f", fake.url)
    assert s2["failures"] == dict.fromkeys(s2["failures"], 0) and s2["kept"] > s["kept"]
    assert not set(fake.log[n:]) & {raw for raw, k in per.items() if k == 1}  # nothing done is asked again


def test_reply_parsers_and_segments_on_bad_input(needle_videos):
    """A reply that is not what was asked is None (the request is retried, then the item skipped), never a crash."""
    assert M.parse_questions('ok: [{"question": "q?", "answer": "a", "start": "3", "end": 9}]') == [
        dict(question="q?", answer="a", start=3.0, end=9.0)]
    for bad in (None, "", "no list", "[1, 2]", '[{"question": "q"}]', '[{"question": "q", "answer": "a", '
                '"start": "x", "end": 1}]', "[not json]"):
        assert M.parse_questions(bad) is None
    assert M.parse_check("Yes.") == (True, "") and M.parse_check("No: too vague") == (False, "too vague")
    assert M.parse_check("no") == (False, "no reason given") and M.parse_check("maybe") is None
    assert M.thought("<think> a\n b </think>") == "a b" and M.thought("<answer></answer>") is None
    videos, truth = needle_videos
    v = sorted(videos.iterdir())[0]
    d, fixed = M.scene_segments(str(v), M.Config(segments="fixed", max_seconds=25.0))
    assert fixed[0][0] == 0 and fixed[-1][1] == d and all(0 < b - a <= 25 for a, b in fixed)
    _, scenes = M.scene_segments(str(v), M.Config())
    nd = truth[v.name]
    assert all(b - a >= 8 for a, b in scenes[:-1])  # the 3-s flash (two cuts) merged into a neighbour, not alone
    assert any(min(b, nd["end"]) - max(a, nd["start"]) >= 2 for a, b in scenes)
    with pytest.raises(SystemExit, match="no video files"):
        M.make(M.Config(videos=str(videos / "nothing"), out=str(videos.parent / "o")), None)
