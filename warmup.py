"""The skill warm-up train_sft runs before SFT on the needle data with the tiny model from scratch: fresh in-memory
examples of the two skills the window task needs, drawn by the needle benchmark's generators (needle.py; it reads no
file). Reading: a crop alone -> the answer turn (docs/studies.md: the tiny model does not learn to read the flash
inside the full SFT context). The copy: whole episodes after a bare question, so the asked window is copied into the
call (bench/screen.py: the 192 SFT rows alone are memorised, the copy is not learned from them). Steps alternate."""
import math
import random
from dataclasses import replace

import numpy as np

from data import Renderer, batch_to, collate, global_times
from needle import (NEEDLE_COLOURS, SCENE_COLOURS, NeedleConfig, _fmt, frame_at, question, thing, window_layout,
                    window_question, window_turns)
from tools import parse_tool_calls
from video import crop_times, fmt_time


def reading_example(renderer, rng, pairs, cfg: NeedleConfig = NeedleConfig(), size=56):
    """An in-memory crop alone, for the warm-up's reading steps: the question (either kind, as often as in the data),
    then `pairs` temporal patches (2 frames each) of one scene at 1-2 s spacing, the needle in 1-2 consecutive frames, in
    the observation's wording, then the whole answer turn as the SFT data writes it (loss on it). Frames are drawn
    at `size` px (the crop pixel budget's side)."""
    col, scene = rng.choice(NEEDLE_COLOURS), [(0.0, 1e9, rng.choice(SCENE_COLOURS))]
    side = max(1, int(round(size * cfg.square)))
    when = rng.random() < cfg.when_fraction
    t0, step = float(rng.randrange(0, 600)), rng.choice([1.0, 1.5, 2.0])
    times = [t0 + i * step for i in range(2 * pairs)]
    j = rng.randrange(2 * pairs)
    shown = {j, min(j + rng.randrange(2), 2 * pairs - 1)}
    nd = dict(start=-1.0, end=-1.0, colour=col, side=side, x=rng.randrange(size - side + 1),
              y=rng.randrange(size - side + 1))
    on = dict(nd, start=0.0, end=1.0)
    frames = np.stack([frame_at(0.5, scene, on if i in shown else nd, size) for i in range(2 * pairs)])
    obs = dict(frames=frames, timestamps=times, text=f"Frames from {_fmt(times[0])}s to {_fmt(times[-1] + step)}s.")
    w, at = thing(cfg), _fmt(round(times[j]))
    if cfg.task == "window":  # the window task's question and answer turn (needle.window_turns)
        a = int(t0)
        q = window_question(a, a + rng.randint(cfg.window_min, cfg.window_max), rng.random() < cfg.loose_fraction)
        turn = f"<think>The cropped frames show a {col} flash.</think><answer>{col}</answer>"
    else:
        q = question(scene[0][2], when, cfg)
        turn = (f"<think>The cropped frames show a {col} {w.split()[-1]} at about {at}s.</think>"
                f"<answer>{at if when else col}</answer>")
    head = renderer.mark("<|im_start|>user\n") + renderer.text(q)  # the observation chunk opens with <|im_end|>
    return head + renderer.observation(obs) + renderer.assistant(turn, final=True)


def episode_row(rng, cfg: NeedleConfig = NeedleConfig()):
    """A window-task SFT row drawn like needle.make_sample's, for a video that is never written: (row, scenes,
    needle), the row with `turns` (needle.window_turns) and a training duration."""
    duration = float(rng.randint(int(cfg.min_duration), int(cfg.max_duration)))
    scenes, (a, b), nd = window_layout(rng, duration, cfg)
    loose = rng.random() < cfg.loose_fraction
    row = dict(question=window_question(a, b, loose), answer=nd["colour"], window=[float(a), float(b)],
               duration=duration)
    return dict(row, turns=window_turns(row, loose, rng, cfg)), scenes, nd


def episode_example(renderer, rng, cfg: NeedleConfig = NeedleConfig(), size=56, prompt=False):
    """A whole window-task SFT episode in memory (episode_row): the question, both assistant turns (loss on them)
    and, between them, the crop of the called window as the tool returns it (frames drawn at the times the decoder
    returns, not decoded). Fresh windows at every step, so the tiny model learns to copy the asked window into the
    call instead of memorising the training rows' windows. prompt=False: a bare user turn holding only the question
    (the copy forms in this short context: bench/screen.py); True: the full prompt as train_sft renders a row
    (system turn, a global view with view_jitter's frame count)."""
    view = renderer.view
    row, scenes, nd = episode_row(rng, cfg)
    side = max(1, int(round(size * cfg.square)))
    needle = dict(nd, side=side, x=rng.randrange(size - side + 1), y=rng.randrange(size - side + 1))

    def shot(times):  # the frames (and times) the decoder returns for `times`: the last video frame at or before
        dec = [math.floor((t + 1e-6) * cfg.fps) / cfg.fps for t in times]
        return np.stack([frame_at(t, scenes, needle, size) for t in dec]), dec
    turns = row["turns"]
    start, end = (float(parse_tool_calls(turns[0])[-1].arguments[k]) for k in ("start_time", "end_time"))
    frames, ts = shot(crop_times(start, end, view.crop_fps, view.crop_max_frames, view.crop_min_frames))
    obs = dict(frames=frames, timestamps=ts, text=f"Frames from {fmt_time(start)}s to {fmt_time(end)}s.")
    if not prompt:
        head = (renderer.mark("<|im_start|>user\n") + renderer.text(row["question"])
                + renderer.mark("<|im_end|>\n<|im_start|>assistant\n"))
        return (head + renderer.assistant(turns[0], final=False) + renderer.observation(obs)
                + renderer.assistant(turns[1], final=True))
    d = row["duration"]
    lo = len(global_times(d, view))
    n = rng.randint(lo, max(lo, view.global_frames))
    r = Renderer(renderer.proc, replace(view, global_fps=(n + 0.5) / d)) if n > lo else renderer
    gframes, gts = shot(global_times(d, r.view))
    return r.trajectory(row, gframes, gts, lambda i, t: obs)


def fit(model, draw, steps, lr, nll, warmup_steps=10, on_step=None):
    """The warm-ups' training loop: `steps` teacher-forced AdamW steps (betas 0.9/0.95, no weight decay; linear
    warm-up over `warmup_steps` steps, then cosine to 10% of lr; grad norm clipped at 1) on the data.collate batch
    draw(step) returns (step from 1). The loss is the mean NLL of the batch's policy tokens; nll(model, batch) is
    their sum (train_sft.policy_nll). on_step(step, loss) runs after each step. Returns the losses."""
    import torch
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup_steps) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    losses, dev = [], next(model.parameters()).device
    for step in range(1, steps + 1):
        batch = batch_to(draw(step), dev)
        loss = nll(model, batch) / batch["policy_mask"][:, 1:].sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if on_step:
            on_step(step, losses[-1])
    return losses


def skill_warmup(model, processor, view, steps, examples, nll, lr=4e-3, seed=0, desc="warm-up"):
    """fit() on fresh batches: step k draws the batch examples[k % len(examples)] = (batch size, example(renderer,
    rng)) describes, so steps alternate between the kinds of example. Deterministic for a seed; a progress bar.
    Returns the losses."""
    from tqdm import tqdm
    r, rng, pad = Renderer(processor, view), random.Random(seed), processor.tokenizer.pad_token_id

    def draw(step):
        n, example = examples[step % len(examples)]
        return collate(model, [example(r, rng) for _ in range(n)], pad)
    with tqdm(total=steps, desc=desc, mininterval=5) as bar:
        return fit(model, draw, steps, lr, nll, on_step=lambda *_: bar.update())


def kinds(view, cfg: NeedleConfig, max_pairs=8):
    """The warm-up's examples for the data's task: crops alone -> the answer turn (16 per step: reading), and for the
    window task, on every other step, whole episodes after a bare question (8 per step: the copy of the window, for
    both phrasings: no lazy skims)."""
    size = int(math.isqrt(view.crop_max_pixels))
    reading = (16, lambda r, rng: reading_example(r, rng, rng.randint(1, max_pairs), cfg, size))
    if cfg.task != "window":
        return [reading]
    copy = replace(cfg, lazy_fraction=0.0)  # the skill for both phrasings; the lazy habit comes with the SFT rows
    return [reading, (8, lambda r, rng: episode_example(r, rng, copy, size))]


def run(model, processor, view, cfg, data: NeedleConfig, nll, default_steps=0):
    """The warm-up train_sft's config `cfg` asks for (--skill_warmup steps; -1 means default_steps), logging its loss
    from the first step to the mean of the last 20. `data`: the config the training data was made with
    (needle.load_config), so the examples are worded and drawn as the data is."""
    from model import print0
    steps = cfg.skill_warmup if cfg.skill_warmup >= 0 else default_steps
    if steps:
        losses = skill_warmup(model, processor, view, steps, kinds(view, data), nll, lr=cfg.lr, seed=cfg.seed,
                              desc="skill warm-up")
        tail = losses[-20:]
        print0(f"skill warm-up: {steps} steps, loss {losses[0]:.3f} -> {sum(tail) / len(tail):.3f}")
