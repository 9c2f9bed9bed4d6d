"""The synthetic long-video "needle" benchmark (the embedded default), run through `python data.py`.

Each video is minutes long, low resolution, and made of solid-colour scenes of `scene_min`..`scene_max`
seconds. One scene, whose colour appears nowhere else in the video, holds the needle: for `needle_seconds`
the frame flashes another colour (or, with `square` < 1, a square of that colour appears). Questions name that
scene by its colour and ask for the needle's colour (or, for `when_fraction` of them, the second it appears).
The global view (one frame per 10 or 15 s, at round times: data.global_times) shows every scene but rarely
catches the needle; a 1-fps crop of the scene always does.

Why these numbers: scenes of >= 20 s are seen by >= 1 global frame even in a 15-minute video (60 frames,
one per 15 s); the SFT crop of a scene (from the frame pair before it to the pair after it) spans <= ~95 s,
sampled at <= 48 frames: one frame per <= 2 s, which catches the 2-s needle (tests measure both).

sft.jsonl holds tool-integrated trajectories written from the ground truth: think, crop the scene (between
the global-view timestamps around it, which the model can read off its prompt), observe, think, answer.
`imperfect_fraction` of them first crop a wrong scene, see no square, and correct themselves.
"""
import json
import os
import random
import sys
from dataclasses import asdict, dataclass, fields

import numpy as np

from data import ViewConfig, global_times
from model import COLOURS, parse_config

SCENE_COLOURS = ["orange", "purple", "cyan", "magenta", "gray", "brown", "teal", "navy", "lime", "maroon"]
NEEDLE_COLOURS = ["red", "green", "blue", "yellow", "white", "black"]


@dataclass
class NeedleConfig:
    out: str = "data/needle"       # output folder (videos/, train.jsonl, eval.jsonl, sft.jsonl)
    num_train: int = 192           # training samples (one video each); sft.jsonl covers the same videos
    num_eval: int = 128            # held-out samples (eval.jsonl: the longer eval videos; 128 so that one episode
                                   # is 0.008 of a score: with 32, the README's tables moved by noise)
    num_eval_short: int = 128      # held-out samples with the training videos' lengths (eval_short.jsonl): tells
                                   # what a stage learned apart from how it carries over to longer videos
    seed: int = 0                  # everything is deterministic for a seed
    min_duration: float = 180.0    # training video length range, seconds
    max_duration: float = 300.0
    eval_min_duration: float = 600.0  # eval videos are longer than training ones (generalisation to length)
    eval_max_duration: float = 900.0
    fps: int = 2                   # video frame rate
    size: int = 112                # width = height, pixels
    scene_min: float = 20.0        # scene length range, seconds
    scene_max: float = 40.0
    needle_seconds: float = 2.0    # how long the needle is visible
    square: float = 1.0            # side of the square as a fraction of the frame's: 1 = the whole frame flashes
                                   # the needle colour (the default); 0.25 = a small square (bench/reading.py: the
                                   # tiny vision tower needs tens of thousands of examples to see it)
    when_fraction: float = 0.2     # fraction of "when does it appear" questions (answered in seconds)
    imperfect_fraction: float = 0.3  # fraction of SFT trajectories that first crop a wrong scene


def make_layout(rng, duration, cfg: NeedleConfig):
    """Scenes [(start, end, colour)], the needle scene index, needle (start, end, colour, x, y)."""
    cuts = [0.0]
    while duration - cuts[-1] > cfg.scene_max:
        cuts.append(cuts[-1] + rng.uniform(cfg.scene_min, cfg.scene_max))
    if duration - cuts[-1] < cfg.scene_min and len(cuts) > 1:
        cuts.pop()  # merge a too-short tail into the previous scene
    cuts.append(duration)
    k = rng.randrange(len(cuts) - 1)
    target = rng.choice(SCENE_COLOURS)
    others = [c for c in SCENE_COLOURS if c != target]
    scenes, prev = [], None
    for i in range(len(cuts) - 1):
        colour = target if i == k else rng.choice([c for c in others if c != prev])
        scenes.append((round(cuts[i], 2), round(cuts[i + 1], 2), colour))
        prev = colour
    s, e, _ = scenes[k]
    margin = 1.0
    start = round(rng.uniform(s + margin, e - margin - cfg.needle_seconds), 2)
    side = max(1, int(round(cfg.size * cfg.square)))
    x, y = rng.randrange(0, cfg.size - side + 1), rng.randrange(0, cfg.size - side + 1)
    return scenes, k, dict(start=start, end=round(start + cfg.needle_seconds, 2), colour=rng.choice(NEEDLE_COLOURS),
                           x=x, y=y, side=side)


def frame_at(t, scenes, needle, size):
    colour = next(c for s, e, c in scenes if s <= t < e) if t < scenes[-1][1] else scenes[-1][2]
    img = np.empty((size, size, 3), np.uint8)
    img[:] = COLOURS[colour]
    if needle["start"] <= t < needle["end"]:
        x, y, d = needle["x"], needle["y"], needle["side"]
        img[y:y + d, x:x + d] = COLOURS[needle["colour"]]
    return img


def write_video(path, duration, scenes, needle, cfg: NeedleConfig):
    """h264 (ultrafast) with a 2-s GOP, so crops seek cheaply; solid-colour frames compress to almost nothing,
    so minutes of video take about a second to write."""
    import av
    tmp = path + ".tmp.mp4"
    with av.open(tmp, "w") as out:
        st = out.add_stream("libx264", rate=cfg.fps, options={"preset": "ultrafast", "tune": "zerolatency"})
        st.width = st.height = cfg.size
        st.pix_fmt = "yuv420p"
        st.codec_context.gop_size = 2 * cfg.fps
        for i in range(int(round(duration * cfg.fps))):
            frame = av.VideoFrame.from_ndarray(frame_at(i / cfg.fps, scenes, needle, cfg.size), format="rgb24")
            for packet in st.encode(frame):
                out.mux(packet)
        for packet in st.encode():
            out.mux(packet)
    os.replace(tmp, path)


def pairs_showing(scene, times):
    """(groups, hit): the global view's frame pairs (the groups that get one timestamp) and the indices of those
    with a frame inside the scene."""
    s, e = scene[0], scene[1]
    groups = [times[i:i + 2] for i in range(0, len(times), 2)]
    return groups, [j for j, g in enumerate(groups) if any(s <= t < e for t in g)]


def crop_window_for(scene, times):
    """The window a model can read off its prompt: from the timestamp of the global-view group before the
    first group showing the scene to the timestamp of the group after the last one (groups = frame pairs)."""
    s, e = scene[0], scene[1]
    groups, hit = pairs_showing(scene, times)
    if not hit:  # cannot happen when scene_min exceeds the global frame spacing
        return float(int(s)), float(int(e) + 1)
    a = groups[hit[0] - 1][0] if hit[0] > 0 else 0.0
    step = times[1] - times[0] if len(times) > 1 else 1.0
    b = groups[hit[-1] + 1][0] if hit[-1] + 1 < len(groups) else float(int(times[-1] + step))  # past the end
    return a, b


def _fmt(t):
    return str(int(t)) if float(t).is_integer() else f"{t:.1f}"


def thing(cfg: NeedleConfig):
    """What the questions and the SFT thinks call the needle."""
    return "flash" if cfg.square >= 1 else "small square"


def question(colour, when, cfg: NeedleConfig):
    """The question about the needle of the `colour` scene: when it appears (answered in seconds) or its colour."""
    if when:
        return f"At what second does the {thing(cfg)} appear in the {colour} scene?"
    return f"What colour is the {thing(cfg)} that appears during the {colour} scene?"


def call_text(a, b):
    return f'<tool_call>{{"name": "crop_video", "arguments": {{"start_time": {_fmt(a)}, "end_time": {_fmt(b)}}}}}</tool_call>'


def sft_turns(sample, scenes, k, needle, rng, cfg: NeedleConfig):
    colour = scenes[k][2]
    times = global_times(sample["duration"], ViewConfig())  # the default global view the SFT prompt will show
    a, b = crop_window_for(scenes[k], times)
    turns = []
    if rng.random() < cfg.imperfect_fraction and len(scenes) > 1:
        j = rng.choice([i for i in range(len(scenes)) if i != k])
        wa, wb = crop_window_for(scenes[j], times)
        if wb <= a or wa >= b:  # a wrong crop that really misses the needle scene
            turns.append(f"<think>The {colour} scene may be around {_fmt(wa)}s to {_fmt(wb)}s. "
                         f"I will crop it.</think>{call_text(wa, wb)}")
            turns.append(f"<think>No {thing(cfg).split()[-1]} in this part: this is the {scenes[j][2]} scene. "
                         f"The {colour} scene is "
                         f"around {_fmt(a)}s to {_fmt(b)}s.</think>{call_text(a, b)}")
    if not turns:
        turns.append(f"<think>The {colour} scene is around {_fmt(a)}s to {_fmt(b)}s. I will crop it to look "
                     f"for the {thing(cfg).split()[-1]}.</think>{call_text(a, b)}")
    turns.append(f"<think>The cropped frames show a {needle['colour']} {thing(cfg).split()[-1]} at about "
                 f"{_fmt(round(needle['start']))}s.</think><answer>{sample['answer']}</answer>")
    return turns


def retarget(sample, view):
    """A needle SFT row whose crop windows were read off the default global view, rewritten for the timestamps
    that `view` shows (train_sft.py jitters the global view per sample): otherwise the target times are not in
    the prompt to copy. Rows without the needle ground truth (`scenes`) are returned unchanged."""
    if not sample.get("scenes") or not sample.get("turns"):
        return sample
    d = sample["duration"]
    t0, t1 = global_times(d, ViewConfig()), global_times(d, view)
    if t0 == t1:
        return sample
    subs = []
    for sc in sample["scenes"]:
        (a0, b0), (a1, b1) = crop_window_for(sc, t0), crop_window_for(sc, t1)
        subs.append((call_text(a0, b0), call_text(a1, b1)))
        subs.append((f"around {_fmt(a0)}s to {_fmt(b0)}s", f"around {_fmt(a1)}s to {_fmt(b1)}s"))
    turns = []
    for t in sample["turns"]:  # two passes through placeholders, so one rewrite cannot feed another
        for i, (old, _) in enumerate(subs):
            t = t.replace(old, f"\x00{i}\x00")
        for i, (_, new) in enumerate(subs):
            t = t.replace(f"\x00{i}\x00", new)
        turns.append(t)
    return dict(sample, turns=turns)


def make_sample(i, split, rng, cfg: NeedleConfig, video_dir):
    short = split in ("train", "eval_short")
    lo, hi = (cfg.min_duration, cfg.max_duration) if short else (cfg.eval_min_duration, cfg.eval_max_duration)
    duration = float(round(rng.uniform(lo, hi)))
    scenes, k, needle = make_layout(rng, duration, cfg)
    name = f"{split}_{i:05d}.mp4"
    path = os.path.join(video_dir, name)
    if not os.path.exists(path):
        write_video(path, duration, scenes, needle, cfg)
    colour = scenes[k][2]
    when = rng.random() < cfg.when_fraction
    q = question(colour, when, cfg)
    answer, atype = (str(round(needle["start"])), "time") if when else (needle["colour"], "text")
    sample = dict(id=f"{split}_{i:05d}", video=f"videos/{name}", question=q, answer=answer, answer_type=atype,
                  window=[scenes[k][0], scenes[k][1]], duration=duration,
                  needle=dict(needle, scene=colour), scenes=scenes)
    return sample, (scenes, k, needle)


def generate(cfg: NeedleConfig):
    from tqdm import tqdm
    video_dir = os.path.join(cfg.out, "videos")
    os.makedirs(video_dir, exist_ok=True)
    rng = random.Random(cfg.seed)
    rows = {"train": [], "eval": [], "sft": [], "eval_short": []}
    # eval_short last: the train and eval splits of a seed do not depend on it
    jobs = [("train", i) for i in range(cfg.num_train)] + [("eval", i) for i in range(cfg.num_eval)] + \
        [("eval_short", i) for i in range(cfg.num_eval_short)]
    for split, i in tqdm(jobs, desc=f"needle videos -> {cfg.out}"):
        sample, (scenes, k, needle) = make_sample(i, split, rng, cfg, video_dir)
        rows[split].append(sample)
        if split == "train":
            rows["sft"].append(dict(sample, turns=sft_turns(sample, scenes, k, needle, rng, cfg)))
    for split, samples in rows.items():
        with open(os.path.join(cfg.out, f"{split}.jsonl.tmp"), "w") as f:
            for s in samples:
                f.write(json.dumps(s) + "\n")
        os.replace(os.path.join(cfg.out, f"{split}.jsonl.tmp"), os.path.join(cfg.out, f"{split}.jsonl"))
    with open(os.path.join(cfg.out, "config.json"), "w") as f:
        json.dump(asdict(cfg), f, indent=1)
    return rows


def load_config(data_dir):
    """The NeedleConfig that `data_dir` was generated with (its config.json; keys this version does not know are
    skipped), or the defaults when it has none (data from elsewhere). The warm-ups use it, so they word and draw
    their examples as the data does (e.g. "small square" for data made with --square < 1)."""
    path = os.path.join(data_dir, "config.json")
    if not os.path.isfile(path):
        return NeedleConfig()
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable needle config ({e})") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(saved).__name__}")
    known = {f.name for f in fields(NeedleConfig)}
    return NeedleConfig(**{k: v for k, v in saved.items() if k in known})


def ensure(path, **overrides):
    """Generate the default benchmark when `path` (one of its files) is missing: what scripts call with no data."""
    if not os.path.exists(path):
        generate(NeedleConfig(out=os.path.dirname(path) or ".", **overrides))


def main(argv=None):
    cfg = parse_config(NeedleConfig, sys.argv[1:] if argv is None else argv)
    rows = generate(cfg)
    print(f"wrote {len(rows['train'])} train, {len(rows['eval'])} eval, {len(rows['eval_short'])} eval_short, "
          f"{len(rows['sft'])} sft samples to {cfg.out}")


if __name__ == "__main__":
    main()
