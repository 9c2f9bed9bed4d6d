"""Can the tiny model read LONG crops? A measured study, not a unit test.

    python bench/long_read.py                          # reading warm-up (1-8 patches), then 300 steps growing to 48
    python bench/long_read.py --steps=0 --time_after   # the warm-up alone, timestamps after their frames

The reading warm-up (warmup.reading_warmup, as train_sft runs it) trains the answer turn after a crop of 1-8
temporal patches. A policy that looked through a long video in a few large crops (e.g. 180 s at about 0.5 fps: 48
patches each) would need to read crops six times longer. This trains the warm-up, then --steps more steps of
warmup.reading_example crops whose patch count is drawn from 1..P, P growing linearly from --start to --top over
--grow steps (then P stays --top), and prints, every --eval_every steps, on --num_eval held-out crops of each
--eval_pairs patch count, the teacher-forced accuracy of the needle's colour word in the think (colour) and of the
whole "at about <T>s" (time: the flash's timestamp read off the crop).
"""
import os
import random
import sys
import time
from dataclasses import asdict, dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import warmup  # noqa: E402
from data import Renderer, ViewConfig, collate, model_vision  # noqa: E402
from model import load_model, parse_config  # noqa: E402
from needle import NEEDLE_COLOURS  # noqa: E402


@dataclass
class Config:
    warmup_steps: int = 600  # reading warm-up steps first (train_sft's default for the tiny model; 0: none)
    steps: int = 300         # then this many steps on crops of 1..P patches
    start: int = 8           # P at the first of those steps ...
    top: int = 48            # ... growing linearly to this
    grow: int = 200          # over this many steps
    batch_size: int = 16
    lr: float = 2e-3
    time_after: bool = False  # timestamps after their frames (data.ViewConfig.time_after)
    eval_pairs: str = "8,24,48"
    eval_every: int = 100
    num_eval: int = 48
    init: str = "tiny"
    seed: int = 0
    threads: int = 1


def accuracy(model, r, pairs, n, seed):
    """(colour, time) accuracies, teacher-forced, on n held-out reading_example crops of `pairs` patches."""
    tok, pad = r.tok, r.tok.pad_token_id
    colours = set(tok.convert_tokens_to_ids([" " + c for c in NEEDLE_COLOURS]))
    about, rng, colour, when = tok(" about").input_ids, random.Random(seed), 0, 0
    model.eval()
    with torch.no_grad():
        for _ in range(n):
            x = warmup.reading_example(r, rng, pairs)
            b = collate(model, [x], pad)
            pred = model(input_ids=b["input_ids"], position_ids=b["position_ids"],
                         **model_vision(b["vision"])).logits[0].argmax(-1).tolist()
            ids, p0 = x.input_ids, x.policy_mask.index(1)
            right = [False] + [pred[i - 1] == ids[i] for i in range(1, len(ids))]
            c = next(i for i in range(p0, len(ids)) if ids[i] in colours)
            a = next(i for i in range(p0, len(ids)) if ids[i:i + len(about)] == about) + len(about)
            e = next(i for i in range(a, len(ids)) if tok.decode([ids[i]]) == "s")  # "<T>s": the unit ends it
            colour += right[c]
            when += all(right[a:e + 1])
    model.train()
    return colour / n, when / n


def main(argv=None):
    cfg = parse_config(Config, sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(cfg.threads)
    model, proc = load_model(cfg.init, dtype=torch.float32)
    view = ViewConfig(time_after=cfg.time_after)
    r, pad, t0 = Renderer(proc, view), proc.tokenizer.pad_token_id, time.time()
    pairs = [int(p) for p in cfg.eval_pairs.split(",")]
    print(asdict(cfg), flush=True)
    lines = []

    def report(step, loss=None):
        line = dict(step=step, loss=loss and round(loss, 3), seconds=round(time.time() - t0))
        for p in pairs:
            line[f"colour{p}"], line[f"time{p}"] = accuracy(model, r, p, cfg.num_eval, 10_000 + p)
        lines.append(line)
        print(line, flush=True)
    if cfg.warmup_steps:
        warmup.reading_warmup(model, proc, view, cfg.warmup_steps, seed=cfg.seed)
    report(0)
    rng = random.Random(cfg.seed + 5)

    def draw(step):
        top = max(1, cfg.start + (cfg.top - cfg.start) * min(step, cfg.grow) // max(cfg.grow, 1))
        return collate(model, [warmup.reading_example(r, rng, rng.randint(1, top)) for _ in range(cfg.batch_size)], pad)
    if cfg.steps:
        warmup.fit(model, draw, cfg.steps, cfg.lr, 10,
                   lambda step, loss: report(step, loss) if step % cfg.eval_every == 0 or step == cfg.steps else None)
    return lines


if __name__ == "__main__":
    main()
