"""The reading warm-up train_sft runs before SFT on the needle data with the tiny model: an in-memory curriculum of
crops alone -> the answer turn (docs/studies.md, the reading study: the tiny model does not learn to read the flash
from scratch inside the full SFT context). Its examples come from the needle benchmark's generators (needle.py), so
it reads no file."""
import math
import random

import numpy as np

from data import Renderer, batch_to, collate
from needle import NEEDLE_COLOURS, SCENE_COLOURS, NeedleConfig, _fmt, frame_at, question, thing, window_question


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


def fit(model, draw, steps, lr, warmup_steps=10, on_step=None):
    """The training loop of the reading warm-up: `steps` teacher-forced AdamW steps (betas 0.9/0.95, no weight
    decay; linear warm-up over `warmup_steps` steps, then cosine to 10% of lr; grad norm clipped at 1) on the
    data.collate batch draw(step) returns (step from 1). The loss is the mean NLL of the batch's policy tokens
    (train_sft.policy_nll). on_step(step, loss) runs after each step. Returns the losses."""
    import torch
    from train_sft import policy_nll  # imported here: train_sft imports this module
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup_steps) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    losses, dev = [], next(model.parameters()).device
    for step in range(1, steps + 1):
        batch = batch_to(draw(step), dev)
        loss = policy_nll(model, batch) / batch["policy_mask"][:, 1:].sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if on_step:
            on_step(step, losses[-1])
    return losses


def skill_warmup(model, processor, view, steps, example, lr=4e-3, seed=0, batch_size=16, desc="warm-up"):
    """fit() on batches of `batch_size` fresh example(renderer, rng) sequences, with a progress bar. Deterministic
    for a seed. Returns the losses."""
    from tqdm import tqdm
    r, rng, pad = Renderer(processor, view), random.Random(seed), processor.tokenizer.pad_token_id

    def draw(_):
        return collate(model, [example(r, rng) for _ in range(batch_size)], pad)
    with tqdm(total=steps, desc=desc, mininterval=5) as bar:
        return fit(model, draw, steps, lr, on_step=lambda *_: bar.update())


def reading_warmup(model, processor, view, steps, lr=4e-3, seed=0, max_pairs=8, batch_size=16, cfg=NeedleConfig()):
    """Train the reading skill alone before SFT: reading_example batches of 1..max_pairs temporal patches. The tiny
    model from scratch does not learn to read the needle inside the full SFT context (docs/studies.md, the reading
    study); after this warm-up it reads it in context."""
    size = int(math.isqrt(view.crop_max_pixels))
    return skill_warmup(model, processor, view, steps,
                        lambda r, rng: reading_example(r, rng, rng.randint(1, max_pairs), cfg, size),
                        lr, seed, batch_size, "reading warm-up")


def run(model, processor, view, cfg, data: NeedleConfig = NeedleConfig(), reading_default=0):
    """The reading warm-up train_sft's config `cfg` asks for (its -1 means reading_default steps), logging its loss
    from the first step to the mean of the last 20. `data`: the config the training data was made with
    (needle.load_config), so the examples are worded and drawn as the data is."""
    from model import print0
    steps = cfg.reading_warmup if cfg.reading_warmup >= 0 else reading_default
    if steps:
        losses = reading_warmup(model, processor, view, steps, lr=cfg.lr, seed=cfg.seed,
                                max_pairs=cfg.reading_max_pairs, cfg=data)
        tail = losses[-20:]
        print0(f"reading warm-up: {steps} steps, loss {losses[0]:.3f} -> {sum(tail) / len(tail):.3f}")
