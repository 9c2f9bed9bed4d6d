"""Can the tiny model learn to COPY a scene's timestamp off the global view? A measured study, not a unit test.

    python bench/time_copy.py                                   # the real prompt, 8 scenes, from scratch
    python bench/time_copy.py --short_steps=300 --short_groups=2   # 300 steps on 2-scene user turns first
    python bench/time_copy.py --times=regular                   # times one per 10 s from 0 (positions suffice)
    python bench/time_copy.py --number_digits=4                 # every timestamp one token
    python bench/time_copy.py --describe=8                      # + 8 views asked "What colour is the scene at <T>s?"
    python bench/time_copy.py --name_steps=300 --ask_first      # first 300 steps naming scene colours (no binding)
    python bench/time_copy.py --groups=2 --short_steps=2500 --steps=2500 --ask_first --save=/tmp/bound
    python bench/time_copy.py --init=/tmp/bound --groups=2 --short_steps=300 --steps=300 --prefix=1 \
        --ask_first --instruction_first        # then behind random-length system prefixes, in the moved layout

The SFT think starts "<think>The <colour> scene is around <T>s": T is the timestamp written before the scene's frames
in the prompt. bench/grounding.py found that the model computes T from the frames' positions instead of copying
it (times shown 600 s later -> IoU 0). Here every view is --groups temporal patches (2 frames each) of distinct
solid scene colours, and with --times=random their timestamps start anywhere in 0-600 s with gaps of 5-60 s, so
only a copy gives T (warmup.time_example draws them; train_sft --time_warmup trains on its bare form). The loss is
on "<think>The <colour> scene is around <T>s" after the question (either kind, as in the data). Every --eval_every
steps it prints, on --num_eval held-out views of --groups patches in the real prompt: colour_acc (the colour word
right, teacher-forced) and time_acc (every token of "<colour> scene is around <T>s" right, teacher-forced: the copy
done); with a curriculum, the same on its own form (short_*). A curriculum: the first --short_steps steps use views
of --short_groups patches in a bare user turn (no system prompt, no instruction), which is how bench/copy_study.py
got the colour copy to form. --prefix=p: that fraction of the bare views come behind a system turn (the real system
prompt or a random-length token prefix of it, warmup.time_example); then sys_time_acc is also printed: bare views
behind the whole real system turn. --init / --save: start from / write a checkpoint dir.
"""
import os
import random
import sys
from dataclasses import asdict, dataclass, field

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import needle  # noqa: E402
import warmup  # noqa: E402
from data import Renderer, ViewConfig, collate, model_vision  # noqa: E402
from model import TinyConfig, load_model, parse_config  # noqa: E402


@dataclass
class Config:
    groups: int = 8          # temporal patches (scenes) per view, <= 10 (one colour each)
    times: str = "random"    # random | regular (one patch per 10 s from 0: positions give T)
    short_steps: int = 0     # curriculum: the first N steps use --short_groups patches in a bare user turn
    short_groups: int = 2
    number_digits: int = 1   # model.NUMBER_DIGITS: longest number that is one token (4: every time one token)
    ask_first: bool = False  # the question also before the view (data.ViewConfig.ask_first)
    instruction_first: bool = False  # the real prompt's instruction before the view (data.ViewConfig)
    time_after: bool = False  # each timestamp after its frames (data.ViewConfig.time_after)
    prefix: float = 0.0      # fraction of bare views behind a (random-length prefix of the) system turn
    init: str = "tiny"       # model to start from: tiny or a checkpoint dir
    tiny: dict = field(default_factory=dict)  # the tiny model's shape, model.TinyConfig fields: '{"heads":8}'
    save: str = ""           # write the trained model here (a checkpoint dir)
    describe: int = 0        # also train each step on this many views asked the other way round ("What colour is
                             # the scene at <T>s?" -> "<think>The scene at <T>s is <colour>"; own token mean, added)
    name_steps: int = 0      # before the steps: this many steps (batch 16, lr 4e-3) of warmup.name_example, naming a
                             # scene's colour from its frames (then the steps as configured)
    steps: int = 600         # optimizer steps
    batch_size: int = 8
    lr: float = 4e-3
    eval_every: int = 100
    num_eval: int = 64
    seed: int = 0
    threads: int = 1


def accuracy(model, r, cfg, pad, groups, bare=False, system=False):
    """(colour_acc, time_acc) on cfg.num_eval held-out views of `groups` patches (in the real prompt, or a bare user
    turn, behind the whole real system turn with `system`), teacher-forced."""
    rng, colour, time = random.Random(10_000 + cfg.seed), 0, 0
    head = r.system_turn() if system else None
    model.eval()
    with torch.no_grad():
        for _ in range(cfg.num_eval):
            x, at = warmup.time_example(r, rng, groups, cfg.times, bare)
            if head:
                x, at = head + x, at + len(head.input_ids)
            b = collate(model, [x], pad)
            vision = model_vision(b["vision"])
            logits = model(input_ids=b["input_ids"], position_ids=b["position_ids"], **vision).logits[0]
            right = logits[at - 1:-1].argmax(-1) == b["input_ids"][0, at:]  # the colour word onwards
            colour += bool(right[0])
            time += bool(right.all())
    model.train()
    return colour / cfg.num_eval, time / cfg.num_eval


def main(argv=None):
    cfg = parse_config(Config, sys.argv[1:] if argv is None else argv)
    if cfg.times not in ("random", "regular"):
        raise SystemExit(f"--times must be random or regular, got {cfg.times!r}")
    assert 1 <= cfg.groups <= len(needle.SCENE_COLOURS) and 1 <= cfg.short_groups <= len(needle.SCENE_COLOURS)
    torch.set_num_threads(cfg.threads)
    import model as M
    M.NUMBER_DIGITS = cfg.number_digits
    model, proc = load_model(cfg.init, dtype=torch.float32, tiny=TinyConfig(**cfg.tiny))
    r = Renderer(proc, ViewConfig(ask_first=cfg.ask_first, instruction_first=cfg.instruction_first,
                                   time_after=cfg.time_after))
    rng = random.Random(cfg.seed)
    pad = proc.tokenizer.pad_token_id
    print(asdict(cfg), flush=True)
    lines = []

    if cfg.name_steps:
        losses = warmup.skill_warmup(model, proc, r.view, cfg.name_steps, warmup.name_example, lr=4e-3,
                                     seed=cfg.seed + 3, batch_size=16, desc="naming")
        print(dict(name_steps=cfg.name_steps, name_loss=round(sum(losses[-20:]) / len(losses[-20:]), 4)), flush=True)

    def draw(step):
        short = step <= cfg.short_steps
        g = cfg.short_groups if short else cfg.groups
        rows = lambda n, describe: [warmup.time_example(r, rng, g, cfg.times, short, describe,  # noqa: E731
                                                        prefix=cfg.prefix if short else 0.0)[0] for _ in range(n)]
        batch = collate(model, rows(cfg.batch_size, False), pad)
        return [batch, collate(model, rows(cfg.describe, True), pad)] if cfg.describe else batch

    def report(step, loss):
        if step % cfg.eval_every == 0 or step == cfg.steps:
            colour, time = accuracy(model, r, cfg, pad, cfg.groups)
            lines.append(dict(step=step, loss=round(loss, 3), colour_acc=colour, time_acc=time))
            if cfg.short_steps:  # and on the curriculum's own form
                lines[-1]["short_colour_acc"], lines[-1]["short_time_acc"] = accuracy(
                    model, r, cfg, pad, cfg.short_groups, bare=True)
            if cfg.prefix:
                lines[-1]["sys_time_acc"] = accuracy(model, r, cfg, pad, cfg.short_groups, bare=True, system=True)[1]
            print(lines[-1], flush=True)
    warmup.fit(model, draw, cfg.steps, cfg.lr, 10, report)
    if cfg.save:
        from model import save_checkpoint
        save_checkpoint(model, proc, cfg.save)
    return lines


if __name__ == "__main__":
    main()
