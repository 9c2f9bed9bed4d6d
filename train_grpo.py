"""Stage 2: agentic GRPO with the crop_video tool (judge/rule accuracy + format + temporal-IoU reward).

    python train_grpo.py                                             # 1 process: runs/sft -> runs/grpo
    torchrun --standalone --nproc_per_node=2 train_grpo.py           # DDP (gloo on CPU, nccl on GPU)
    torchrun --standalone --nproc_per_node=8 train_grpo.py --parallel=fsdp --init=runs/sft_7b --out=runs/grpo_7b
    python train_grpo.py --init=tiny --steps=5                       # smoke run without an SFT checkpoint
    python train_grpo.py --resume=true                               # continue runs/grpo exactly

Each step: prompts_per_step prompts (rank-strided over a seeded shuffle), group_size rollouts each through the
real tool loop (rollout.py, temperature 1), rewards (reward.py), group advantages, then ppo_epochs x mini_batches
optimizer steps on the clipped surrogate + k3 KL to the frozen init weights, over policy_mask == 1 tokens only.
<out> is an HF checkpoint (eval.py / train_sft.py --init read it) plus trainer_state.pt, metrics.jsonl,
rollouts/step_XXXX.jsonl (whole trajectories), eval/step_XXXX.jsonl, reward_curve.svg (--curve=true).

Variants: --adv_norm=none (Dr. GRPO: r - mean, no std division); --clip_high > clip_low (DAPO clip-higher);
--dynamic_sampling=true (DAPO: groups whose rewards are all equal carry no signal; they are replaced by fresh
prompts for up to resample_rounds extra rollout rounds, and those left are dropped from the update);
--loss_agg=seq-mean (per-sequence mean, GRPO's original) vs token-mean over the whole mini-batch on all ranks
(DAPO, LongVT); --ratio_level=sequence (GSPO: one ratio per sequence, exp of its mean token log-ratio; use it
with GSPO's tiny clip ranges, ~3e-4/4e-4); DGRPO (VITAL) with --dgrpo_task / --dgrpo_sample > 0:
    A_i <- A_i * (1 + dgrpo_task * (0.5 - acc_task)) * (1 + dgrpo_sample * (0.5 - acc_group))
acc_group = mean accuracy of the sample's group, acc_task = mean accuracy of this step's rollouts of the same
answer type (reward.answer_type) on all ranks. Why: in a multi-task mix the easy tasks and samples would
dominate the update, while rare successes on hard ones carry the most information; centring at accuracy 0.5
keeps the step size of a medium batch. This is our formula in the spirit of VITAL's DGRPO (task- and
sample-difficulty scaling of the advantages), not a transcription of the paper's.

Departures from LongVT (verl + vLLM): rollouts come from our own batched HF loop with the training weights (no
second engine, no weight sync); mini-batches are contiguous slices of the step's rollouts (no shuffle); a sample
whose video cannot be read is skipped and counted, not replaced; a failed judge falls back to the rule scorer and
is counted; DGRPO as above. On CUDA the weights and AdamW states stay fp32 with bf16 compute (autocast under DDP,
FSDP2 mixed precision), so LongVT's lr 1e-6 is not lost to bf16 rounding.
"""
import json
import math
import os
import random
import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from data import ViewConfig, collate, load_samples
from model import atomic_dir, compute_init, load_model, parse_config, print0, resolve_checkpoint, token_logprobs
from reward import Judge, RewardConfig, answer_type, reward_batch
from rollout import RolloutConfig, rollout


@dataclass
class Config:
    init: str = "runs/sft"                  # starting policy: train_sft.py's output dir, an HF id/dir, or "tiny"
    data: str = "data/needle/train.jsonl"   # training prompts (any format data.load_samples reads)
    eval_data: str = "data/needle/eval.jsonl"  # held-out file for the periodic eval ("" = none)
    out: str = "runs/grpo"                  # checkpoint (HF layout + trainer_state.pt) and logs
    resume: bool = False                    # continue exactly from the checkpoint in <out>
    seed: int = 0                           # data order and rollout sampling
    steps: int = 50                         # GRPO steps (rollouts + update each)
    prompts_per_step: int = 4               # prompts per step over all ranks (a multiple of the world size)
    group_size: int = 8                     # rollouts per prompt (G)
    max_turns: int = 3                      # tool calls per episode (LongVT: 5)
    max_new_tokens: int = 96                # tokens per assistant turn
    max_total_tokens: int = 4096            # tokens per episode, prompt and observations included
    temperature: float = 1.0                # rollout sampling temperature (LongVT: 1.0)
    view: dict = field(default_factory=dict)    # data.ViewConfig overrides, JSON: --view={"global_frames":16}
    reward: dict = field(default_factory=dict)  # reward.RewardConfig overrides, JSON: --reward={"w_iou":0.5}
    adv_norm: str = "std"                   # "std": (r - mean) / (std + eps) (GRPO) | "none": r - mean (Dr. GRPO)
    adv_eps: float = 1e-6                   # eps of the std normalisation
    dynamic_sampling: bool = False          # DAPO: replace, then drop, groups whose rewards are all equal
    resample_rounds: int = 2                # extra rollout rounds per step to replace such groups
    dgrpo_task: float = 0.0                 # DGRPO task-difficulty scale (0 = off, at most 2)
    dgrpo_sample: float = 0.0               # DGRPO sample-difficulty scale (0 = off, at most 2)
    lr: float = 2e-5                        # AdamW learning rate, constant after warmup (LongVT 7B: 1e-6)
    warmup_steps: int = 0                   # linear warmup steps
    weight_decay: float = 0.0               # AdamW weight decay
    grad_clip: float = 1.0                  # max global grad norm
    ppo_epochs: int = 1                     # passes over a step's rollouts
    mini_batches: int = 1                   # optimizer steps per pass (the rollouts split in order)
    micro_batch: int = 4                    # rows per forward/backward on one rank (gradient accumulation)
    clip_low: float = 0.2                   # ratio clipped below at 1 - clip_low
    clip_high: float = 0.2                  # ... and above at 1 + clip_high (DAPO clip-higher: 0.28)
    loss_agg: str = "token-mean"            # "token-mean" over the mini-batch on all ranks | "seq-mean"
    ratio_level: str = "token"              # "token" (PPO/GRPO) | "sequence" (GSPO)
    kl_coef: float = 1e-3                   # k3 KL to the init weights (LongVT: 1e-3); 0 loads no reference
    parallel: str = "ddp"                   # "ddp" | "fsdp" (FSDP2 per decoder layer / vision block + root)
    grad_ckpt: bool = False                 # gradient checkpointing in the training forward
    log_rollouts_every: int = 10            # whole trajectories to <out>/rollouts/step_XXXX.jsonl (0 = never)
    num_log_rollouts: int = 4               # ... this many (rank 0's first)
    eval_every: int = 25                    # eval on eval_data every N steps and at the end (0 = never)
    eval_samples: int = 16                  # held-out samples per eval
    save_every: int = 25                    # checkpoint every N steps (and at the end)
    curve: bool = False                     # write <out>/reward_curve.svg from metrics.jsonl at the end


# --------------------------------------------------------------------------- the GRPO math
def group_advantages(rewards, adv_norm="std", eps=1e-6):
    """rewards (P, G) -> advantages (P, G): r - group mean, divided by the group's (unbiased) std + eps for "std".
    Dr. GRPO ("none") drops the division, which up-weights prompts whose rollouts barely differ.
    A group whose rewards are all equal gets advantage 0 either way."""
    adv = rewards - rewards.mean(1, keepdim=True)
    return adv / (rewards.std(1, keepdim=True) + eps) if adv_norm == "std" else adv


def grpo_loss(logp, old_logp, ref_logp, adv, mask, cfg, denom):
    """Clipped surrogate + k3 KL on the policy tokens of one micro-batch. logp, old_logp, ref_logp, mask: (B, T);
    adv: (B,). denom = policy tokens (token-mean) or sequences (seq-mean) of the whole mini-batch on all ranks, so
    the micro-batch losses sum to the mini-batch mean. Returns (loss, sums of kl and of clipped tokens)."""
    mask = mask.float()
    log_ratio = (logp - old_logp) * mask                                      # (B, T), 0 off the policy tokens
    if cfg.ratio_level == "sequence":  # GSPO: one ratio per sequence, the geometric mean of its token ratios
        log_ratio = (log_ratio.sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)).expand_as(mask)
    ratio = log_ratio.exp()                                                   # (B, T)
    a = adv[:, None]                                                          # (B, 1)
    # With one on-policy update per step, old_logp == logp: ratio == 1 and the clip is inert (the loss is
    # REINFORCE with a group baseline). Clipping bites from the 2nd mini-batch or epoch of a step on.
    surr = torch.min(ratio * a, ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high) * a)  # (B, T)
    per_token, kl = -surr, torch.zeros_like(surr)
    if cfg.kl_coef > 0:  # k3 = exp(ref - logp) - (ref - logp) - 1: unbiased, >= 0, low variance
        d = (ref_logp - logp) * mask
        kl = d.exp() - d - 1                                                  # (B, T)
        per_token = per_token + cfg.kl_coef * kl
    per_token = per_token * mask
    if cfg.loss_agg == "token-mean":
        loss = per_token.sum() / denom
    else:  # seq-mean: each sequence's token mean, summed here, averaged over the mini-batch's sequences by denom
        loss = (per_token.sum(1) / mask.sum(1).clamp(min=1)).sum() / denom
    clipped = ((surr < ratio * a).float() * mask).sum()  # tokens whose clipped branch is the active one
    return loss, dict(kl=(kl * mask).sum().item(), clipped=clipped.item())


def dgrpo_weights(acc_group, acc_task, cfg):
    """(P,) group mean accuracy, (P,) batch mean accuracy of the sample's task type -> (P,) advantage scales."""
    return (1 + cfg.dgrpo_task * (0.5 - acc_task)) * (1 + cfg.dgrpo_sample * (0.5 - acc_group))


# --------------------------------------------------------------------------- plumbing
class LogProbs(torch.nn.Module):
    """The policy as one module whose forward is model.token_logprobs (LM head on policy tokens only). DDP and
    FSDP2 wrap THIS so that their forward hooks run: token_logprobs calls the inner HF modules directly, which
    under a DDP-wrapped HF model would skip DDP.forward, leave the reducer unarmed and not all-reduce gradients."""

    def __init__(self, hf, autocast=False):
        super().__init__()
        self.hf, self.autocast = hf, autocast  # autocast: bf16 compute on fp32 weights (CUDA without FSDP)

    def forward(self, b, with_entropy=False):
        dev = next(self.hf.parameters()).device
        vision = {k: v.to(dev) for k, v in b["vision"].items() if k != "second_per_grid_ts"}
        with torch.autocast("cuda", torch.bfloat16) if self.autocast else nullcontext():
            return token_logprobs(self.hf, b["input_ids"].to(dev), b["attention_mask"].to(dev), b["position_ids"].to(dev),
                                  with_entropy=with_entropy, mask=b["policy_mask"].to(dev), **vision)


def build(name, d, cfg, trainable):
    """(bare HF model, wrapped LogProbs module, processor). FSDP2: each decoder layer / vision block its own unit,
    the LogProbs wrapper the root; DDP only around the trainable policy. Trainable weights stay fp32."""
    hf, processor = load_model(name, d.device, dtype=torch.float32 if trainable else None,
                               grad_ckpt=cfg.grad_ckpt and trainable)
    hf.requires_grad_(trainable)
    fsdp = d.world > 1 and cfg.parallel == "fsdp"
    net = LogProbs(hf, autocast=d.device.type == "cuda" and not fsdp)
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        kw = dict(mp_policy=MixedPrecisionPolicy(torch.bfloat16, torch.float32)) if d.device.type == "cuda" else {}
        for m in hf.modules():
            if type(m).__name__ in hf._no_split_modules:  # Qwen*VLDecoderLayer, Qwen*VLVisionBlock
                fully_shard(m, **kw)
        fully_shard(net, **kw)
        with torch.no_grad():  # one tiny forward through the root, so FSDP2 picks it as the root (lazy init)
            pos = torch.arange(2).view(1, 1, 2).expand(3, 1, 2)  # before the rollout calls the layers directly
            net(dict(input_ids=torch.zeros(1, 2, dtype=torch.long), attention_mask=torch.ones(1, 2, dtype=torch.long),
                     position_ids=pos, policy_mask=torch.ones(1, 2), vision={}))
        net.reshard()  # the root keeps its gathered params after forward; the optimizer must see the sharded ones
    elif d.world > 1 and trainable:
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[d.local_rank] if d.device.type == "cuda"
                                                        else None, broadcast_buffers=False)
    return hf, net, processor


@contextmanager
def rollout_mode(hf, net, fsdp, bf16):
    """Rollouts make a different number of forward calls on each rank, so they must not issue collectives: the
    rollout gets the bare HF module (no DDP hooks), and under FSDP2 every unit is all-gathered once here (the same
    calls on every rank) with reshard_after_forward off, so the layers' pre-forward hooks find their parameters
    gathered and do nothing; everything is resharded after. Eval mode, no_grad, bf16 autocast on CUDA."""
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


def all_sum(values, device, op="sum"):
    """Element-wise sum (or max) of a list of numbers over ranks."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def all_gather_obj(obj):
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def sample_at(samples, seed, i):
    """The i-th prompt of the endless stream: epoch i // N is a fresh seeded shuffle."""
    epoch, k = divmod(i, len(samples))
    return samples[int(np.random.default_rng([seed, epoch]).permutation(len(samples))[k])]


def rng_state():
    return dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state() if torch.cuda.is_available() else None)


def set_rng_state(s):
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def init_path(p):
    """--init as load_model takes it: a checkpoint dir, "tiny" or an HF hub id; a missing run dir is an error."""
    if p == "tiny" or os.path.isfile(os.path.join(p, "config.json")):
        return p
    if os.path.exists(p) or p.startswith(("runs/", "./", "/", "../")):
        raise SystemExit(f"--init={p}: no checkpoint there. Run stage 1 first (torchrun --standalone "
                         "--nproc_per_node=2 train_sft.py writes runs/sft), or start from scratch with --init=tiny.")
    return p


def write_curve(out):
    """reward_curve.svg: reward, accuracy and IoU per step as SVG polylines (no plotting dependency)."""
    rows = [m for m in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "reward" in m]
    if not rows:
        return
    W, H, P = 640, 320, 40  # width, height, padding
    top, n = max(1.0, max(r["reward"] for r in rows)), max(len(rows) - 1, 1)
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect x="{P}" y="{P // 2}" width="{W - 2 * P}" height="{H - 1.5 * P}" fill="none" stroke="#999"/>',
           f'<text x="4" y="{P // 2 + 10}">{top:.2f}</text><text x="4" y="{H - P}">0</text>',
           f'<text x="{W - P - 60}" y="{H - 8}">step {rows[-1]["step"]}</text>']
    for i, (key, colour) in enumerate((("reward", "#d62728"), ("accuracy", "#1f77b4"), ("iou", "#2ca02c"))):
        pts = " ".join(f"{P + (W - 2 * P) * j / n:.1f},{H - P - (H - 1.5 * P) * r.get(key, 0) / top:.1f}"
                       for j, r in enumerate(rows))
        svg += [f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{pts}"/>',
                f'<text x="{P + 10 + 90 * i}" y="{H - 8}" fill="{colour}">{key}</text>']
    with open(os.path.join(out, "reward_curve.svg"), "w") as f:
        f.write("\n".join(svg + ["</svg>"]))


def dump_rollouts(path, rows, tokenizer):
    """Whole trajectories [(traj, (reward, components), advantage)]: turns, tool calls with their windows and
    errors, and the decoded transcript after the prompt (runs of vision pads collapsed), as JSONL."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for t, (r, c), a in rows:
            text = tokenizer.decode(t.input_ids[t.prompt_len:], skip_special_tokens=False)
            for pad in ("<|video_pad|>", "<|image_pad|>"):
                while pad * 2 in text:
                    text = text.replace(pad * 2, pad)
            f.write(json.dumps(dict(
                id=t.sample.get("id"), question=t.sample.get("question"), reference=t.sample.get("answer"),
                window=t.sample.get("window"), reward=r, advantage=a, stop_reason=t.stop_reason, turns=t.turns_text,
                components={k: v for k, v in c.items() if isinstance(v, (int, float, str, bool, type(None)))},
                tool_calls=[{k: v for k, v in tc.items() if k != "timestamps"} for tc in t.tool_calls],
                transcript=text)) + "\n")
