"""Stage 0 of the embedded default: the tiny model's skill warm-up, a checkpoint that SFT starts from.

    python needle_warmup.py                         # tiny model from scratch, data/needle's wording -> runs/warmup
    python train_sft.py --init=runs/warmup          # stage 1 starts from it

The tiny model (1.2M parameters, random init) learns the two skills the needle task needs on fresh in-memory examples
drawn by the benchmark's own generators (needle.py; no file is read but the data's config.json), two steps of the
first per step of the second:
- reading: a crop alone -> the answer turn (docs/studies.md: the tiny model does not learn to read the flash inside
  the full SFT context);
- the copy: whole episodes after a bare question, so the asked window is copied into the call (the SFT rows alone
  are memorised and the copy is not learned from them: docs/screen.md).
A real checkpoint needs none of this: it starts at stage 1.
"""
import math
import os
import random
import sys
from dataclasses import dataclass, replace

import numpy as np
import torch
from tqdm import tqdm

from checkpoint import save_model
from data import Renderer, ViewConfig, batch_to, collate
from model import compute_init, load_model, lr_at, parse_config
from needle import NEEDLE_COLOURS, SCENE_COLOURS, NeedleConfig, frame_at, load_config, window_layout, \
    window_question, window_turns
from tools import parse_tool_calls
from train_sft import policy_nll
from video import crop_times, fmt_time


@dataclass
class Config:
    data: str = "data/needle"   # the needle data dir: its config.json words and draws the examples as the data's
    out: str = "runs/warmup"    # the checkpoint (HF layout + view.json) train_sft.py --init= starts from
    steps: int = 900            # optimizer steps: two of reading (16 crops each), one of the copy (8 episodes)
    lr: float = 4e-3            # peak learning rate (10 warm-up steps, cosine to 10%)
    seed: int = 0               # the tiny model's init and the examples' draws
    threads: int = 1            # torch intra-op threads on CPU


def reading_example(renderer, rng, pairs, cfg: NeedleConfig = NeedleConfig(), size=56):
    """An in-memory crop alone: the question (either phrasing, as often as in the data), then `pairs` temporal patches
    (2 frames each) of one scene at 1-2 s spacing, the needle in 1-2 consecutive frames, in the observation's wording,
    then the answer turn as the SFT data writes it (loss on it). Frames are drawn at `size` px."""
    col, scene = rng.choice(NEEDLE_COLOURS), [(0.0, 1e9, rng.choice(SCENE_COLOURS))]
    side = max(1, int(round(size * cfg.square)))
    t0, step = float(rng.randrange(0, 600)), rng.choice([1.0, 1.5, 2.0])
    times = [t0 + i * step for i in range(2 * pairs)]
    j = rng.randrange(2 * pairs)
    shown = {j, min(j + rng.randrange(2), 2 * pairs - 1)}
    nd = dict(start=-1.0, end=-1.0, colour=col, side=side, x=rng.randrange(size - side + 1),
              y=rng.randrange(size - side + 1))
    on = dict(nd, start=0.0, end=1.0)
    frames = np.stack([frame_at(0.5, scene, on if i in shown else nd, size) for i in range(2 * pairs)])
    obs = dict(frames=frames, timestamps=times, text=f"Frames from {fmt_time(times[0])}s to "
                                                      f"{fmt_time(times[-1] + step)}s.")
    a = int(t0)
    q = window_question(a, a + rng.randint(cfg.window_min, cfg.window_max), rng.random() < cfg.loose_fraction)
    turn = f"<think>The cropped frames show a {col} flash.</think><answer>{col}</answer>"
    head = renderer.mark("<|im_start|>user\n") + renderer.text(q)  # the observation chunk opens with <|im_end|>
    return head + renderer.observation(obs) + renderer.assistant(turn, final=True)


def episode_row(rng, cfg: NeedleConfig = NeedleConfig()):
    """An SFT row drawn like needle.make_sample's, for a video that is never written: (row with `turns` and a training
    duration, scenes, needle)."""
    duration = float(rng.randint(int(cfg.min_duration), int(cfg.max_duration)))
    scenes, (a, b), nd = window_layout(rng, duration, cfg)
    loose = rng.random() < cfg.loose_fraction
    row = dict(question=window_question(a, b, loose), answer=nd["colour"], window=[float(a), float(b)],
               duration=duration)
    return dict(row, turns=window_turns(row, loose, rng, cfg)), scenes, nd


def episode_example(renderer, rng, cfg: NeedleConfig = NeedleConfig(), size=56):
    """A whole SFT episode in memory (episode_row): a bare user turn holding only the question, both assistant turns
    (loss on them) and, between them, the crop of the called window as the tool returns it (frames drawn at the
    times the decoder returns). Fresh windows at every step, so the model learns to copy the asked window into the
    call instead of memorising the training rows' windows."""
    view = renderer.view
    row, scenes, nd = episode_row(rng, cfg)
    turns = row["turns"]
    side = max(1, int(round(size * cfg.square)))
    needle = dict(nd, side=side, x=rng.randrange(size - side + 1), y=rng.randrange(size - side + 1))
    start, end = (float(parse_tool_calls(turns[0])[-1].arguments[k]) for k in ("start_time", "end_time"))
    times = [math.floor((t + 1e-6) * cfg.fps) / cfg.fps  # the last video frame at or before each crop time
             for t in crop_times(start, end, view.crop_fps, view.crop_max_frames, view.crop_min_frames)]
    frames = np.stack([frame_at(t, scenes, needle, size) for t in times])
    obs = dict(frames=frames, timestamps=times, text=f"Frames from {fmt_time(start)}s to {fmt_time(end)}s.")
    head = (renderer.mark("<|im_start|>user\n") + renderer.text(row["question"])
            + renderer.mark("<|im_end|>\n<|im_start|>assistant\n"))
    return (head + renderer.assistant(turns[0], final=False) + renderer.observation(obs)
            + renderer.assistant(turns[1], final=True))


def kinds(view, cfg: NeedleConfig, max_pairs=8):
    """(batch size, example(renderer, rng)) of each step in turn: two steps of crops alone -> the answer turn (16
    each), one of whole episodes after a bare question (8, both phrasings, no lazy skims: that habit comes with the SFT
    rows). Two reading steps per copy step read more of the gate's exact crops right than one (docs/LOG.md)."""
    size = int(math.isqrt(view.crop_max_pixels))
    copy = replace(cfg, lazy_fraction=0.0)
    read = (16, lambda r, rng: reading_example(r, rng, rng.randint(1, max_pairs), cfg, size))
    return [read, read, (8, lambda r, rng: episode_example(r, rng, copy, size))]


def skill_warmup(model, processor, view, steps, examples, lr=4e-3, seed=0):
    """`steps` teacher-forced AdamW steps (betas 0.9/0.95, grad norm clipped at 1, model.lr_at's schedule: 10 warm-up
    steps, cosine to 10%) on fresh batches: step k draws the batch examples[k % len(examples)] describes. The loss is
    the mean NLL of the batch's policy tokens. Deterministic for a seed. Returns the losses."""
    r, rng, pad = Renderer(processor, view), random.Random(seed), processor.tokenizer.pad_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    losses, dev = [], next(model.parameters()).device
    for step in tqdm(range(1, steps + 1), desc="skill warm-up", mininterval=5):
        n, example = examples[step % len(examples)]
        batch = batch_to(collate(model, [example(r, rng) for _ in range(n)], pad), dev)
        for g in opt.param_groups:
            g["lr"] = lr * lr_at(step - 1, steps, 10, 0.1)
        loss = policy_nll(model, batch) / batch["policy_mask"][:, 1:].sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    return losses


def main(argv=None):
    cfg = parse_config(Config, sys.argv[1:] if argv is None else argv)
    if not os.path.isdir(cfg.data):
        raise SystemExit(f"--data={cfg.data}: no such folder (python needle.py --out={cfg.data} writes it)")
    d = compute_init(cfg.seed)  # seeds the tiny model's init
    if d.device.type == "cpu" and cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    model, processor = load_model("tiny", d.device, dtype=torch.float32)
    view = ViewConfig()  # train_sft.py's default view: the warm-up's crops are drawn at its crop budget
    losses = skill_warmup(model, processor, view, cfg.steps, kinds(view, load_config(cfg.data)), cfg.lr, cfg.seed)
    if losses:
        tail = losses[-20:]
        print(f"skill warm-up: {cfg.steps} steps, loss {losses[0]:.3f} -> {sum(tail) / len(tail):.3f}")
    save_model(cfg.out, model, processor, view)
    print(f"wrote {cfg.out}")


if __name__ == "__main__":
    main()
