"""Evaluate a checkpoint with the training tool loop: metrics, predictions, an HTML trajectory report, RFT export.

    python eval.py                                   # the newest of runs/rft, runs/grpo, runs/sft, else tiny
    python eval.py --model=runs/grpo --data=data/needle/eval.jsonl --out=runs/grpo/eval
    python eval.py --model=Qwen/Qwen2.5-VL-7B-Instruct --data=videosiah_eval.jsonl --visual_format=images \\
        --timestamps=false --protocol=longvt_eval --time_grid=0 --global_frames=512 --global_fps=1 \\
        --max_pixels=50176 --crop_max_frames=128 --crop_max_pixels=50176  # LongVT's own strings and checks
    python eval.py --tools=false                                     # the no-tool baseline (global view only)
    python eval.py --samples=4 --temperature=0.7                     # pass@4 (and mean@4 as `accuracy`)
    python eval.py --export_rft=data/rft.jsonl                       # correct, well-grounded traces -> SFT rows
    torchrun --nproc_per_node=8 eval.py --model=runs/grpo            # rank-strided, gathered on rank 0

Samples go through rollout.rollout (greedy by default) and reward.reward_batch, `batch_size` per call; --out gets
predictions.jsonl, summary.json and report.html. A sample whose video is missing or corrupt is skipped and named (left
out of the accuracy, unlike LongVT). The RFT export (stage 3's data) keeps trajectories of accuracy 1 whose last crop
has IoU >= rft_min_iou, as SFT rows that data.render_sft re-renders to exactly the policy's token ids. A killed
eval, rerun with the same flags, keeps the samples it finished (<out>/partial_rank*.jsonl) and runs the others.
"""
import dataclasses
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass

import torch.distributed as dist
from tqdm import tqdm

from data import Renderer, ViewConfig, follow_layout, render_sft, view_from
from checkpoint import check_writable, complete_lines, replaced, write_jsonl, write_text
from model import compute_init, given_keys, load_model, parse_config, print0, resolve_checkpoint
from readers import load_samples
from reward import RewardConfig, config_judge, iou_reward, reward_batch
from rollout import RolloutConfig, Trajectory, check_budget, prepare, rollout
from video import VideoError

RUN_DIRS = ("runs/rft", "runs/grpo", "runs/sft")


@dataclass
class Config(ViewConfig):  # ViewConfig's fields are flags too (the view: data.py)
    model: str = ""                 # HF id, checkpoint dir or "tiny"; "" = the newest of runs/{rft,grpo,sft}, else tiny
    data: str = "data/needle/eval.jsonl"  # eval file (our JSONL, VideoSIAH-Eval, Video-MME, LVBench rows)
    out: str = ""                   # output dir; "" = <model dir>/eval, or runs/eval_<name> for tiny / an HF id
    limit: int = 0                  # evaluate the first `limit` samples only (0 = all)
    skip_bad_rows: bool = False     # a bad row: skip it with a warning naming file:line instead of stopping there
    batch_size: int = 8             # samples per rollout call (each gives `samples` rows)
    samples: int = 1                # trajectories per sample: k of pass@k (needs temperature > 0 to differ)
    temperature: float = 0.0        # 0 = greedy
    top_p: float = RolloutConfig.top_p              # nucleus sampling when temperature > 0
    max_turns: int = RolloutConfig.max_turns        # tool calls per episode, then one answer turn
    max_new_tokens: int = RolloutConfig.max_new_tokens      # tokens per assistant turn
    max_total_tokens: int = RolloutConfig.max_total_tokens  # tokens per trajectory, prompt included
    seed: int = 0                   # sampling seed (with the sample's index and draw, seeds each row's generator)
    max_rows: int = 0               # rows (batch_size x samples) holding KV at once (0 = all); --dry_run names one
    prefill_chunk: int = RolloutConfig.prefill_chunk  # query tokens per forward when prompts/observations enter the cache
    accuracy: str = "auto"          # reward.RewardConfig.accuracy: rule | judge | both | auto (judge if configured)
    iou_mode: str = "last"          # IoU of the "last" or the "best" crop window (mean_iou)
    export_rft: str = ""            # write correct, well-grounded trajectories to this SFT JSONL file
    rft_min_iou: float = 0.3        # RFT filter: IoU of the last crop with the ground-truth window (0 = off; needed
                                    # to export samples without a window, e.g. VideoSIAH-Eval)
    report_samples: int = 20        # trajectories shown in report.html (0 = no report)
    dry_run: bool = False           # print what the run needs per GPU (memory.py) from the model's config, then stop
    gpus: int = 0                   # --dry_run: GPUs the run is for (0 = this launch's world size)
    gpu_memory_gib: float = 80.0    # --dry_run: memory of one GPU
    save_trajectories: bool = False  # also write trajectories.jsonl: token ids, policy mask, log-probs per turn


def rollout_config(cfg: Config) -> RolloutConfig:
    return RolloutConfig(max_turns=cfg.max_turns, max_new_tokens=cfg.max_new_tokens,
                         max_total_tokens=cfg.max_total_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                         seed=cfg.seed, max_rows=cfg.max_rows, prefill_chunk=cfg.prefill_chunk, keep_vision=False)


# --------------------------------------------------------------------------- predictions and metrics
LENGTH_BUCKETS = [(300, "<5min"), (600, "5-10min"), (1200, "10-20min"), (math.inf, ">20min")]


def length_bucket(seconds):
    return next(name for limit, name in LENGTH_BUCKETS if seconds < limit)


def prediction(index, draw, traj, comp):
    """One JSON-able line of predictions.jsonl. comp: reward components, None for a skipped sample."""
    s = traj.sample
    p = dict(index=index, draw=draw, id=s.get("id"), video=s.get("video"), question=s.get("question"),
             choices=s.get("choices"), reference=s.get("answer"), window=s.get("window"), duration=s.get("duration"),
             stop_reason=traj.stop_reason, error=traj.error, latency=round(traj.seconds, 4))
    if comp is None:
        return p
    p.update(answer=comp["answer"], score=comp["accuracy"], reward=comp["total"],
             components={k: comp[k] for k in ("accuracy", "format", "iou", "rule", "judge", "judge_used",
                                              "judge_failures", "answer_too_long")},
             tool_calls=[dict(window=c["window"], error=c["error"], raw=c["raw"]) for c in traj.tool_calls],
             turns=list(traj.turns_text), tokens=sum(traj.policy_mask), total_tokens=len(traj.input_ids),
             prompt_tokens=traj.prompt_len)
    return p


def summarize(predictions, wall_seconds):
    """Metrics over the scored trajectories (skipped samples are counted and named, not scored)."""
    n = len({p["index"] for p in predictions})
    skipped = sorted({p["id"] for p in predictions if p["stop_reason"] == "skipped"})
    ok = [p for p in predictions if p["stop_reason"] != "skipped"]
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    calls = [c for p in ok for c in p["tool_calls"]]
    windowed = [p for p in ok if p["window"] is not None]
    by_len = {}
    for p in ok:
        by_len.setdefault(length_bucket(p["duration"]), []).append(p["score"])
    groups = {}
    for p in ok:
        groups.setdefault(p["index"], []).append(p["score"])
    stops = {}
    for p in predictions:
        stops[p["stop_reason"]] = stops.get(p["stop_reason"], 0) + 1
    k = max((p["draw"] for p in predictions), default=0) + 1
    out = dict(n=n, trajectories=len(predictions), scored=len(ok), accuracy=mean([p["score"] for p in ok]),
               format_rate=mean([p["components"]["format"] for p in ok]),
               mean_iou=mean([p["components"]["iou"] for p in windowed]), iou_samples=len(windowed),
               tool_calls_per_episode=mean([len(p["tool_calls"]) for p in ok]),
               tool_error_rate=mean([float(c["error"] is not None) for c in calls]) if calls else 0.0,
               judge_failures=sum(p["components"]["judge_failures"] for p in ok),
               answer_rate=mean([float(p["answer"] is not None) for p in ok]),
               mean_tokens=mean([p["tokens"] for p in ok]), mean_total_tokens=mean([p["total_tokens"] for p in ok]),
               seconds_per_sample=wall_seconds / max(n, 1), skipped=len(skipped), skipped_names=skipped,
               stop_reasons=stops,  # first_turn_length: stopped on `length` in the first turn (turn or episode budget)
               first_turn_length=sum(p["stop_reason"] == "length" and not p["tool_calls"] for p in ok),
               accuracy_by_length={name: dict(n=len(by_len[name]), accuracy=mean(by_len[name]))
                                   for _, name in LENGTH_BUCKETS if name in by_len})
    if k > 1:
        out[f"pass@{k}"] = mean([float(max(g) >= 1.0) for g in groups.values()])
    return out


# --------------------------------------------------------------------------- a killed eval goes on where it stopped
def partial_files(out):
    """{rank: path} of the partial_rank<r>.jsonl files in `out`."""
    found = (re.fullmatch(r"partial_rank(\d+)\.jsonl", n) for n in (os.listdir(out) if os.path.isdir(out) else []))
    return {int(m.group(1)): os.path.join(out, m.group(0)) for m in found if m}


def load_partial(out, fingerprint):
    """{(index, draw): (prediction, trajectory or None)} that earlier runs with the same settings appended to
    <out>/partial_rank*.jsonl (any world size); files of other settings and a line cut by a kill are left out."""
    found = {}
    for path in partial_files(out).values():
        lines = complete_lines(path)
        for line in lines[1:] if lines and lines[0] == fingerprint else []:
            p, t = json.loads(line)
            found[(p["index"], p["draw"])] = (p, t and Trajectory(**t))
    return found


def start_partial(out, fingerprint, rank, world, kept):
    """This rank's file, begun afresh (atomically) with the fingerprint line and, on rank 0, the kept results."""
    path = os.path.join(out, f"partial_rank{rank}.jsonl")
    with replaced(path) as tmp, open(tmp, "w") as f:
        f.write(fingerprint + "\n" + "".join(partial_line(p, t) for p, t in kept))
    for r, old in partial_files(out).items() if rank == 0 else []:
        if r >= world:  # an earlier run's larger world: its results are in `kept`
            os.remove(old)
    return open(path, "a")


def partial_line(p, t):
    return json.dumps([p, t and dataclasses.asdict(t)], default=str) + "\n"


# --------------------------------------------------------------------------- the evaluation loop
def evaluate(model, processor, samples, cfg=None, view=None, reward_cfg=None, judge=None, distributed=False,
             return_trajectories=False, decoded=None, partial=""):
    """Roll out and score `samples`: (summary, predictions in sample order[, trajectories without vision tensors]).
    cfg: a Config or a dict of its fields; view / reward_cfg / judge override what it implies.
    distributed: every rank calls this, samples rank-strided and gathered on rank 0 (else one process does all).
    decoded: global views the caller decoded already (rollout.prepare's `done`). partial: a dir where each rank
    appends its results batch by batch; a rerun with the same settings keeps them and runs only the rest."""
    cfg = cfg if isinstance(cfg, Config) else Config(**(cfg or {}))
    ddp = distributed and dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    view = view or view_from(cfg)
    rew = reward_cfg or RewardConfig(accuracy=cfg.accuracy, iou_mode=cfg.iou_mode)
    t0 = time.time()
    results, log, done = [], None, set()  # (prediction, light trajectory); samples a killed run finished
    if partial:
        fingerprint = json.dumps(dict(asdict(cfg), view=asdict(view), n=len(samples), keep=return_trajectories,
                                      out=None, report_samples=None), sort_keys=True, default=str)
        found = load_partial(partial, fingerprint)
        done = {i for i in range(len(samples)) if all((i, k) in found for k in range(cfg.samples))}
        results = [found[(i, k)] for i in sorted(done) for k in range(cfg.samples)] if rank == 0 else []
        if ddp:
            dist.barrier()  # every rank has read before any rewrites
        log = start_partial(partial, fingerprint, rank, world, results)
        if done and rank == 0:
            print(f"resuming: {len(done)} of {len(samples)} samples evaluated before, kept ({partial})", flush=True)
    mine = [i for i in range(len(samples)) if i not in done][rank::world]
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(mine), desc="eval", unit="sample", disable=rank != 0, dynamic_ncols=True)
    for b in range(0, len(mine), cfg.batch_size):
        idx = mine[b:b + cfg.batch_size]
        batch = [samples[i] for i in idx]
        trajs = rollout(model, processor, batch, cfg.samples, rollout_config(cfg), view,
                        loaded=prepare(batch, view, done=decoded),
                        keys=idx)  # each row seeded by (seed, sample index, draw): any batching
        live = [t for t in trajs if t.stop_reason != "skipped"]
        comps = iter([c for _, c in reward_batch([t.sample for t in live], live, rew, judge)] if live else [])
        for j, t in enumerate(trajs):
            if t.stop_reason == "skipped" and j % cfg.samples == 0:
                tqdm.write(f"warning: skipped {t.error}", file=sys.stderr)
            comp = None if t.stop_reason == "skipped" else next(comps)
            p = prediction(idx[j // cfg.samples], j % cfg.samples, t, comp)
            results.append((p, dataclasses.replace(t, vision_parts=[]) if return_trajectories else None))
            if log:
                log.write(partial_line(*results[-1]))
        if log:
            log.flush()
        bar.update(len(idx))
        scored = [p["score"] for p, _ in results if "score" in p]
        bar.set_postfix(acc=f"{sum(scored) / max(len(scored), 1):.3f}")
    bar.close()
    if log:
        log.close()
    model.train(was_training)
    if ddp:
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(results, gathered, dst=0)
        results = [r for part in gathered for r in part] if rank == 0 else []
    results.sort(key=lambda r: (r[0]["index"], r[0]["draw"]))
    predictions = [p for p, _ in results]
    summary = [summarize(predictions, time.time() - t0) if rank == 0 else None]
    if ddp:
        dist.broadcast_object_list(summary, src=0)
    summary = dict(summary[0], view=asdict(view), samples_per_question=cfg.samples, temperature=cfg.temperature)
    if return_trajectories:
        return summary, predictions, [t for _, t in results]
    return summary, predictions


# --------------------------------------------------------------------------- RFT export
def rft_row(renderer: Renderer, traj):
    """The SFT row of a trajectory (sample fields + turns), or None when it does not re-render to the very token ids
    the policy produced (a non-canonical tokenization, another stop token, a truncated episode, a last-turn note)."""
    if traj.stop_reason != "answer" or not traj.turns_text:
        return None
    im_end = renderer.tok.convert_tokens_to_ids("<|im_end|>")
    if not traj.turn_ids or traj.turn_ids[-1][-1:] != [im_end]:
        return None
    turns = list(traj.turns_text[:-1]) + [renderer.tok.decode(traj.turn_ids[-1][:-1], skip_special_tokens=False)]
    row = {k: v for k, v in traj.sample.items() if k not in ("turns", "observations")}
    row["turns"] = turns
    try:
        r = render_sft(renderer, row)
    except VideoError:
        return None
    return row if r.input_ids == traj.input_ids and r.policy_mask == traj.policy_mask else None


def export_rft(path, trajectories, predictions, renderer: Renderer, min_iou=0.3):
    """The correct trajectories whose last crop has IoU >= min_iou, as SFT rows (JSONL); returns the counts."""
    counts = dict(correct=0, candidates=0, exported=0, not_roundtrip=0, duplicates=0)
    rows, seen = [], set()
    for t, p in zip(trajectories, predictions, strict=True):
        if p.get("score") != 1.0:
            continue
        counts["correct"] += 1
        windows = [c["window"] for c in t.tool_calls]
        if min_iou > 0 and iou_reward(windows, t.sample.get("window"), "last") < min_iou:
            continue
        counts["candidates"] += 1
        row = rft_row(renderer, t)
        if row is None:
            counts["not_roundtrip"] += 1
            continue
        key = (row.get("id"), tuple(row["turns"]))
        if key in seen:  # the same trace sampled twice (pass@k) is written once
            counts["duplicates"] += 1
            continue
        seen.add(key)
        rows.append(row)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_jsonl(path, rows)
    counts["exported"] = len(rows)
    return dict(counts, path=path)


# --------------------------------------------------------------------------- outputs
def write_outputs(out_dir, summary, predictions, trajectories=None, report_samples=20):
    """predictions.jsonl, summary.json, report.html (report_samples trajectories), trajectories.jsonl if given."""
    os.makedirs(out_dir, exist_ok=True)  # each file written atomically: a full disk never leaves a truncated one
    write_jsonl(os.path.join(out_dir, "predictions.jsonl"), predictions)
    write_text(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=1))
    if trajectories is not None:
        write_jsonl(os.path.join(out_dir, "trajectories.jsonl"),
                    (dict(id=p["id"], draw=p["draw"], prompt_len=t.prompt_len, input_ids=t.input_ids,
                          policy_mask=t.policy_mask, logprobs=t.logprobs, turn_ids=t.turn_ids)
                     for p, t in zip(predictions, trajectories)))
    if report_samples > 0:
        from report import write_report
        write_report(os.path.join(out_dir, "report.html"), summary, predictions[:report_samples],
                     ViewConfig(**summary["view"]))


def print_summary(summary):
    fmt = lambda v: "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    keys = ["n", "scored", "accuracy"] + [k for k in summary if k.startswith("pass@")] + [
        "format_rate", "mean_iou", "tool_calls_per_episode", "tool_error_rate", "judge_failures", "answer_rate",
        "mean_tokens", "seconds_per_sample", "skipped"]
    rows = [(k, fmt(summary.get(k))) for k in keys]
    rows += [(f"accuracy {b}", f"{fmt(v['accuracy'])} (n={v['n']})") for b, v in summary["accuracy_by_length"].items()]
    if summary.get("rft"):
        rows.append(("rft exported", f"{summary['rft']['exported']} of {summary['rft']['candidates']} candidates"))
    w = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{w}}  {v}" for k, v in rows), flush=True)
    if summary["skipped"]:
        print(f"skipped: {', '.join(summary['skipped_names'])}", flush=True)


def default_model():
    """The newest (by modification time) checkpoint among runs/rft, runs/grpo, runs/sft; else tiny."""
    found = [resolve_checkpoint(d) for d in RUN_DIRS]
    found = [d for d in found if os.path.isfile(os.path.join(d, "config.json"))]
    return max(found, key=lambda d: os.path.getmtime(os.path.join(d, "config.json"))) if found else "tiny"


def default_out(model_name):
    if os.path.isdir(model_name):
        return os.path.join(model_name, "eval")
    return os.path.join("runs", "eval_" + model_name.replace("/", "_"))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_config(Config, argv)
    if cfg.samples > 1 and cfg.temperature <= 0:
        raise SystemExit("--samples > 1 needs --temperature > 0 (greedy draws are identical)")
    d = compute_init(cfg.seed)
    samples = load_samples(cfg.data, cfg.skip_bad_rows)
    samples = samples[:cfg.limit] if cfg.limit > 0 else samples
    name = resolve_checkpoint(cfg.model) if cfg.model else default_model()  # <dir>.old: a save killed mid-swap
    out = cfg.out or default_out(name)
    given = given_keys(argv)
    for k, v in follow_layout(name, asdict(view_from(cfg)), given, print0).items():  # the layout it learnt
        setattr(cfg, k, v)
    if cfg.dry_run:  # sizes from the model's config alone: no weights, no judge, nothing written
        if samples:
            from memory import dry_run
            print0(dry_run(name, samples[0], view_from(cfg), rollout_config(cfg), rows=cfg.batch_size * cfg.samples,
                           gpus=cfg.gpus or d.world, gpu_memory_gib=cfg.gpu_memory_gib, train=None))
        if dist.is_initialized():
            dist.destroy_process_group()
        return
    print0(f"eval {name} on {cfg.data} ({len(samples)} samples x {cfg.samples}) -> {out}")
    check_writable(out)  # every rank, so that all stop alike before any rollout
    if cfg.export_rft:
        check_writable(os.path.dirname(os.path.abspath(cfg.export_rft)), "--export_rft")
    # the judge answers now or the eval stops, as train_grpo.py does (not rule-scoring everything silently)
    judge = config_judge(RewardConfig(accuracy=cfg.accuracy)) if cfg.accuracy != "rule" else None
    if judge is not None:
        judge.health_check()
    model, processor = load_model(name, d.device)
    decoded = {}  # the first global view, decoded once: for the check, then for this rank's rollout if it has it
    if samples:
        decoded[id(samples[0])] = prepare(samples[:1], view_from(cfg))[0]
        check_budget(processor, decoded[id(samples[0])], view_from(cfg), cfg.max_new_tokens, cfg.max_total_tokens)
    keep = bool(cfg.export_rft or cfg.save_trajectories)  # gather token ids only when something needs them
    cfg.model = name  # (the fingerprint of a resumed eval names the checkpoint)
    summary, predictions, *rest = evaluate(model, processor, samples, cfg, judge=judge, distributed=True,
                                           return_trajectories=keep, decoded=decoded, partial=out)
    trajectories = rest[0] if keep else None
    if d.is_main:
        summary.update(model=name, data=cfg.data, judge_last_error=judge.last_error if judge else None)
        if cfg.export_rft:
            summary["rft"] = export_rft(cfg.export_rft, trajectories, predictions,
                                        Renderer(processor, view_from(cfg)), cfg.rft_min_iou)
        write_outputs(out, summary, predictions, trajectories if cfg.save_trajectories else None, cfg.report_samples)
        for path in partial_files(out).values():  # complete: the outputs replace them
            os.remove(path)
        print_summary(summary)
        print(f"wrote {out}/predictions.jsonl, summary.json" + (", report.html" if cfg.report_samples else ""))
    if dist.is_initialized():
        dist.barrier()  # no rank leaves (and tears its connections down) while rank 0 still writes
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
