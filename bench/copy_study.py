"""Can the tiny model learn to copy the question's colour into its think? A measured study, not a unit test.

    python bench/copy_study.py --context=short       # the question alone, then "<think>The <colour>"
    python bench/copy_study.py --context=system      # the real system prompt (tool schema) first, no video
    python bench/copy_study.py --context=video       # the real prompt: system, a 20-frame global view, question
    python bench/copy_study.py --context=video --short_steps=150   # 150 steps on the short form first
    python bench/copy_study.py --context=video --reading=16 --steps=600  # beside the reading warm-up's batches

The first word the policy must get right is the scene's colour in "<think>The <colour> scene is around ...":
a copy of one token from the question. The loss is on "<think>The <colour>" only; every --eval_every steps it
prints how often the greedy word after "<think>The" is the question's colour on 64 held-out prompts of --context
(chance 0.1). Frames are solid random colours drawn in memory.
"""
import os
import random
import sys
from dataclasses import asdict, dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import needle  # noqa: E402
import warmup  # noqa: E402
from data import Renderer, ViewConfig, collate, model_vision  # noqa: E402
from model import load_model, parse_config  # noqa: E402


@dataclass
class Config:
    context: str = "video"   # short | system | video: what comes before the question (see the docstring)
    short_steps: int = 0     # the first N steps train on the short form whatever --context is (a curriculum)
    reading: int = 0         # also train each step on a batch of this many warmup.reading_example rows (the reading
                             # warm-up's, 1-8 patches; own token mean, added): does the copy form / survive beside it?
    steps: int = 300         # optimizer steps
    batch_size: int = 8
    lr: float = 4e-3
    eval_every: int = 50
    num_eval: int = 64
    seed: int = 0
    threads: int = 1


def example(r, rng, context):
    """(Rendered with the loss on "<think>The <colour>", the colour)."""
    if context == "system":
        c = rng.choice(needle.SCENE_COLOURS)
        q = needle.question(c, rng.random() < needle.NeedleConfig.when_fraction, needle.NeedleConfig())
        return (r.system_turn() + r.text(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n")
                + r.text(f"<think>The {c}", train=1)), c
    if context in ("short", "video"):
        return warmup.copy_example(r, rng, frames=20 if context == "video" else 0)
    raise SystemExit(f"--context must be short, system or video, got {context!r}")


def colour_acc(model, r, cfg, pad):
    rng, hits = random.Random(10_000 + cfg.seed), 0
    model.eval()
    with torch.no_grad():
        for _ in range(cfg.num_eval):
            x, c = example(r, rng, cfg.context)
            b = collate(model, [x], pad)
            vision = model_vision(b["vision"])
            logits = model(input_ids=b["input_ids"], position_ids=b["position_ids"], **vision).logits
            hits += r.tok.decode([logits[0, -2].argmax().item()]).strip() == c
    model.train()
    return hits / cfg.num_eval


def main(argv=None):
    cfg = parse_config(Config, sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(cfg.threads)
    model, proc = load_model("tiny")
    r, rng, pad = Renderer(proc, ViewConfig()), random.Random(cfg.seed), proc.tokenizer.pad_token_id
    print(asdict(cfg), flush=True)
    lines = []

    def draw(step):
        context = "short" if step <= cfg.short_steps else cfg.context
        batch = collate(model, [example(r, rng, context)[0] for _ in range(cfg.batch_size)], pad)
        if not cfg.reading or step <= cfg.short_steps:
            return batch
        rows = [warmup.reading_example(r, rng, rng.randint(1, 8)) for _ in range(cfg.reading)]
        return [collate(model, rows, pad), batch]

    def report(step, loss):
        if step % cfg.eval_every == 0 or step == cfg.steps:
            lines.append(dict(step=step, loss=round(loss, 3), colour_acc=colour_acc(model, r, cfg, pad)))
            print(lines[-1], flush=True)
    warmup.fit(model, draw, cfg.steps, cfg.lr, 10, report)
    return lines


if __name__ == "__main__":
    main()
