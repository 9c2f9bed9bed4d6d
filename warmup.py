"""The warm-ups: short in-memory curricula that teach the tiny model one skill of the needle task each before
SFT (train_sft.py runs them; bench/ studies measure why each exists). Each draws fresh examples from the needle
benchmark's generators (needle.py), so none reads a file.

    reading   an in-memory crop alone -> the answer turn (on by default for the tiny model)
    copy      the question -> "<think>The <its colour>" (off: docs/studies.md, the grounding study)
    grounding a global view -> the scene's crop window, several scenes asked per view (off: same)
    time      bare two-patch views: a colour -> the timestamp written before its frames (off)
"""
import math
import random
from dataclasses import replace

import numpy as np

from data import Rendered, Renderer, batch_to, collate, global_times
from model import COLOURS
from needle import (NEEDLE_COLOURS, SCENE_COLOURS, NeedleConfig, _fmt, crop_window_for, frame_at, make_layout,
                    question, thing, window_question)


def reading_example(renderer, rng, pairs, cfg: NeedleConfig = NeedleConfig(), size=56):
    """An in-memory crop alone, for the reading warm-up: the question (either kind, as often as in the data), then
    `pairs` temporal patches (2 frames each) of one scene at 1-2 s spacing, the needle in 1-2 consecutive frames, in
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
    head = renderer.text(f"<|im_start|>user\n{q}")  # the observation chunk opens with the user turn's <|im_end|>
    return head + renderer.observation(obs) + renderer.assistant(turn, final=True)


def copy_example(renderer, rng, cfg: NeedleConfig = NeedleConfig(), frames=0):
    """A prompt, then "<think>The <its question's colour>" (loss on that): the copy the policy's think starts with.
    frames=0: the question alone (the tiny model learns the copy here in ~150 steps and then uses it in the full
    prompt at once, but not from the full prompt alone: bench/copy_study.py); frames > 0: the real prompt (system,
    instruction, a global view of `frames` solid frames of one random colour drawn in memory, 10 s apart, question),
    which keeps the copy alive when mixed into the reading warm-up and SFT (train_sft --copy_mix). Returns
    (Rendered, colour)."""
    c = rng.choice(SCENE_COLOURS)
    q = question(c, rng.random() < cfg.when_fraction, cfg)
    target = renderer.text(f"<think>The {c}", train=1)
    if not frames:
        return renderer.text(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n") + target, c
    size = int(math.isqrt(renderer.view.max_pixels))
    pixels = np.zeros((frames, size, size, 3), np.uint8) + np.array([rng.randrange(256) for _ in range(3)], np.uint8)
    return renderer.prompt(dict(question=q), pixels, [10.0 * i for i in range(frames)]) + target, c


def scene_queries(renderer, rng, scenes, times, skip, n, offset=0.0):
    """Up to n user turns, each asking where another scene is (one whose colour occurs once in the video and is
    not `skip`), answered with its crop window read off the global view `times` as the SFT think writes it (loss on
    the answers; `offset` shifts the times written). n more grounding targets for the price of one prompt."""
    once = [sc for sc in scenes if sc[2] != skip and sum(c == sc[2] for _, _, c in scenes) == 1]
    parts = []
    for sc in rng.sample(once, min(n, len(once))):
        a, b = crop_window_for(sc, times)
        parts.append(renderer.text(f"<|im_end|>\n<|im_start|>user\nWhere is the {sc[2]} scene?<|im_end|>\n"
                                   f"<|im_start|>assistant\n"))
        parts.append(renderer.text(f"The {sc[2]} scene is around {_fmt(a + offset)}s to {_fmt(b + offset)}s.", train=1))
    return Rendered.join(parts)


def grounding_example(renderer, rng, queries=8, cfg: NeedleConfig = NeedleConfig()):
    """An in-memory layout of the training lengths, for the grounding warm-up: the real prompt (the global view with
    a random frame count between its default and the budget, as train_sft's --view_jitter; either question kind),
    then the SFT think's first sentence (the window read off the view; loss on it) and queries - 1 more scenes
    asked after it (scene_queries). Frames are drawn at the global view's pixel budget."""
    view, size = renderer.view, int(math.isqrt(renderer.view.max_pixels))
    duration = float(round(rng.uniform(cfg.min_duration, cfg.max_duration)))
    scenes, k, nd = make_layout(rng, duration, replace(cfg, size=size))
    lo = len(global_times(duration, view))
    view = replace(view, global_fps=(rng.randint(lo, max(lo, view.global_frames)) + 0.5) / duration)
    times = global_times(duration, view)
    frames = np.stack([frame_at(t, scenes, nd, size) for t in times])
    colour, (a, b) = scenes[k][2], crop_window_for(scenes[k], times)
    r = Renderer(renderer.proc, view)
    sample = dict(question=question(colour, rng.random() < cfg.when_fraction, cfg), video="")
    return (r.prompt(sample, frames, times) + r.text(f"<think>The {colour} scene is around {_fmt(a)}s to {_fmt(b)}s.",
                                                     train=1)
            + scene_queries(r, rng, scenes, times, colour, queries - 1))


def time_example(r, rng, groups, times="random", bare=False, describe=False, cfg: NeedleConfig = NeedleConfig(),
                 prefix=0.0):
    """A global view of `groups` temporal patches (2 frames each) of distinct solid scene colours, their timestamps
    starting anywhere in 0-600 s with gaps of 5-60 s (times="random": only a copy gives a patch's time; "regular":
    0, 10, 20, ... s), a question naming one patch's colour, and the loss on "<think>The <colour> scene is around
    <T>s", T the time written before that patch: the hop from a colour to its timestamp that the SFT think's window
    needs. bare: a bare user turn (Renderer.user: no system prompt or instruction); else the real prompt. describe:
    asked the other way ("What colour is the scene at <T>s?" -> "<think>The scene at <T>s is <colour>"). prefix > 0
    (bare only): with that probability a system turn comes first, holding the real system prompt (half of them) or
    a random-length token prefix of it, so that the binding learned on short bare turns holds behind a long context
    (docs/studies.md, "The instruction first"). Returns (Rendered, index of the colour word's first token; None with
    describe)."""
    cols = rng.sample(SCENE_COLOURS, groups)
    if times == "regular":
        starts = [10.0 * i for i in range(groups)]
    elif times == "random":
        starts = [5.0 * rng.randrange(0, 121)]
        for _ in range(groups - 1):
            starts.append(starts[-1] + 5.0 * rng.randint(1, 12))
    else:
        raise ValueError(f"times must be random or regular, got {times!r}")
    size = int(math.isqrt(r.view.max_pixels))
    frames = np.stack([np.full((size, size, 3), COLOURS[c], np.uint8) for c in cols for _ in range(2)])
    ts = [t + k for t in starts for k in (0.0, 2.5)]
    k = rng.randrange(groups)
    when, at = rng.random() < cfg.when_fraction, _fmt(starts[k])  # `when` drawn either way
    if describe:
        q, think = f"What colour is the scene at {at}s?", f"<think>The scene at {at}s is {cols[k]}"
    else:
        q, think = question(cols[k], when, cfg), f"<think>The {cols[k]} scene is around {at}s"
    head = r.user(q, frames, ts) if bare else r.prompt(dict(question=q), frames, ts)
    if bare and prefix and rng.random() < prefix:  # drawn last: the rest of the draw is the same with or without
        ids = r.text(r.system_text()).input_ids
        ids = ids if rng.random() < 0.5 else ids[:rng.randrange(len(ids))]
        if ids:
            head = (r.text("<|im_start|>system\n") + Rendered(ids, [0] * len(ids), [0] * len(ids), {})
                    + r.text("<|im_end|>\n") + head)
    colour_at = None if describe else len(head.input_ids) + len(r.text("<think>The").input_ids)
    return head + r.text(think, train=1), colour_at


def name_example(r, rng, max_groups=3):
    """A bare user turn asking "What colour is this scene?" over 1..max_groups temporal patches of one solid scene
    colour (timestamps anywhere in 0-600 s), loss on "<think>The scene is <colour>": names a scene's colour from its
    frames, the pixel -> word half of the binding that time_example trains, without any binding (bench/time_copy
    --name_steps)."""
    c, n = rng.choice(SCENE_COLOURS), rng.randint(1, max_groups)
    size = int(math.isqrt(r.view.max_pixels))
    frames = np.stack([np.full((size, size, 3), COLOURS[c], np.uint8)] * (2 * n))
    t0 = 5.0 * rng.randrange(0, 121)
    return r.user("What colour is this scene?", frames, [t0 + 2.5 * i for i in range(2 * n)]) + r.text(
        f"<think>The scene is {c}", train=1)


def fit(model, draw, steps, lr, warmup_steps=10, on_step=None):
    """The one training loop of the reading warm-up and the bench/ studies: `steps` teacher-forced AdamW steps
    (betas 0.9/0.95, no weight decay; linear warm-up over `warmup_steps` steps, then cosine to 10% of lr; grad norm
    clipped at 1) on the batches draw(step) returns (a data.collate batch or a list of them, step from 1). The loss
    is the mean NLL of a batch's policy tokens (train_sft.policy_nll), summed over the list. on_step(step, loss)
    runs after each step. Returns the losses."""
    import torch
    from train_sft import policy_nll  # imported here: train_sft imports this module
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup_steps) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    losses, dev = [], next(model.parameters()).device
    for step in range(1, steps + 1):
        batches = draw(step)
        batches = [batch_to(b, dev) for b in (batches if isinstance(batches, list) else [batches])]
        loss = sum(policy_nll(model, b) / b["policy_mask"][:, 1:].sum() for b in batches)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if on_step:
            on_step(step, losses[-1])
    return losses


def skill_warmup(model, processor, view, steps, example, lr=4e-3, seed=0, batch_size=16, desc="warm-up",
                 mix=None, mix_size=0):
    """fit() on batches of `batch_size` fresh example(renderer, rng) sequences, with a progress bar; with `mix`
    (another example function), each step also trains on a batch of `mix_size` mix(renderer, rng) sequences (its own
    token mean, added: a few short rows keep their weight beside long ones). Deterministic for a seed. Returns the
    losses."""
    from tqdm import tqdm
    r, rng, pad = Renderer(processor, view), random.Random(seed), processor.tokenizer.pad_token_id

    def draw(_):
        main = collate(model, [example(r, rng) for _ in range(batch_size)], pad)
        return [main, collate(model, [mix(r, rng) for _ in range(mix_size)], pad)] if mix and mix_size else main
    with tqdm(total=steps, desc=desc, mininterval=5) as bar:
        return fit(model, draw, steps, lr, on_step=lambda *_: bar.update())


def reading_warmup(model, processor, view, steps, lr=4e-3, seed=0, max_pairs=8, batch_size=16, cfg=NeedleConfig(),
                   copy_mix=0, copy_frames=20):
    """Train the reading skill alone before SFT: reading_example batches of 1..max_pairs temporal patches. The tiny
    model from scratch does not learn to read the needle inside the full SFT context (bench/reading.py); after
    this warm-up the pipeline's policy reads it in part (README results). copy_mix > 0: each step also trains the
    colour copy on that many copy_example rows in the real prompt (`copy_frames` frames): without them the copy is
    not learned, or a copy learned before is lost (docs/studies.md, the grounding study)."""
    size = int(math.isqrt(view.crop_max_pixels))
    return skill_warmup(model, processor, view, steps,
                        lambda r, rng: reading_example(r, rng, rng.randint(1, max_pairs), cfg, size),
                        lr, seed, batch_size, "reading warm-up",
                        lambda r, rng: copy_example(r, rng, cfg, copy_frames)[0], copy_mix)


def copy_warmup(model, processor, view, steps, lr=4e-3, seed=0, batch_size=8, cfg=NeedleConfig()):
    """Teach the copy of the question's colour into the think on short contexts first (copy_example)."""
    return skill_warmup(model, processor, view, steps, lambda r, rng: copy_example(r, rng, cfg)[0],
                        lr, seed + 2, batch_size, "copy warm-up")


def time_warmup(model, processor, view, steps, lr=1e-3, seed=0, groups=2, batch_size=32, cfg=NeedleConfig()):
    """Teach the hop from a colour to its timestamp on bare two-patch views first (time_example): with batch 32 and
    lr 1e-3 the tiny model sits at a coin flip between the two times for ~3,000 steps, then learns it (docs/studies.md,
    the grounding study)."""
    return skill_warmup(model, processor, view, steps,
                        lambda r, rng: time_example(r, rng, groups, bare=True, cfg=cfg)[0],
                        lr, seed + 3, batch_size, "time warm-up")


def grounding_warmup(model, processor, view, steps, lr=4e-3, seed=0, queries=8, batch_size=8, cfg=NeedleConfig()):
    """Train the grounding skill alone before SFT: grounding_example batches, each asking for `queries` scenes'
    windows (bench/grounding.py --queries: denser targets learn the window faster than one per prompt)."""
    return skill_warmup(model, processor, view, steps, lambda r, rng: grounding_example(r, rng, queries, cfg),
                        lr, seed + 1, batch_size, "grounding warm-up")


def run(model, processor, view, cfg, data: NeedleConfig = NeedleConfig(), reading_default=0):
    """The warm-ups train_sft's config `cfg` asks for, in order: time, copy, grounding, reading (its -1 means
    reading_default steps); each logs its loss from the first step to the mean of the last 20. `data`: the config
    the training data was made with (needle.load_config), so the examples are worded and drawn as the data is."""
    from model import print0
    plan = [  # (name, steps, run(steps) -> losses)
        ("time", cfg.time_warmup, lambda n: time_warmup(model, processor, view, n, seed=cfg.seed, cfg=data)),
        ("copy", cfg.copy_warmup, lambda n: copy_warmup(model, processor, view, n, lr=cfg.lr, seed=cfg.seed,
                                                        cfg=data)),
        ("grounding", cfg.grounding_warmup, lambda n: grounding_warmup(
            model, processor, view, n, lr=cfg.lr, seed=cfg.seed, queries=cfg.grounding_queries, cfg=data)),
        ("reading", cfg.reading_warmup if cfg.reading_warmup >= 0 else reading_default, lambda n: reading_warmup(
            model, processor, view, n, lr=cfg.lr, seed=cfg.seed, max_pairs=cfg.reading_max_pairs, cfg=data,
            copy_mix=cfg.copy_mix, copy_frames=cfg.copy_frames))]
    for name, steps, go in plan:
        if steps:
            losses = go(steps)
            tail = losses[-20:]
            print0(f"{name} warm-up: {steps} steps, loss {losses[0]:.3f} -> {sum(tail) / len(tail):.3f}")
