"""How fast does a model shape learn the needle benchmark's grounding step? A measured study, not a unit test.

    python bench/grounding.py                                  # the tiny default shape, 400 steps, ~5 min
    python bench/grounding.py --number_digits=4 --grid=0        # session-1 tokenizer and global view
    python bench/grounding.py --eval_min=600 --eval_max=900     # held-out layouts as long as the eval videos
    python bench/grounding.py --hidden=256 --heads=8 --kv_heads=4 --ffn=768 --lr=2e-3
    python bench/grounding.py --factors=true                    # + held-out sets changing one factor at a time
    python bench/grounding.py --queries=8                       # 7 more scenes asked per layout (the warm-up's)
    python bench/grounding.py --max_offset=600                  # timestamps shown shifted by up to 600 s

The hard step of the needle task is reading the crop window off the prompt: the question names a scene by its
colour and the policy must write the global-view timestamps around the frames of that colour. This script trains
only that step, teacher-forced: prompt (the real renderer: system + tool schema + global view + question) and the
first sentence of the SFT think ("The <colour> scene is around A s to B s."), with the loss on that sentence
(and, with --queries, on the answers to more "Where is the <colour> scene?" turns after it: warmup.scene_queries).
Frames are drawn in memory (no video files), so each step costs one forward/backward of a short sequence.
Every --eval_every steps it prints, on held-out layouts (--eval_min/--eval_max seconds long), the greedy
teacher-forced accuracy of the start and end numbers and the mean IoU of the window they make with the scene
(the scene's colour is given: it is teacher-forced too), and how often the greedy colour after "<think>The" is
the question's (colour_acc: free generation has to get that right first).
"""
import json
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
from data import Renderer, ViewConfig, collate, global_times, model_vision  # noqa: E402
from model import TinyConfig, load_model, parse_config  # noqa: E402


@dataclass
class Config:
    steps: int = 400                 # optimizer steps (batches of freshly drawn layouts)
    batch_size: int = 8              # layouts per step
    lr: float = 4e-3                 # peak AdamW lr (linear warm-up, cosine to 10%)
    warmup: int = 10                 # warm-up steps
    hidden: int = TinyConfig.hidden  # model shape (model.TinyConfig)
    layers: int = TinyConfig.layers
    heads: int = TinyConfig.heads
    kv_heads: int = TinyConfig.kv_heads
    ffn: int = TinyConfig.ffn
    number_digits: int = 1           # model.NUMBER_DIGITS: longest number that is one token (4: one per number)
    grid: float = ViewConfig.time_grid  # data.ViewConfig.time_grid (0: frames at slice centres)
    min_duration: float = 180.0      # training video lengths, seconds (the needle train split: 3-5 min)
    max_duration: float = 300.0
    scene_min: float = 20.0          # training scene lengths, seconds (held-out layouts keep the needle's 20-40)
    scene_max: float = 40.0
    eval_min: float = 180.0          # held-out video lengths (600-900: the needle eval split)
    eval_max: float = 300.0
    target: str = "window"           # window: the SFT crop window | own: times of the first and last pair showing
                                     # the scene | first: the first and last times shown (a copy, no grounding)
    jitter: bool = True              # random global frame count up to the budget, as train_sft's --view_jitter
    max_spacing: float = 0.0         # jitter also draws sparser views, down to one frame per this many s (0: off)
    eval_every: int = 100            # print a held-out line every N steps (and at the end)
    num_eval: int = 64               # held-out layouts (the same ones at every eval)
    seed: int = 0                    # model init is TinyConfig's; this seeds the layouts
    threads: int = 1                 # torch threads
    out: str = ""                    # also append the held-out lines to this JSONL file
    curriculum: int = 0              # grow the training video lengths over this many steps, from --start_min..
                                     # --start_max (few scenes) to --min_duration..--max_duration (0: off)
    start_min: float = 60.0
    start_max: float = 90.0
    max_offset: float = 0.0          # training timestamps shown shifted by a random multiple of 10 s up to this
                                     # (frames unchanged): only a model that copies the digits can fit them
    queries: int = 1                 # grounding questions per training layout (> 1: more scenes asked, denser loss)
    square: float = needle.NeedleConfig.square  # the needle's side (1: whole-frame flash; the first tables of
                                     # docs/studies.md were measured with the earlier 0.25, which --square=0.25 gives)
    factors: bool = False            # at the end, also evaluate held-out sets that change one thing at a time
                                     # (video length, view step, frame count): see FACTORS


def layout(rng, lo, hi, scenes=(20.0, 40.0), square=needle.NeedleConfig.square):
    ncfg = needle.NeedleConfig(size=56, scene_min=scenes[0], scene_max=scenes[1], square=square)
    duration = float(round(rng.uniform(lo, hi)))
    scenes, k, nd = needle.make_layout(rng, duration, ncfg)
    return duration, scenes, k, nd


def example(proc, view, rng, lo, hi, jitter, target="window", max_spacing=0.0, scene_range=(20.0, 40.0), offset=0.0,
            queries=1, square=needle.NeedleConfig.square):
    """offset > 0: the timestamps shown (and the target window) are shifted by that many seconds, the frames are not:
    the same layouts with the numbers of a longer video (a diagnostic factor). queries > 1: up to queries - 1 more
    user turns follow, each asking for the window of another scene whose colour occurs once (loss on the answers)."""
    duration, scenes, k, nd = layout(rng, lo, hi, scene_range, square)
    if jitter:
        n0 = len(global_times(duration, view))
        if max_spacing:
            n0 = min(n0, max(2, int(duration / max_spacing)))
        n = rng.randint(n0, max(n0, view.global_frames))
        view = replace(view, global_fps=(n + 0.5) / duration)
    times = global_times(duration, view)
    frames = np.stack([needle.frame_at(t, scenes, nd, 56) for t in times])
    colour = scenes[k][2]
    if target == "window":
        a, b = needle.crop_window_for(scenes[k], times)
    elif target == "own":
        groups, hit = needle.pairs_showing(scenes[k], times)  # the first and last pair showing the scene
        a, b = groups[hit[0]][0], groups[hit[-1]][0]
    else:  # "first": the first and last timestamps shown (a copy without grounding)
        a, b = times[0], times[(len(times) - 1) // 2 * 2]
    sample = dict(question=f"What colour is the small square that appears during the {colour} scene?")
    r = Renderer(proc, view)
    prompt = r.prompt(sample, frames, [t + offset for t in times])
    a, b = a + offset, b + offset
    head = r.text(f"<think>The {colour} scene is around", train=1)
    num_a = r.text(f" {needle._fmt(a)}", train=1)
    mid = r.text("s to", train=1)
    num_b = r.text(f" {needle._fmt(b)}", train=1)
    tail = r.text("s.", train=1)
    rendered = prompt + head + num_a + mid + num_b + tail
    if queries > 1:
        rendered = rendered + warmup.scene_queries(r, rng, scenes, times, colour, queries - 1, offset)
    ia = len(prompt.input_ids) + len(head.input_ids) + 1       # the start number's tokens (after the space)
    ib = ia + len(num_a.input_ids) - 1 + len(mid.input_ids) + 1
    ra, rb = range(ia, ia + len(num_a.input_ids) - 1), range(ib, ib + len(num_b.input_ids) - 1)
    ic = len(prompt.input_ids) + len(r.text("<think>The").input_ids)  # the scene's colour (from the question)
    return rendered, (ra, rb, ic), (a, b), (scenes[k][0] + offset, scenes[k][1] + offset)


# name: (held-out video lengths in s, overrides of the global view); the default view is 10 s between frames
# (15 s above 640 s), at most 64 frames
FACTORS = {
    "3-5 min (the training lengths)": ((180, 300), {}),
    "3-5 min, 15 s step": ((180, 300), dict(global_fps=1 / 15)),
    "3-5 min, 64 frames (5 s step)": ((180, 300), dict(global_fps=1.0)),
    "5-8 min": ((300, 480), {}),
    "10-15 min (the eval lengths)": ((600, 900), {}),
    "10-15 min, 10 s step (60-90 frames)": ((600, 900), dict(global_frames=90)),
    "3-5 min, times shown +600 s": ((180, 300), dict(offset=600.0)),
}


def iou(w, s):
    inter = max(0.0, min(w[1], s[1]) - max(w[0], s[0]))
    union = max(w[1], s[1]) - min(w[0], s[0])
    return inter / union if union > 0 else 0.0


def evaluate(model, proc, view, cfg, pad, offset=0.0):
    rng = random.Random(10_000 + cfg.seed)
    hits_a = hits_b = hits_c = 0
    ious = []
    model.eval()
    with torch.no_grad():
        for i in range(0, cfg.num_eval, cfg.batch_size):
            exs = [example(proc, view, rng, cfg.eval_min, cfg.eval_max, False, cfg.target, offset=offset,
                           square=cfg.square)
                   for _ in range(min(cfg.batch_size, cfg.num_eval - i))]
            batch = collate(model, [e[0] for e in exs], pad)
            vision = model_vision(batch["vision"])
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], **vision).logits
            for b, (_, (ra, rb, ic), (a, bb), scene) in enumerate(exs):
                hits_c += logits[b, ic - 1].argmax().item() == batch["input_ids"][b, ic].item()
                pa, pb = [logits[b, t - 1].argmax().item() for t in ra], [logits[b, t - 1].argmax().item() for t in rb]
                ta, tb = [batch["input_ids"][b, t].item() for t in ra], [batch["input_ids"][b, t].item() for t in rb]
                hits_a += pa == ta
                hits_b += pb == tb
                try:
                    w = (float(proc.tokenizer.decode(pa)), float(proc.tokenizer.decode(pb)))
                except ValueError:
                    w = (0.0, 0.0)
                ious.append(iou(w, scene))
    model.train()
    n = cfg.num_eval
    return dict(start_acc=hits_a / n, end_acc=hits_b / n, iou=float(np.mean(ious)), colour_acc=hits_c / n)


def main(argv=None):
    cfg = parse_config(Config, sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(cfg.threads)
    import model as M
    M.NUMBER_DIGITS = cfg.number_digits
    tiny = TinyConfig(hidden=cfg.hidden, layers=cfg.layers, heads=cfg.heads, kv_heads=cfg.kv_heads, ffn=cfg.ffn)
    model, proc = load_model("tiny", tiny=tiny)
    pad = proc.tokenizer.pad_token_id
    view = ViewConfig(time_grid=cfg.grid)
    rng = random.Random(cfg.seed)
    nparams = sum(p.numel() for p in model.parameters())
    print(f"params {nparams / 1e6:.2f}M  {json.dumps(asdict(cfg))}", flush=True)
    out = open(cfg.out, "a") if cfg.out else None
    lines = []
    t0 = time.time()

    def draw_offset():  # no draw when off: the default runs keep their layouts
        return 10.0 * rng.randint(0, int(cfg.max_offset // 10)) if cfg.max_offset else 0.0

    def draw(step):
        f = min(1.0, step / cfg.curriculum) if cfg.curriculum else 1.0
        lo = cfg.start_min + f * (cfg.min_duration - cfg.start_min)
        hi = cfg.start_max + f * (cfg.max_duration - cfg.start_max)
        exs = [example(proc, view, rng, lo, hi, cfg.jitter, cfg.target, cfg.max_spacing,
                       (cfg.scene_min, cfg.scene_max), draw_offset(), cfg.queries, cfg.square)
               for _ in range(cfg.batch_size)]
        return collate(model, [e[0] for e in exs], pad)

    def report(step, loss):
        if step % cfg.eval_every == 0 or step == cfg.steps:
            m = dict(step=step, loss=round(loss, 4), seconds=round(time.time() - t0, 1),
                     **{k: round(v, 3) for k, v in evaluate(model, proc, view, cfg, pad).items()})
            print(json.dumps(m), flush=True)
            lines.append(m)
            if out:
                out.write(json.dumps(dict(m, config=asdict(cfg))) + "\n")
                out.flush()
    warmup.fit(model, draw, cfg.steps, cfg.lr, cfg.warmup, report)
    if cfg.factors:
        for name, ((lo, hi), over) in FACTORS.items():
            over = dict(over)
            offset = over.pop("offset", 0.0)
            r = evaluate(model, proc, replace(view, **over), replace(cfg, eval_min=lo, eval_max=hi), pad, offset)
            m = dict(factor=name, **{k: round(v, 3) for k, v in r.items()})
            print(json.dumps(m), flush=True)
            lines.append(m)
    return lines


if __name__ == "__main__":
    main()
