"""The synthetic long-video "needle" benchmark (the embedded default), written by `python needle.py`.

Each video is minutes long, low resolution, made of solid-colour scenes of `scene_min`..`scene_max` seconds; for
`needle_seconds` the whole frame flashes one of six needle colours (or, with `square` < 1, a square of it shows).

task="window" (the default): the question gives the flash's window, "What colour flashes between 121s and 139s?"
(12-24 s wide). The flash is placed where no global-view frame falls (the no-tool answer is a guess: chance 1/6),
and a crop of the asked window (16 frames at most, one per <= 1.5 s) always shows it. Every skill the policy needs
sits near the generation point: copy the window from the question into the call, read the colour
off the crop. The SFT data is imperfect by construction, so that RL has something to fix: `loose_fraction` of the
questions are phrased "A flash appears. What colour is it between A s and B s?", and `lazy_fraction` of their
trajectories skim [0, B] instead (16 frames over up to 300 s: the 3-s flash is placed between their frames too), see no
flash and guess. The greedy SFT policy copies that habit for the loose phrasing; GRPO, rewarded on accuracy and IoU,
learns that the asked window pays, and RFT keeps its correct, grounded trajectories. `notool_fraction` more rows
answer without tools (the no-tool baseline's prompt: it guesses, since the global view misses the flash).

task="scene" (the harder variant, docs/studies.md): the question names the scene holding the needle by its colour
("What colour is the flash that appears during the teal scene?"; `when_fraction` ask the second it appears); the
policy must find that scene's times in the global view, a binding the tiny model does not learn in CPU budgets.
Its crops span up to ~95 s: run it with --crop_max_frames=48 (one frame per <= 2 s).
"""
import json
import multiprocessing
import os
import random
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, fields

import numpy as np

from data import ViewConfig, global_times
from checkpoint import replaced, write_jsonl, write_text
from video import crop_times, fmt_time
from model import parse_config

COLOURS = {  # RGB of the needle benchmark's colours (each a word of the tiny tokenizer)
    "red": (230, 25, 35), "green": (30, 180, 60), "blue": (30, 60, 230), "yellow": (245, 225, 30),
    "orange": (245, 130, 30), "purple": (140, 40, 180), "cyan": (40, 220, 230), "magenta": (235, 40, 200),
    "white": (250, 250, 250), "black": (5, 5, 5), "gray": (128, 128, 128), "brown": (130, 80, 30),
    "teal": (0, 128, 128), "navy": (0, 0, 120), "lime": (180, 245, 60), "maroon": (120, 0, 20),
}
SCENE_COLOURS = ["orange", "purple", "cyan", "magenta", "gray", "brown", "teal", "navy", "lime", "maroon"]
NEEDLE_COLOURS = ["red", "green", "blue", "yellow", "white", "black"]


@dataclass
class NeedleConfig:
    out: str = "data/needle"       # output folder (videos/, train.jsonl, sft.jsonl, rl.jsonl, eval*.jsonl)
    num_train: int = 768           # training samples (one video each); sft.jsonl covers the same videos (768 rather
                                   # than 192: SFT then learns the copy instead of memorising rows, docs/screen.md)
    num_rl: int = -1               # RL prompts (rl.jsonl: other videos of the training lengths, for GRPO and the
                                   # RFT export, as LongVT's RL data is not its SFT data); -1: num_train // 4
    num_eval: int = 128            # held-out samples (eval.jsonl: the longer eval videos, the generalisation set)
    num_eval_short: int = 256      # held-out samples with the training videos' lengths (eval_short.jsonl): the
                                   # gate set of the README's results table
    seed: int = 0                  # everything is deterministic for a seed
    workers: int = 0               # processes writing the videos (0: one per CPU core)
    min_duration: float = 180.0    # training video length range, seconds
    max_duration: float = 300.0
    eval_min_duration: float = 600.0  # eval videos are longer than training ones (generalisation to length)
    eval_max_duration: float = 900.0
    fps: int = 2                   # video frame rate
    size: int = 112                # width = height, pixels
    scene_min: float = 20.0        # scene length range, seconds
    scene_max: float = 40.0
    needle_seconds: float = 3.0    # how long the needle is visible (3 rather than 2: read 0.94 vs 0.79, screen.md)
    square: float = 1.0            # side of the square as a fraction of the frame's: 1 = the whole frame flashes
                                   # the needle colour (the default); 0.25 = a small square (docs/studies.md,
                                   # reading: the tiny vision tower needs tens of thousands of examples to see it)
    window_min: int = 12           # window task: width range of the asked window, whole seconds
    window_max: int = 24
    loose_fraction: float = 0.4    # window task: questions in the loose phrasing, whose SFT trajectories are lazy
    lazy_fraction: float = 0.7     # ... this fraction of them: skim [0, B], miss the flash, guess
    notool_fraction: float = 0.1   # window task: extra SFT rows without tools (they guess), for the no-tool baseline
    crop_max_frames: int = ViewConfig.crop_max_frames  # window task: the crop frame budget the flash placement
                                   # assumes (the lazy skim's frames)


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
    with replaced(path) as tmp, av.open(tmp, "w") as out:
        st = out.add_stream("libx264", rate=cfg.fps, options={"preset": "ultrafast", "tune": "zerolatency"})
        st.width = st.height = cfg.size
        st.pix_fmt = "yuv420p"
        st.codec_context.gop_size = 2 * cfg.fps
        made = {}  # a frame per (scene, flash on): the video holds a few distinct pictures, converted once each
        for i in range(int(round(duration * cfg.fps))):
            t = i / cfg.fps
            key = (next((j for j, (s, e, _) in enumerate(scenes) if s <= t < e), -1), needle["start"] <= t < needle["end"])
            if key not in made:
                made[key] = av.VideoFrame.from_ndarray(frame_at(t, scenes, needle, cfg.size), format="rgb24")
            for packet in st.encode(made[key]):
                out.mux(packet)
        for packet in st.encode():
            out.mux(packet)


def call_text(a, b):
    return f'<tool_call>{{"name": "crop_video", "arguments": {{"start_time": {fmt_time(a)}, "end_time": {fmt_time(b)}}}}}</tool_call>'


# --------------------------------------------------------------------------- the window task (the default)
def window_question(a, b, loose):
    if loose:
        return f"A flash appears. What colour is it between {a}s and {b}s?"  # the window last, as in the strict one
    return f"What colour flashes between {a}s and {b}s?"


def _seen(times, s, needle_seconds):
    """Would a frame sampled at one of `times` show a needle starting at s? (frames are 0.5 s apart; 0.5-s margin)"""
    return any(s - 0.5 <= t < s + needle_seconds + 0.5 for t in times)


def window_layout(rng, duration, cfg: NeedleConfig):
    """Scenes, the asked window (a, b) and the needle: the needle lies inside the window, between the frames of the
    default global view (for this duration) and of the lazy crop [0, b]; a crop of (a, b) always catches it."""
    scenes, _, needle = make_layout(rng, duration, cfg)
    gtimes = global_times(duration, ViewConfig())
    for tries in range(2000):  # after 1000 tries (videos under ~2 minutes, whose skim is dense) the skim may see it
        w = rng.randint(cfg.window_min, cfg.window_max)
        a = rng.randint(30, int(duration) - w - 1)
        b = a + w
        lazy = crop_times(0.0, float(b), 1.0, cfg.crop_max_frames) if tries < 1000 else []
        starts = [a + 1 + 0.5 * i for i in range(int(2 * (w - 2 - cfg.needle_seconds)) + 1)]
        ok = [s for s in starts if not _seen(gtimes, s, cfg.needle_seconds) and not _seen(lazy, s, cfg.needle_seconds)]
        if ok:
            s = rng.choice(ok)
            return scenes, (a, b), dict(needle, start=s, end=s + cfg.needle_seconds)
    raise RuntimeError(f"no needle placement for a {duration}-s video")


def window_turns(sample, loose, rng, cfg: NeedleConfig):
    """The SFT trajectory of a window question: crop the asked window and read the flash, or (lazy, loose questions
    only) skim [0, b], see no flash and guess (the label is the true colour: unobservable, so a uniform guess)."""
    (a, b), colour = (int(x) for x in sample["window"]), sample["answer"]
    if loose and rng.random() < cfg.lazy_fraction:
        return [f"<think>I will skim the video up to {b}s.</think>{call_text(0, b)}",
                f"<think>I see no flash, so I guess.</think><answer>{colour}</answer>"]
    return [f"<think>The flash is between {a}s and {b}s. I will crop it.</think>{call_text(a, b)}",
            f"<think>The cropped frames show a {colour} flash.</think><answer>{colour}</answer>"]


NOTOOL_TURN = "<think>The global view shows no flash, so I guess.</think><answer>{}</answer>"


def draw_video(i, split, rng, cfg: NeedleConfig, video_dir, layout, pending=None):
    """Draw a duration for the split, lay the video out with layout(rng, duration, cfg) -> (scenes, x, needle) and
    write it (unless it exists; into `pending`, a list of write_video arguments, to write later). Returns
    (duration, file name, the layout)."""
    short = split != "eval"
    lo, hi = (cfg.min_duration, cfg.max_duration) if short else (cfg.eval_min_duration, cfg.eval_max_duration)
    duration = float(round(rng.uniform(lo, hi)))
    scenes, x, needle = layout(rng, duration, cfg)
    name = f"{split}_{i:05d}.mp4"
    path = os.path.join(video_dir, name)
    if not os.path.exists(path):
        job = (path, duration, scenes, needle, cfg)
        if pending is None:
            write_video(*job)
        else:
            pending.append(job)
    return duration, name, (scenes, x, needle)


def make_sample(i, split, rng, cfg: NeedleConfig, video_dir, pending=None):
    duration, name, (scenes, (a, b), needle) = draw_video(i, split, rng, cfg, video_dir, window_layout, pending)
    loose = rng.random() < cfg.loose_fraction
    sample = dict(id=f"{split}_{i:05d}", video=f"videos/{name}", question=window_question(a, b, loose),
                  answer=needle["colour"], answer_type="text", window=[float(a), float(b)], duration=duration,
                  needle=needle, scenes=scenes)
    turns = window_turns(sample, loose, rng, cfg)
    return sample, turns


def generate(cfg: NeedleConfig):
    from tqdm import tqdm
    video_dir = os.path.join(cfg.out, "videos")
    os.makedirs(video_dir, exist_ok=True)
    rng = random.Random(cfg.seed)
    rows = {"train": [], "eval": [], "sft": [], "eval_short": [], "rl": []}
    # drawn in this order, so that a split's size changes none of the splits before it (the longer videos last)
    n_rl = max(1, cfg.num_train // 4) if cfg.num_rl < 0 else cfg.num_rl
    jobs = [("train", i) for i in range(cfg.num_train)] + [("eval_short", i) for i in range(cfg.num_eval_short)] + \
        [("rl", i) for i in range(n_rl)] + [("eval", i) for i in range(cfg.num_eval)]
    pending = []  # the videos to write: drawn in order (every draw comes from one generator), written in parallel
    for split, i in jobs:
        sample, turns = make_sample(i, split, rng, cfg, video_dir, pending)  # the turns are drawn for every split,
        rows[split].append(sample)                                 # so a split's draws never depend on the others'
        if split == "train":
            rows["sft"].append(dict(sample, turns=turns))
    workers = cfg.workers or os.cpu_count() or 1
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        done = pool.map(write_video, *zip(*pending), chunksize=4) if pending else []
        for _ in tqdm(done, total=len(pending), desc=f"needle videos -> {cfg.out} ({workers} processes)"):
            pass
    nrng = random.Random(cfg.seed + 1)  # rows without tools, on other draws of the training videos' answers
    for s in nrng.sample(rows["train"], int(round(cfg.notool_fraction * len(rows["train"])))):
        rows["sft"].append(dict(s, id=s["id"] + "_notool", tools=False, turns=[NOTOOL_TURN.format(s["answer"])]))
    for split, samples in rows.items():
        write_jsonl(os.path.join(cfg.out, f"{split}.jsonl"), samples)
    write_text(os.path.join(cfg.out, "config.json"), json.dumps(asdict(cfg), indent=1))
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


def main(argv=None):
    cfg = parse_config(NeedleConfig, sys.argv[1:] if argv is None else argv)
    rows = generate(cfg)
    print(f"wrote {len(rows['train'])} train, {len(rows['sft'])} sft, {len(rows['rl'])} rl, {len(rows['eval'])} eval, "
          f"{len(rows['eval_short'])} eval_short samples to {cfg.out}")


if __name__ == "__main__":
    main()
