"""How fast does a model shape learn the needle benchmark's reading step? A measured study, not a unit test.

    python bench/reading.py                         # the tiny default shape, 300 steps

The second half of the needle task: after its crop, the policy sees the cropped frames and must name the colour of
the small square that appears in one or two of them ("The cropped frames show a red square at about 52s.", then
the answer). This script trains only that turn, teacher-forced, in its real context (system + global view +
question + the SFT crop call + the observation with the crop's frames, drawn in memory at the times the crop tool
samples), with the loss on the answer turn. It reports, on held-out layouts, the greedy teacher-forced accuracy
of the colour token in the think and of the answer token. The complementary study of the first step (the crop
window) is bench/grounding.py; together they bound what SFT can teach in a number of steps.
"""
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import needle  # noqa: E402
import warmup  # noqa: E402
from bench.grounding import layout  # noqa: E402
from data import Renderer, ViewConfig, collate, global_times, model_vision  # noqa: E402
from model import TinyConfig, load_model, parse_config  # noqa: E402


@dataclass
class Config:
    steps: int = 300                 # optimizer steps (batches of freshly drawn layouts)
    batch_size: int = 8              # layouts per step
    lr: float = 4e-3                 # peak AdamW lr (linear warm-up, cosine to 10%)
    warmup: int = 10
    hidden: int = TinyConfig.hidden  # model shape (model.TinyConfig)
    layers: int = TinyConfig.layers
    min_duration: float = 180.0      # video lengths, seconds (the needle train split: 3-5 min)
    max_duration: float = 300.0
    crop_max_frames: int = ViewConfig.crop_max_frames  # frame budget of a crop (data.ViewConfig)
    square: int = 14                 # side of the square in a 56-px frame (the benchmark's: a quarter of the side)
    isolated: bool = False           # train and test on one temporal patch alone (2 frames, no prompt): the
                                     # vision part of the skill without the long context
    needle_frames: int = 1           # with --isolated: frames of the two that show the square (1 or 2)
    pretrain: int = 0                # first this many steps of the --isolated task (batch 16, same square), then
                                     # the configured one: does a perception warm-up make the in-context step learnable?
    max_pairs: int = 1               # isolated examples show 1..max_pairs temporal patches (the haystack)
    context_lr: float = 0.0          # peak lr of the in-context stage (0: --lr)
    mix: int = 0                     # isolated examples added to every in-context batch
    crop_size: int = 56              # side of a cropped frame in pixels (data.ViewConfig.crop_max_pixels = side^2)
    eval_every: int = 100
    num_eval: int = 64
    seed: int = 0
    threads: int = 1


def crop_times(a, b, view: ViewConfig, fps=2):
    """The frame times tools.crop_video decodes for [a, b] (slice centres, snapped to the video's frames)."""
    n = max(1, min(view.crop_max_frames, max(view.crop_min_frames, round((b - a) * view.crop_fps))))
    step = (b - a) / n
    return [math.floor((a + (i + 0.5) * step) * fps) / fps for i in range(n)]


def isolated(proc, view, rng, cfg, pairs=1):
    """A short crop alone: `pairs` temporal patches (2 frames each) of one scene, the square in --needle_frames
    consecutive frames of them, in the observation's wording, then the answer turn's "show a" and the colour."""
    col, scene = rng.choice(needle.NEEDLE_COLOURS), [(0.0, 1e9, rng.choice(needle.SCENE_COLOURS))]
    side = cfg.square * (cfg.crop_size // 56)
    nd = dict(start=0.0, end=1.0, colour=col, side=side, x=rng.randrange(cfg.crop_size - side + 1),
              y=rng.randrange(cfg.crop_size - side + 1))
    j = rng.randrange(2 * pairs - cfg.needle_frames + 1)
    shown = set(range(j, j + cfg.needle_frames))
    frames = np.stack([needle.frame_at(0.5 if i in shown else 5.0, scene, nd, cfg.crop_size) for i in range(2 * pairs)])
    r = Renderer(proc, view)
    ctx = (r.text("<tool_response>") + r.visual(frames, [float(i) for i in range(2 * pairs)])
           + r.text("</tool_response><|im_end|>\n<|im_start|>assistant\n<think>The cropped frames show a"))
    return ctx + r.text(f" {col}", train=1), (len(ctx.input_ids), len(ctx.input_ids))


def example(proc, view, rng, cfg):
    if cfg.isolated:
        return isolated(proc, view, rng, cfg, rng.randint(1, cfg.max_pairs))
    crop_size, square = cfg.crop_size, cfg.square
    duration, scenes, k, nd = layout(rng, cfg.min_duration, cfg.max_duration)
    nd = dict(nd, side=square, x=min(nd["x"], 56 - square), y=min(nd["y"], 56 - square))
    times = global_times(duration, view)
    frames = np.stack([needle.frame_at(t, scenes, nd, 56) for t in times])
    colour = scenes[k][2]
    a, b = needle.crop_window_for(scenes[k], times)
    b = min(b, duration)
    ct = crop_times(a, b, view)
    z = crop_size // 56  # the layout is drawn at 56 px; scale the square with the frame
    crop = np.stack([needle.frame_at(t, scenes, dict(nd, x=nd["x"] * z, y=nd["y"] * z, side=nd["side"] * z), crop_size)
                     for t in ct])
    r = Renderer(proc, view)
    sample = dict(question=f"What colour is the small square that appears during the {colour} scene?")
    first = (f"<think>The {colour} scene is around {needle._fmt(a)}s to {needle._fmt(b)}s. I will crop it to look "
             f"for the square.</think>{needle.call_text(a, b)}")
    obs = dict(frames=crop, timestamps=ct, text=f"Frames from {needle._fmt(a)}s to {needle._fmt(b)}s.")
    ctx = r.prompt(sample, frames, times) + r.text(first) + r.observation(obs) + r.text(
        "<think>The cropped frames show a")
    c1 = r.text(f" {nd['colour']}", train=1)
    mid = r.text(f" square at about {needle._fmt(round(nd['start']))}s.</think><answer>", train=1)
    c2 = r.text(nd["colour"], train=1)
    rendered = ctx + c1 + mid + c2 + r.text("</answer>", train=1)
    i1 = len(ctx.input_ids)
    i2 = i1 + len(c1.input_ids) + len(mid.input_ids)
    return rendered, (i1, i2)


def evaluate(model, proc, view, cfg, pad):
    rng = random.Random(10_000 + cfg.seed)
    hit_think = hit_answer = 0
    model.eval()
    with torch.no_grad():
        for i in range(0, cfg.num_eval, cfg.batch_size):
            exs = [example(proc, view, rng, cfg)
                   for _ in range(min(cfg.batch_size, cfg.num_eval - i))]
            batch = collate(model, [e[0] for e in exs], pad)
            vision = model_vision(batch["vision"])
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], **vision).logits
            for b, (_, (i1, i2)) in enumerate(exs):
                ids = batch["input_ids"][b]
                hit_think += logits[b, i1 - 1].argmax().item() == ids[i1].item()
                hit_answer += logits[b, i2 - 1].argmax().item() == ids[i2].item()
    model.train()
    return dict(think_colour_acc=hit_think / cfg.num_eval, answer_acc=hit_answer / cfg.num_eval)


def train(model, proc, view, cfg, pad, steps, batch_size, tag="", lr=None, mix=0):
    """warmup.fit on freshly drawn examples of cfg's kind (plus `mix` isolated examples per step), with a held-out
    line every --eval_every steps."""
    rng = random.Random(cfg.seed + len(tag))
    lines, t0 = [], time.time()

    def draw(_):
        exs = [example(proc, view, rng, cfg) for _ in range(batch_size)]
        exs += [isolated(proc, view, rng, cfg, rng.randint(1, cfg.max_pairs)) for _ in range(mix)]
        return collate(model, [e[0] for e in exs], pad)

    def report(step, loss):
        if step % cfg.eval_every == 0 or step == steps:
            m = dict(stage=tag or ("isolated" if cfg.isolated else "in context"), step=step,
                     loss=round(loss, 4), seconds=round(time.time() - t0, 1),
                     **{k: round(v, 3) for k, v in evaluate(model, proc, view, cfg, pad).items()})
            print(json.dumps(m), flush=True)
            lines.append(m)
    warmup.fit(model, draw, steps, lr or cfg.lr, cfg.warmup, report)
    return lines


def main(argv=None):
    cfg = parse_config(Config, sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(cfg.threads)
    model, proc = load_model("tiny", tiny=replace(TinyConfig(), hidden=cfg.hidden, layers=cfg.layers))
    pad = proc.tokenizer.pad_token_id
    view = ViewConfig(crop_max_frames=cfg.crop_max_frames, crop_max_pixels=cfg.crop_size ** 2)
    print(f"params {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M  {json.dumps(asdict(cfg))}", flush=True)
    lines = []
    if cfg.pretrain:  # first the isolated perception task (batch 16), then the configured one
        lines += train(model, proc, view, replace(cfg, isolated=True), pad, cfg.pretrain, 16, "pretrain (isolated)")
    return lines + train(model, proc, view, cfg, pad, cfg.steps, cfg.batch_size, lr=cfg.context_lr, mix=cfg.mix)


if __name__ == "__main__":
    main()
