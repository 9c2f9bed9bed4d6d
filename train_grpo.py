"""Stage 2: agentic GRPO with the crop_video tool (judge/rule accuracy + format + temporal-IoU reward).

    python train_grpo.py                                             # 1 process: runs/sft -> runs/grpo
    torchrun --standalone --nproc_per_node=2 train_grpo.py           # DDP (gloo on CPU, nccl on GPU)
    torchrun --standalone --nproc_per_node=8 train_grpo.py --parallel=fsdp --init=runs/sft_7b --out=runs/grpo_7b
    python train_grpo.py --init=tiny --steps=5                       # smoke run without an SFT checkpoint
    python train_grpo.py --resume=true                               # continue runs/grpo exactly

Each step: prompts_per_step prompts (rank-strided, seeded shuffle), group_size rollouts each through the real tool
loop (rollout.py), rewards (reward.py), group advantages, then ppo_epochs x mini_batches optimizer steps on the
clipped surrogate + k3 KL to the frozen init weights, on policy_mask == 1 tokens only. <out> is an HF checkpoint
(eval.py, train_sft.py --init read it) + trainer_state.pt, view.json, metrics.jsonl, rollouts/, eval/.

Variants: --adv_norm=none (Dr. GRPO: r - mean); --clip_high > clip_low (DAPO clip-higher); --dynamic_sampling
(DAPO: groups whose rewards are all equal are replaced by fresh prompts for up to resample_rounds rounds, those
left dropped); --loss_agg=seq-mean-token-mean (GRPO's, LongVT's), token-mean, seq-mean-token-sum-norm (verl's,
per micro-batch) vs global-token-mean (DAPO's: the token mean of the whole mini-batch, the default);
--ratio_level=sequence (GSPO: exp of the mean token log-ratio; use GSPO's ~3e-4/4e-4 clips); DGRPO (VITAL):
    A_i <- A_i * (1 + dgrpo_task * (0.5 - acc_task)) * (1 + dgrpo_sample * (0.5 - acc_group))
(acc_group: the group's mean accuracy, acc_task: this step's for the answer type, all ranks), so that easy tasks
and samples do not dominate a mixed batch; our formula in the spirit of VITAL's, not the paper's transcription.

Departures from LongVT (verl + vLLM): our batched HF rollout loop; contiguous mini-batches; an unreadable video is
skipped and counted; a failed judge falls back to rules, counted; fp32 weights and AdamW with bf16 compute on CUDA."""
import os
import re
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from data import ViewConfig, follow_layout, model_vision, view_from
from eval import evaluate
import checkpoint
from checkpoint import write_jsonl
from model import (all_sum, compute_init, given_keys, load_model, lr_at, parse_config, print0,
                   resolve_checkpoint, token_logprobs, wrap)
from readers import load_samples
from report import write_curve
from grpo import LOSS_AGGS, advantages, is_flat, micro_batches, update
from reward import Judge, RewardConfig, reward_batch
from rollout import RolloutConfig, check_budget, prepare, rollout


@dataclass
class Config(ViewConfig):  # ViewConfig's fields are flags too (the view: data.py)
    init: str = "runs/sft"                  # starting policy: train_sft.py's output dir, an HF id/dir, or "tiny"
    data: str = "data/needle/rl.jsonl"      # training prompts (any format readers.load_samples reads)
    eval_data: str = "data/needle/eval.jsonl"  # held-out file for the periodic eval ("" = none)
    out: str = "runs/grpo"                  # checkpoint (HF layout + trainer_state.pt) and logs
    resume: bool = False                    # continue exactly from the checkpoint in <out>
    skip_bad_rows: bool = False             # a bad row: skip it with a warning naming file:line, not stop there
    seed: int = 0                           # data order and rollout sampling
    steps: int = 35                         # GRPO steps (rollouts + update each)
    prompts_per_step: int = 4               # prompts per step over all ranks (a multiple of the world size)
    group_size: int = 8                     # rollouts per prompt (G)
    max_turns: int = 3                      # tool calls per episode (LongVT: 5)
    max_new_tokens: int = 96                # tokens per assistant turn
    max_total_tokens: int = 4096            # tokens per episode, prompt and observations included
    temperature: float = 1.0                # rollout sampling temperature (LongVT: 1.0)
    top_p: float = 0.9                      # rollout nucleus sampling (LongVT: 1 = off); ratios and KL use the whole
    top_k: int = 0                          # rollout top-k (0 = off)                   policy's log-probs either way
    max_rows: int = 0                       # rollout rows holding KV at once on a rank (0 = all); --dry_run names one
    prefill_chunk: int = RolloutConfig.prefill_chunk  # query tokens per forward when prompts/observations enter the cache
    reward: dict = field(default_factory=dict)  # reward.RewardConfig overrides, JSON: --reward={"w_iou":0.5}
    adv_norm: str = "std"                   # "std": (r - mean) / (std + eps) (GRPO) | "none": r - mean (Dr. GRPO)
    dynamic_sampling: bool = False          # DAPO: replace, then drop, groups whose rewards are all equal
    resample_rounds: int = 2                # extra rollout rounds per step to replace such groups
    dgrpo_task: float = 0.0                 # DGRPO task-difficulty scale (0 = off, at most 2)
    dgrpo_sample: float = 0.0               # DGRPO sample-difficulty scale (0 = off, at most 2)
    lr: float = 2e-4                        # AdamW lr, constant after warmup (the tiny model's; LongVT 7B: 1e-6)
    warmup_steps: int = 5                   # linear warmup steps (Adam's first, sign-like steps are the wildest)
    weight_decay: float = 0.0               # AdamW weight decay
    grad_clip: float = 1.0                  # max global grad norm
    ppo_epochs: int = 1                     # passes over a step's rollouts
    mini_batches: int = 1                   # optimizer steps per pass (the rollouts split in order)
    micro_batch: int = 4                    # rows per forward/backward on one rank (gradient accumulation)
    clip_low: float = 0.2                   # ratio clipped below at 1 - clip_low
    clip_high: float = 0.2                  # ... and above at 1 + clip_high (DAPO clip-higher: 0.28)
    clip_ratio_c: float = 3.0               # dual clip (verl's, LongVT's): for A < 0 a loss <= -A x this (0: off)
    loss_agg: str = "global-token-mean"     # ours (DAPO's): the token mean of the mini-batch on all ranks | verl's:
                                            # "token-mean" (per micro-batch, averaged) | "seq-mean-token-mean"
                                            # (LongVT's) | "seq-mean-token-sum-norm" (Dr. GRPO; train_grpo.aggregate)
    ratio_level: str = "token"              # "token" (PPO/GRPO) | "sequence" (GSPO)
    kl_coef: float = 1e-3                   # k3 KL to the init weights (LongVT: 1e-3); 0 loads no reference
    parallel: str = "ddp"                   # "ddp" | "fsdp" (FSDP2 per decoder layer / vision block + root)
    grad_ckpt: bool = False                 # gradient checkpointing in the training forward
    freeze_vision: bool = False             # the vision tower is not trained (no grads, no saved activations)
    dry_run: bool = False                   # print what the run needs per GPU (memory.py) from the config, then stop
    gpus: int = 0                           # --dry_run: GPUs the run is for (0 = this launch's world size)
    gpu_memory_gib: float = 80.0            # --dry_run: memory of one GPU
    log_rollouts_every: int = 10            # rank 0's first group, whole, to <out>/rollouts/step_XXXX.jsonl
    eval_every: int = 25                    # eval on eval_data every N steps and at the end (0 = never)
    eval_samples: int = 16                  # held-out samples per eval
    save_every: int = 25                    # checkpoint every N steps (and at the end)
    curve: bool = True                      # write <out>/reward_curve.svg from metrics.jsonl at the end
    wandb: str = ""                         # also log metrics.jsonl's rows to this W&B project (pip install wandb)


# --------------------------------------------------------------------------- plumbing
class LogProbs(torch.nn.Module):
    """The policy as a module whose forward is model.token_logprobs (LM head on policy tokens only). DDP/FSDP2 wrap
    THIS: token_logprobs calls the inner HF modules, so on a DDP-wrapped HF model gradients would never sync."""

    def __init__(self, hf, autocast=False, temperature=1.0):
        super().__init__()
        self.hf, self.autocast = hf, autocast  # autocast: bf16 compute on fp32 weights (CUDA without FSDP)
        self.temperature = temperature  # the rollouts': ratios and KL compare the distributions they sampled from

    def forward(self, b, with_entropy=False):
        dev = next(self.hf.parameters()).device
        vision = model_vision(b["vision"], dev)
        with torch.autocast("cuda", torch.bfloat16) if self.autocast else nullcontext():
            return token_logprobs(self.hf, b["input_ids"].to(dev), b["attention_mask"].to(dev),
                                  b["position_ids"].to(dev), with_entropy=with_entropy, mask=b["policy_mask"].to(dev),
                                  temperature=self.temperature, **vision)


def build(name, d, cfg, trainable):
    """(bare HF model, wrapped LogProbs module, processor). FSDP2: each decoder layer / vision block its own unit,
    the LogProbs wrapper the root; DDP only around the trainable policy. Trainable weights stay fp32."""
    hf, processor = load_model(name, d.device, dtype=torch.float32 if trainable else None,
                               grad_ckpt=cfg.grad_ckpt and trainable)
    hf.requires_grad_(trainable)
    if trainable and cfg.freeze_vision:  # the tower then runs without a graph: no saved activations, no grads
        hf.model.visual.requires_grad_(False)
    fsdp = d.world > 1 and cfg.parallel == "fsdp"
    net = LogProbs(hf, autocast=d.device.type == "cuda" and not fsdp, temperature=cfg.temperature or 1.0)
    if fsdp or trainable:  # the frozen reference is sharded under FSDP2, never DDP-wrapped
        net = wrap(net, hf, d, cfg.parallel)
    if fsdp:
        with torch.no_grad():  # one tiny forward through the root, so FSDP2 picks it as the root (lazy init)
            pos = torch.arange(2).view(1, 1, 2).expand(3, 1, 2)  # before the rollout calls the layers directly
            net(dict(input_ids=torch.zeros(1, 2, dtype=torch.long), attention_mask=torch.ones(1, 2, dtype=torch.long),
                     position_ids=pos, policy_mask=torch.ones(1, 2), vision={}))
        net.reshard()  # the root keeps its gathered params after forward; the optimizer must see the sharded ones
    return hf, net, processor


@contextmanager
def rollout_mode(hf, net, fsdp, bf16):
    """Rollouts make a different number of forward calls on each rank, so they must issue no collectives: they get
    the bare HF module (no DDP hooks), and under FSDP2 every unit is all-gathered once here (same calls on every
    rank) with reshard_after_forward off, so the layers' pre-forward hooks find their params gathered; resharded
    after. Eval mode, no_grad, bf16 autocast on CUDA."""
    from torch.distributed.fsdp import FSDPModule
    units = [m for m in net.modules() if isinstance(m, FSDPModule)] if fsdp else []
    hf.eval()
    for m in units:
        if m is not net:
            m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16) if bf16 and not fsdp else nullcontext():
            yield
    finally:
        for m in units:
            m.reshard()
            if m is not net:
                m.set_reshard_after_forward(True, recurse=False)
        hf.train()


def sample_at(samples, seed, i):
    """The i-th prompt of the endless stream: epoch i // N is a fresh seeded shuffle."""
    epoch, k = divmod(i, len(samples))
    return samples[int(np.random.default_rng([seed, epoch]).permutation(len(samples))[k])]


def rollout_config(cfg: Config, seed) -> RolloutConfig:
    return RolloutConfig(max_turns=cfg.max_turns, max_new_tokens=cfg.max_new_tokens, seed=seed, top_k=cfg.top_k,
                         max_total_tokens=cfg.max_total_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                         max_rows=cfg.max_rows, prefill_chunk=cfg.prefill_chunk)


LOG_LINE = ("step {step:4d} | reward {reward:.3f} acc {accuracy:.3f} fmt {format:.3f} iou {iou:.3f} | tools "
            "{tool_calls:.2f} err {tool_errors:.2f} judge_fail {judge_failures} | len {response_len:.0f} trunc "
            "{truncated:.2f} zvar {zero_var:.2f} | kl {kl:.4f} clip {clip_frac:.3f} ent {entropy:.2f} gnorm "
            "{grad_norm:.3f} | roll {rollout_s:.1f}s upd {update_s:.1f}s {tok_s:.0f} tok/s")
EPISODE_KEYS = ("reward", "accuracy", "format", "iou", "judge_failures", "tool_calls", "tool_errors", "response_len",
                "truncated", "first_turn_length")  # the last: stopped on `length` in its first turn


def episode_stats(t, r, c):
    """The numbers logged per episode (as means over the step; judge_failures as a count)."""
    return dict(reward=r, accuracy=c.get("accuracy", 0.0), format=c.get("format", 0.0), iou=c.get("iou", 0.0),
                judge_failures=c.get("judge_failures", 0), tool_calls=t.num_tool_calls, response_len=sum(t.policy_mask),
                tool_errors=sum(bool(tc.get("error")) for tc in t.tool_calls), truncated=t.stop_reason == "length",
                first_turn_length=t.stop_reason == "length" and not t.tool_calls)


def init_path(p):
    """--init as load_model takes it: a checkpoint dir, "tiny" or an HF hub id; a missing run dir is an error."""
    local = os.path.exists(p) or p.startswith(("runs/", "./", "/", "../"))  # else an HF hub id
    if p != "tiny" and local and not os.path.isfile(os.path.join(resolve_checkpoint(p), "config.json")):
        raise SystemExit(f"--init={p}: no checkpoint there. Run stage 1 first (torchrun --standalone "
                         "--nproc_per_node=2 train_sft.py writes runs/sft), or start from scratch with --init=tiny.")
    return p


def dump_rollouts(path, rows, tokenizer):
    """Whole trajectories [(traj, (reward, components), advantage)] as JSONL: the turns, the tool calls with their
    windows and errors, and the decoded transcript after the prompt (runs of vision pads collapsed)."""
    def row(t, r, c, a):
        text = re.sub(r"(<\|(?:video|image)_pad\|>)+", r"\1", tokenizer.decode(t.input_ids[t.prompt_len:]))
        calls = [{k: v for k, v in tc.items() if k != "timestamps"} for tc in t.tool_calls]
        return dict(id=t.sample.get("id"), question=t.sample.get("question"), window=t.sample.get("window"),
                    reference=t.sample.get("answer"), reward=r, advantage=a, components=c, turns=t.turns_text,
                    tool_calls=calls, stop_reason=t.stop_reason, transcript=text)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_jsonl(path, (row(t, r, c, a) for t, (r, c), a in rows))


# --------------------------------------------------------------------------- training
@dataclass
class Run:
    """What a run holds between steps."""
    cfg: Config
    d: object                      # model.Dist: rank, world, device
    hf: object                     # the bare HF policy (rollouts run on it)
    net: object                    # LogProbs around it, DDP- or FSDP2-wrapped (the update runs on it)
    ref: object                    # the frozen init policy's LogProbs (None without KL)
    processor: object
    opt: object
    view: ViewConfig
    rcfg: RewardConfig
    judge: object                  # None: rule scoring
    samples: list                  # training prompts
    held_out: list                 # the periodic eval's samples
    decoded: dict                  # the first global view, decoded once (the budget check's), for its first rollout
    metrics: checkpoint.Metrics
    step: int = 0
    pos: int = 0                   # the prompt stream's position (sample_at)

    @property
    def fsdp(self):
        return self.d.world > 1 and self.cfg.parallel == "fsdp"


def check(cfg, d):
    """Flags that cannot work, before any work."""
    assert cfg.prompts_per_step % d.world == 0, f"prompts_per_step must be a multiple of {d.world} ranks"
    assert cfg.adv_norm in ("std", "none"), f"adv_norm must be std or none, got {cfg.adv_norm!r}"
    if cfg.loss_agg not in LOSS_AGGS:
        raise SystemExit(f"--loss_agg must be one of {', '.join(LOSS_AGGS)} (verl's names), got {cfg.loss_agg!r}")
    if cfg.group_size < 2:
        raise SystemExit(f"--group_size must be at least 2, got {cfg.group_size}: GRPO's advantage is a reward "
                         "minus the mean of its group, and a group of one has none to learn from")
    assert cfg.ratio_level in ("token", "sequence") and cfg.parallel in ("ddp", "fsdp"), "bad ratio_level/parallel"


def setup(cfg, given):
    """The Run of cfg (None after a dry run): the layout the init checkpoint learnt, the data, the judge
    health-checked, the policy, its first prompt's budget checked, the reference, the optimizer, a resume."""
    d = compute_init(cfg.seed)
    check(cfg, d)
    init = init_path(cfg.init) if not cfg.resume or cfg.kl_coef > 0 else None  # fail before any work
    for k, v in follow_layout(cfg.out if cfg.resume else init, asdict(view_from(cfg)), given, print0).items():
        setattr(cfg, k, v)  # the prompt layout the init checkpoint learnt
    view, rcfg = view_from(cfg), RewardConfig(**cfg.reward)
    if cfg.resume:
        checkpoint.recover(cfg.out, d)
    samples = load_samples(cfg.data, cfg.skip_bad_rows)
    held_out = load_samples(cfg.eval_data, cfg.skip_bad_rows)[:cfg.eval_samples] if cfg.eval_every and cfg.eval_data \
        else []
    if cfg.dry_run:  # sizes from the config alone (no weights, no judge, nothing written), per GPU
        from memory import dry_run
        gpus = cfg.gpus or d.world
        print0(dry_run(init or cfg.out, samples[0], view, rollout_config(cfg, cfg.seed), gpus=gpus,
                       rows=cfg.prompts_per_step // gpus * cfg.group_size, gpu_memory_gib=cfg.gpu_memory_gib,
                       train=cfg) if samples else "dry run: no samples")
        return dist.destroy_process_group() if dist.is_initialized() else None
    judge = Judge.from_env(timeout=rcfg.judge_timeout, retries=rcfg.judge_retries, backoff=rcfg.judge_backoff,
                           workers=rcfg.judge_workers) if rcfg.accuracy != "rule" else None
    if judge is not None:
        judge.health_check()  # fail now, not after an hour of rollouts, when the judge is misconfigured
    hf, net, processor = build(cfg.out if cfg.resume else init, d, cfg, trainable=True)
    decoded = {}
    if samples:  # before the reference is loaded or anything is written
        decoded[id(samples[0])] = prepare(samples[:1], view)[0]
        check_budget(processor, decoded[id(samples[0])], view, cfg.max_new_tokens, cfg.max_total_tokens)
    ref = build(init, d, cfg, trainable=False)[1].eval() if cfg.kl_coef > 0 else None
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, pos = 0, 0
    if cfg.resume:
        state = checkpoint.resume(cfg.out, net, opt, d, cfg, print0)
        step, pos = state["step"], state["data_pos"]
    metrics = checkpoint.Metrics(cfg.out, step, d, cfg, cfg.wandb)
    print0(f"GRPO {cfg.init} -> {cfg.out}: {d.world} rank(s), {cfg.parallel}, {len(samples)} prompts, from step {step}")
    return Run(cfg, d, hf, net, ref, processor, opt, view, rcfg, judge, samples, held_out, decoded, metrics, step, pos)


def play(run, prompts, seed):
    """group_size rollouts of each prompt + rewards: ([(trajs, [(total, components)])], skipped prompts)."""
    G = run.cfg.group_size
    trajs = rollout(run.hf, run.processor, prompts, G, rollout_config(run.cfg, seed), run.view,
                    loaded=prepare(prompts, run.view, RolloutConfig.workers, done=run.decoded))
    groups = [trajs[i:i + G] for i in range(0, len(trajs), G)]
    for g in (g for g in groups if g[0].stop_reason == "skipped"):
        print(f"warning [rank {run.d.rank}]: skipped sample {g[0].error}", flush=True)
    groups = [g for g in groups if g[0].stop_reason != "skipped"]
    flat = [t for g in groups for t in g]
    rs = reward_batch([t.sample for t in flat], flat, run.rcfg, run.judge) if flat else []
    return [(g, rs[i * G:(i + 1) * G]) for i, g in enumerate(groups)], len(trajs) // G - len(groups)


def collect_groups(run):
    """This rank's groups of the step: its rank-strided share of prompts_per_step prompts, a sampling seed per step
    and rank (so a resume is exact); with DAPO's dynamic sampling, groups whose rewards are all equal replaced by
    fresh prompts' for up to resample_rounds rounds. Returns (groups, every group played, counts)."""
    cfg, d, step = run.cfg, run.d, run.step
    prompts = [sample_at(run.samples, cfg.seed, run.pos + k) for k in range(d.rank, cfg.prompts_per_step, d.world)]
    run.pos += cfg.prompts_per_step
    groups, skipped = play(run, prompts, cfg.seed + step * d.world + d.rank)
    played, n_first, flat_first, resampled = list(groups), len(groups), sum(is_flat(rs) for _, rs in groups), 0
    for rnd in range(1, cfg.resample_rounds + 1 if cfg.dynamic_sampling else 1):
        bad = [i for i, (_, rs) in enumerate(groups) if is_flat(rs)]
        counts = [int(c) for c in all_sum([len(bad) * (r == d.rank) for r in range(d.world)], d.device)]
        if not sum(counts):
            break
        first, run.pos = run.pos + sum(counts[:d.rank]), run.pos + sum(counts)  # fresh prompts' stream positions
        if bad:
            new, sk = play(run, [sample_at(run.samples, cfg.seed, first + k) for k in range(len(bad))],
                           cfg.seed + rnd * 1_000_003 + step * d.world + d.rank)
            groups = [g for i, g in enumerate(groups) if i not in bad] + new
            played, skipped, resampled = played + new, skipped + sk, resampled + len(bad)
    return groups, played, dict(groups=n_first, flat=flat_first, skipped=skipped, resampled=resampled)


def step_metrics(run, played, rows, counts, st, t0, t1):
    """The step's metrics.jsonl row: means over every episode played this step on all ranks, the update's sums."""
    cfg, dev = run.cfg, run.d.device
    eps = [episode_stats(t, r, c) for g, rs in played for t, (r, c) in zip(g, rs)]
    local = {k: sum(e[k] for e in eps) for k in EPISODE_KEYS}
    local.update(n=len(eps), update_rows=len(rows), **counts, **{k: st[k] for k in ("kl", "clipped", "tokens", "ent")})
    tot = dict(zip(local, all_sum(local.values(), dev)))
    n, ntok = max(tot["n"], 1), max(tot["tokens"], 1)
    return dict(step=run.step + 1, **{k: tot[k] / n for k in EPISODE_KEYS if k != "judge_failures"},
                zero_var=tot["flat"] / max(tot["groups"], 1), kl=tot["kl"] / ntok, clip_frac=tot["clipped"] / ntok,
                **{k: int(tot[k]) for k in ("judge_failures", "skipped", "resampled", "update_rows")},
                entropy=tot["ent"] * cfg.ppo_epochs / ntok, grad_norm=st["gnorm"] / max(st["updates"], 1),
                nonfinite=st["nonfinite"], ratio_err=all_sum([st["err"]], dev, "max")[0],
                lr=run.opt.param_groups[0]["lr"], data_pos=run.pos, rollout_s=t1 - t0, update_s=time.time() - t1,
                tok_s=tot["response_len"] / max(t1 - t0, 1e-9))  # sampled tokens per rollout second, all ranks


def train(cfg: Config, given=frozenset()):
    """The run of `cfg`; `given`: the flags the user set (they win over the init checkpoint's view.json)."""
    run = setup(cfg, given)
    if run is None:
        return
    d, pad = run.d, run.processor.tokenizer.pad_token_id
    for step in tqdm(range(run.step, cfg.steps), initial=run.step, total=cfg.steps, disable=not d.is_main, desc="grpo"):
        run.step = step
        for g in run.opt.param_groups:
            g["lr"] = cfg.lr * lr_at(step, cfg.steps, cfg.warmup_steps)  # constant after the warm-up
        t0 = time.time()
        with rollout_mode(run.hf, run.net, run.fsdp, d.device.type == "cuda"):
            groups, played, counts = collect_groups(run)
        t1 = time.time()
        adv = advantages(groups, cfg)                                                      # (P, G)
        rows = [(t, float(adv[i, j])) for i, (g, rs) in enumerate(groups)
                if not (cfg.dynamic_sampling and is_flat(rs)) for j, t in enumerate(g)]
        micro = micro_batches(rows, groups[0][0][0] if groups else None, cfg, d)
        st = update(run.net, run.ref, run.opt, micro, cfg, d, run.hf, pad)
        m = step_metrics(run, played, rows, counts, st, t0, t1)
        if d.is_main and cfg.log_rollouts_every and (step + 1) % cfg.log_rollouts_every == 0:
            first_group = [(t, rc, float(adv[0, j])) for j, (t, rc) in enumerate(zip(*groups[0]))] if groups else []
            dump_rollouts(os.path.join(cfg.out, "rollouts", f"step_{step + 1:04d}.jsonl"), first_group,
                          run.processor.tokenizer)
        if run.held_out and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            m.update(run_eval(run, step + 1))
        run.metrics.log(m)
        if d.is_main:
            tqdm.write(LOG_LINE.format(**m))
        if (cfg.save_every and (step + 1) % cfg.save_every == 0) or step + 1 == cfg.steps:
            checkpoint.save(cfg.out, run.hf, run.processor, run.net, run.opt,
                            dict(step=step + 1, data_pos=run.pos, config=cfg), run.view, d)
    run.metrics.close()
    if d.is_main and cfg.curve:
        write_curve(cfg.out)
    if dist.is_initialized():
        dist.barrier()  # rank 0 may still be drawing the curve
        dist.destroy_process_group()


def run_eval(run, step):
    """eval.evaluate on all ranks (rank-strided, gathered on rank 0) with the shards gathered; greedy decoding.
    Returns its numeric summary as eval/<name>; predictions go to <out>/eval/step_XXXX.jsonl."""
    cfg, d = run.cfg, run.d
    with rollout_mode(run.hf, run.net, run.fsdp, d.device.type == "cuda"):
        keys = ("max_turns", "max_new_tokens", "max_total_tokens", "seed", "max_rows", "prefill_chunk")  # greedy
        summary, predictions = evaluate(run.hf, run.processor, run.held_out, cfg={k: getattr(cfg, k) for k in keys},
                                        view=run.view, reward_cfg=run.rcfg, judge=run.judge, distributed=True)
    if d.is_main:
        os.makedirs(os.path.join(cfg.out, "eval"), exist_ok=True)
        write_jsonl(os.path.join(cfg.out, "eval", f"step_{step:04d}.jsonl"), predictions)
    out = {f"eval/{k}": v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    print0(f"eval step {step}: " + " ".join(f"{k[5:]}={v:.4g}" for k, v in out.items()))
    return out


if __name__ == "__main__":
    train(parse_config(Config), given_keys(sys.argv[1:]))
