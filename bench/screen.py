"""Screen candidate SFT schedules of the embedded default (docs/screen.md holds the table and the decision): for
each, how well the tiny model does every step the window task needs, in free generation with the real tool loop
(eval.evaluate, greedy), after the in-memory warm-up alone and after the pipeline's SFT on the data's sft.jsonl.
One row per (candidate, stage):

    acc     accuracy of the episode (the colour)
    format  the format reward's mean
    copy    the first call's window is exactly the asked one, on the strict questions ("What colour flashes
            between A s and B s?")
    copy_l  the same on the loose questions ("A flash appears. What colour is it between A s and B s?"), whose SFT rows skim
            [0, B] 70% of the time (needle.py)
    skim_l  loose questions whose first call is the skim [0, B]
    read    accuracy among episodes whose first call is the asked window (the crop shows the flash)

    .venv/bin/python needle.py --out=/tmp/pd
    OMP_NUM_THREADS=1 .venv/bin/python bench/screen.py --data=/tmp/pd --out=/tmp/screen --only=alt-800
    OMP_NUM_THREADS=1 .venv/bin/python bench/screen.py --data=/tmp/pd --out=/tmp/screen --only=alt-800-sft3 \
        --warm=/tmp/screen/alt-800/warm              # another SFT schedule from the same warm-up checkpoint
    .venv/bin/python bench/screen.py --out=/tmp/screen --table=true     # the table of the rows written so far

Candidates run one per process (--only; two side by side on 2 cores); rows are appended to <out>/screen.jsonl.
"""
import json
import os
import sys
import time
from dataclasses import dataclass, fields, replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import eval as evaluation  # noqa: E402
import needle  # noqa: E402
import train_sft  # noqa: E402
import warmup  # noqa: E402
from data import ViewConfig, save_view, view_from  # noqa: E402
from model import load_model, parse_config, save_checkpoint  # noqa: E402
from readers import load_samples  # noqa: E402

VIEW_FLAGS = {f.name for f in fields(ViewConfig)}



def reading(r, rng, c):
    return warmup.reading_example(r, rng, rng.randint(1, 8), c)


def episode(prompt):
    return lambda r, rng, c: warmup.episode_example(r, rng, c, prompt=prompt(rng))


BARE, FULL, HALF = episode(lambda rng: False), episode(lambda rng: True), episode(lambda rng: rng.random() < 0.5)


def BARE_COPY(r, rng, c):  # bare episodes that crop the asked window for both phrasings (no lazy skim)
    return warmup.episode_example(r, rng, replace(c, lazy_fraction=0.0))


# name -> (warm-up steps, [(batch size, example(renderer, rng, data config)) per step, cycled], train_sft flags)
CANDIDATES = {
    "reading-600": (600, [(16, reading)], []),        # the first window-task pipeline run: crops alone -> answer
    "episode-300": (300, [(8, BARE)], []),            # whole episodes after a bare question
    "episode-600": (600, [(8, BARE)], []),
    "full-300": (300, [(8, FULL)], ["--epochs=1"]),   # ... in the full prompt (system turn, jittered global view)
    "mixed-400": (400, [(8, HALF)], ["--epochs=1"]),  # ... half and half
    "alt-800": (800, [(16, reading), (8, BARE)], []),  # reading and bare episodes on alternate steps
    "alt-800-sft3": (800, [(16, reading), (8, BARE)], ["--epochs=3"]),
    "alt-1000-copy": (1000, [(16, reading), (8, BARE_COPY)], []),  # the episodes copy for both phrasings
    "alt-1000-copy-nots": (1000, [(16, reading), (8, BARE_COPY)], ["--timestamps=false"]),  # ... no timestamps
    # SFT on 768 rows for 2 epochs (data: needle.py --num_train=768; --needle_seconds=3 for -n3), from alt-1000-copy
    "copy-sft768": (1000, [(16, reading), (8, BARE_COPY)], ["--epochs=2"]),
    "copy-sft768-n3": (1000, [(16, reading), (8, BARE_COPY)], ["--epochs=2"]),
}


@dataclass
class Config:
    data: str = "data/needle"   # needle data dir: sft.jsonl for SFT, eval_short.jsonl for the measures
    out: str = "runs/screen"
    only: str = ""              # the candidate to run (see CANDIDATES)
    measure: str = ""           # only measure this checkpoint (e.g. a pipeline's SFT) as a row named --only
    n: int = 64                 # eval_short samples measured
    sft: bool = True            # also run the pipeline's SFT after the warm-up and measure it
    warm: str = ""              # start SFT from this warm-up checkpoint (another candidate's) instead of warming up
    table: bool = False         # print the table of <out>/screen.jsonl and exit


def measures(preds):
    def first(p):
        return p["tool_calls"][0]["window"] if p.get("tool_calls") else None
    strict = [p for p in preds if p["question"].startswith("What colour")]
    loose = [p for p in preds if not p["question"].startswith("What colour")]
    exact = [p for p in preds if first(p) == p["window"]]

    def frac(xs, f):
        return round(sum(map(f, xs)) / len(xs), 3) if xs else None
    return dict(acc=frac(preds, lambda p: p["score"]), format=frac(preds, lambda p: p["components"]["format"]),
                copy=frac(strict, lambda p: first(p) == p["window"]),
                copy_l=frac(loose, lambda p: first(p) == p["window"]),
                skim_l=frac(loose, lambda p: first(p) == [0.0, p["window"][1]]),
                read=frac(exact, lambda p: p["score"]), n=len(preds))


def measure(model_dir, samples, view):
    model, processor = load_model(model_dir)
    summary, preds = evaluation.evaluate(model, processor, samples, cfg=dict(max_new_tokens=128), view=view)
    with open(os.path.join(model_dir, "screen_predictions.jsonl"), "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in preds)
    return measures(preds)


def table(path):
    rows = [json.loads(line) for line in open(path)]
    cols = ["candidate", "stage", "acc", "format", "copy", "copy_l", "skim_l", "read", "n", "seconds"]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(str(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def main(argv=None):
    cfg = parse_config(Config, sys.argv[1:] if argv is None else argv)
    path = os.path.join(cfg.out, "screen.jsonl")
    if cfg.table:
        print(table(path))
        return
    if cfg.only not in CANDIDATES and not cfg.measure:
        raise SystemExit(f"--only must be one of {sorted(CANDIDATES)}, got {cfg.only!r}")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    steps, kinds_of, flags = CANDIDATES.get(cfg.only, (0, [], []))
    view = view_from(parse_config(train_sft.Config, [f for f in flags if f.split("=")[0][2:] in VIEW_FLAGS]))
    samples = load_samples(os.path.join(cfg.data, "eval_short.jsonl"))[:cfg.n]
    os.makedirs(cfg.out, exist_ok=True)

    def log(stage, t0, model_dir, **extra):
        row = dict(candidate=cfg.only, stage=stage, **measure(model_dir, samples, view),
                   seconds=round(time.time() - t0), **extra)
        print(row, flush=True)
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")

    t0, warm = time.time(), cfg.warm or os.path.join(cfg.out, cfg.only, "warm")
    if cfg.measure:
        return log("measured", t0, cfg.measure)
    if not cfg.warm:
        model, processor = load_model("tiny")
        data = needle.load_config(cfg.data)
        kinds = [(n, lambda r, rng, f=f: f(r, rng, data)) for n, f in kinds_of]
        losses = warmup.skill_warmup(model, processor, view, steps, kinds, train_sft.policy_nll, desc=cfg.only)
        save_checkpoint(model, processor, warm)
        save_view(view, warm)
        log("warm-up", t0, warm, loss=round(sum(losses[-20:]) / len(losses[-20:]), 4))
    if cfg.sft:
        t1 = time.time()
        sft = os.path.join(cfg.out, cfg.only, "sft")
        train_sft.main([f"--init={warm}", f"--data={os.path.join(cfg.data, 'sft.jsonl')}", f"--out={sft}",
                        "--skill_warmup=0", *flags])
        log("sft", t1, sft)


if __name__ == "__main__":
    main()
