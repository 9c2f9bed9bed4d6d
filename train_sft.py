"""Stage 1 (tool-integrated SFT cold start) and stage 3 (RFT): cross-entropy on the policy's own tokens only.

    python train_sft.py --init=runs/warmup   # the embedded default: needle_warmup.py's checkpoint, data/needle -> runs/sft
    python train_sft.py --steps=300 --lr=1e-3 --batch_size=16 --micro_batch_size=4 --grad_ckpt=true
    python train_sft.py --resume        # continue runs/sft exactly where it stopped
    torchrun --standalone --nproc_per_node=2 train_sft.py --parallel=ddp       # or --parallel=fsdp (FSDP2)
    python train_sft.py --init=runs/grpo --data=runs/rft.jsonl --out=runs/rft   # stage 3 (RFT) on eval.py's export
    python train_sft.py --model=Qwen/Qwen2.5-VL-7B-Instruct --data=a.jsonl,longvt_sft.json --visual_format=images

Each row (ours with `turns`, or LongVT's `messages`) is rendered by data.render_sft, its tool calls re-run, so SFT
sequences tokenize exactly like rollouts. The loss: the summed NLL of the policy tokens (policy_mask 1; only they go
through the LM head) over their count in the whole global batch, all-reduced first, so neither gradient accumulation
nor the number of processes changes the update. Every sample is rendered once at start-up (a strided share per rank,
lengths and failures all-gathered); a bad row or an unreadable video is skipped with a warning naming it and counted.
Epochs are seeded shuffles cut into global batches; --group_by_length batches similar lengths (instead of packing,
which M-RoPE vision sequences under sdpa do not allow). Checkpoints: checkpoint.py (HF layout, trainer_state.pt,
view.json, metrics.jsonl; exact --resume). On CPU one torch thread is the default: two threads on two busy cores
spin-wait (--threads=2 is 1.4x faster on an idle 2-core machine).

--view_jitter (on): each sample's global view gets a random frame count up to the budget; without it the tiny model,
trained on 3-5 min needle videos, garbles or drops its tool calls on the 10-15 min eval prompts (format 0.3-0.9).
"""
import math
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from data import (Renderer, ViewConfig, batch_to, collate, follow_layout, global_times, model_vision, render_sft,
                  view_from)
import checkpoint
from model import all_gather_obj, compute_init, given_keys, load_model, lr_at, parse_config, print0, unwrap, wrap
from readers import DataError, load_samples
from rollout import RolloutConfig
from video import VideoError, video_info


@dataclass
class Config(ViewConfig):  # ViewConfig's fields are flags too (the view: data.py)
    model: str = "tiny"             # policy to start from: 'tiny', an HF id or a checkpoint dir
    init: str = ""                  # same as --model and wins over it (e.g. --init=runs/grpo for RFT)
    data: str = "data/needle/sft.jsonl"  # training files, comma-separated (.jsonl / .json / .parquet; ours or LongVT's)
    out: str = ""                   # checkpoint dir (HF layout + trainer_state.pt + metrics.jsonl); "" = runs/sft
    steps: int = 0                  # optimizer steps; 0 = epochs x (samples // batch_size)
    epochs: float = 2.0             # used when steps == 0
    batch_size: int = 4             # global batch: samples per optimizer step, over all ranks and micro-steps
    micro_batch_size: int = 4       # samples per forward pass on one rank
    lr: float = 4e-3                # peak learning rate
    min_lr_ratio: float = 0.1       # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10          # linear warm-up steps
    weight_decay: float = 0.0       # AdamW weight decay
    beta2: float = 0.95             # AdamW beta2
    grad_clip: float = 1.0          # max global grad norm (0 = off)
    grad_ckpt: bool = False         # gradient checkpointing of the decoder layers
    parallel: str = "ddp"           # ddp | fsdp (FSDP2 fully_shard per decoder layer and vision block, then root)
    bf16: bool = True               # CUDA only: bf16 compute (CPU always runs fp32)
    seed: int = 0                   # data order and RNG seed
    save_every: int = 50            # checkpoint every N steps (0 = only at the end)
    resume: bool = False            # continue from the checkpoint in --out
    stop_at: int = 0                # end this invocation after this step, checkpointed (0 = run to the end)
    group_by_length: bool = True    # batch samples of similar length together (less padding)
    max_len: int = 0                # skip samples longer than this many tokens (0: the model's context,
                                    # max_position_embeddings of its text config; the tiny model's is 32768)
    limit: int = 0                  # use only the first N rows (0 = all)
    skip_bad_rows: bool = False     # a bad row (malformed JSON, a bad field): skip it with a warning naming
                                    # file:line instead of stopping there (the same rule in every script)
    cache: bool = True              # keep rendered samples in memory (false: re-render each time)
    workers: int = 2                # threads rendering samples at start-up (video decoding, processor)
    threads: int = 1                # CPU only: torch intra-op threads (0 = torch's default; see above)
    wandb: str = ""                 # also log metrics.jsonl's rows to this Weights & Biases project (pip install wandb)
    view_jitter: bool = True        # render each sample's global view with a random frame count (fixed per sample)
                                    # between its default and global_frames, so short videos also train long prompts
    max_turns: int = RolloutConfig.max_turns        # tool calls per episode (the last observation says so)


# --------------------------------------------------------------------------- loss
def policy_nll(model, batch, labels=None):
    """Summed NLL of labels[:, t] (default input_ids) where policy_mask[:, t] == 1: -(token_logprobs * mask).sum(),
    with only the masked positions through the LM head, in fp32."""
    bare = unwrap(model)
    ids = batch["input_ids"]
    labels = ids if labels is None else labels
    vision = model_vision(batch["vision"])
    # right padding: causal attention never lets a real token see a pad, so no mask is needed (sdpa's causal kernel)
    hidden = bare.model(input_ids=ids, position_ids=batch["position_ids"], use_cache=False,
                        **vision).last_hidden_state  # (B, T, H)
    target = batch["policy_mask"][:, 1:].bool()  # (B, T-1): token t+1 is the policy's
    logits = bare.lm_head(hidden[:, :-1][target]).float()  # (N, V), N = policy tokens of the batch
    return F.cross_entropy(logits, labels[:, 1:][target], reduction="sum")


class PolicyNLL(torch.nn.Module):
    """policy_nll as a module, so that DDP's and FSDP2's hooks run around it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return policy_nll(self.model, batch)


# --------------------------------------------------------------------------- data
def needs_turns(s):
    if not s.get("turns"):
        raise DataError("no assistant turns (an SFT row needs `turns` or `messages`)")


def read_samples(paths, limit=0, skip_bad=False):
    """SFT samples of all files (readers.load_samples' rule for bad rows). Returns (samples, skipped count)."""
    samples, skipped = [], []
    for path in paths:
        samples += load_samples(path, skip_bad, needs_turns, skipped)
    return (samples[:limit] if limit else samples), len(skipped)


def sample_view(view, sample, index, cfg):
    """The view a sample is rendered with: with --view_jitter, a seeded random global frame count between its
    duration's default and the budget."""
    if not cfg.view_jitter:
        return view
    duration = sample.get("duration") or video_info(sample["video"])["duration"]
    lo = len(global_times(duration, view))
    if lo >= view.global_frames:
        return view
    n = random.Random(f"{cfg.seed}:{index}").randint(lo, view.global_frames)
    return replace(view, global_fps=(n + 0.5) / duration)


def try_render(processor, view, sample, index, cfg):
    """Rendered, or an error string naming the sample when its video / stored frames cannot be read."""
    try:
        v = sample_view(view, sample, index, cfg)
        if sample.get("tools") is False:  # a row of the no-tool baseline's prompt (needle.py: notool_fraction)
            v = replace(v, tools=False)
        return render_sft(Renderer(processor, v), sample, cfg.max_turns)
    except (VideoError, DataError, OSError, ValueError, KeyError, IndexError) as e:
        return f"{sample['id']} ({sample['video']}): {type(e).__name__}: {e}"


def epoch_batches(lengths, cfg, epoch):
    """Global batches (lists of sample indices) of one epoch: a seeded shuffle, optionally grouped by length."""
    rng = random.Random(cfg.seed * 100003 + epoch)  # its own generator: the order never depends on the run so far
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    B = cfg.batch_size
    if cfg.group_by_length:  # sort windows of 16 batches by length, so each batch holds similar lengths
        w = 16 * B
        idx = [i for s in range(0, len(idx), w) for i in sorted(idx[s:s + w], key=lambda i: -lengths[i])]
    batches = [idx[s:s + B] for s in range(0, len(idx) - B + 1, B)]
    if cfg.group_by_length:
        rng.shuffle(batches)
        batches = [sorted(b, key=lambda i: -lengths[i]) for b in batches]
    return batches


class Data:
    """The training set rendered at start-up (a strided share per rank, all-gathered). Unreadable samples and those
    over max_len (default: the model's context) are skipped, named and counted. keep: the usable indices, lengths:
    their token counts, rendered(k): the k-th usable sample (kept, or rendered again with --cache=false)."""

    def __init__(self, cfg, d, processor, view, model):
        self.cfg, self.processor, self.view = cfg, processor, view
        self.samples, skipped_rows = read_samples(cfg.data.split(","), cfg.limit, cfg.skip_bad_rows)
        self.cache, info = {}, {}
        share = range(d.rank, len(self.samples), d.world)
        with ThreadPoolExecutor(cfg.workers) as pool:
            done = pool.map(lambda i: try_render(processor, view, self.samples[i], i, cfg), share)
            for i, r in zip(share, tqdm(done, total=len(share), desc="rendering", disable=not d.is_main, leave=False)):
                info[i] = r if isinstance(r, str) else len(r.input_ids)
                if cfg.cache and not isinstance(r, str):
                    self.cache[i] = r
        info = {k: v for part in all_gather_obj(info) for k, v in part.items()}
        text_cfg = getattr(model.config, "text_config", model.config)
        max_len = cfg.max_len or getattr(text_cfg, "max_position_embeddings", None) or float("inf")
        self.keep = []
        for i in range(len(self.samples)):
            if isinstance(info[i], str):
                print0(f"warning: skipping sample {info[i]}")
            elif info[i] > max_len:
                print0(f"warning: skipping sample {self.samples[i]['id']}: {info[i]} tokens > max_len {max_len}"
                       + ("" if cfg.max_len else " (the model's context; --max_len= sets another)"))
            else:
                self.keep.append(i)
        self.skipped = skipped_rows + len(self.samples) - len(self.keep)
        self.lengths = [info[i] for i in self.keep]
        if len(self.keep) < cfg.batch_size:
            raise SystemExit(f"{len(self.keep)} usable samples, fewer than one batch of {cfg.batch_size}")

    def rendered(self, k):
        i = self.keep[k]
        r = self.cache[i] if i in self.cache else try_render(self.processor, self.view, self.samples[i], i, self.cfg)
        if isinstance(r, str):  # it rendered at start-up: the files changed under us
            raise RuntimeError(f"sample {r} could be read at start-up but no longer")
        return r


# --------------------------------------------------------------------------- one optimizer step
def train_step(engine, model, optimizer, micro, pad_id, cfg, d, autocast):
    """Forward/backward over this rank's micro-batches (synced on the last), clip, step (skipped when the loss or the
    norm is not finite). Returns (mean NLL per policy token, grad norm before clipping, policy tokens, tokens)."""
    fsdp = cfg.parallel == "fsdp" and d.world > 1
    counts = torch.tensor([sum(sum(r.policy_mask[1:]) for mb in micro for r in mb),  # policy tokens, all tokens
                           sum(len(r.input_ids) for mb in micro for r in mb)], dtype=torch.float64, device=d.device)
    if d.world > 1:
        dist.all_reduce(counts)
    n_policy, n_tokens = counts.tolist()
    nll = torch.zeros((), dtype=torch.float64, device=d.device)
    model.train()
    for j, mb in enumerate(micro):
        last = j == len(micro) - 1
        if fsdp:
            engine.set_requires_gradient_sync(last)
        sync = engine.no_sync() if d.world > 1 and not fsdp and not last else nullcontext()
        batch = batch_to(collate(model, mb, pad_id), d.device)
        with sync, autocast:
            loss_sum = engine(batch)
            # DDP and FSDP2 average gradients over ranks: scale by world to get the global-token mean
            (loss_sum * d.world / max(n_policy, 1.0)).backward()
        nll += loss_sum.detach().double()
    if d.world > 1:
        dist.all_reduce(nll)
    loss, grad_norm = nll.item() / max(n_policy, 1.0), float("nan")
    if math.isfinite(loss):
        params = [p for p in engine.parameters() if p.requires_grad]
        gn = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        grad_norm = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
        if math.isfinite(grad_norm):
            optimizer.step()
    return loss, grad_norm, n_policy, n_tokens


# --------------------------------------------------------------------------- main
def main(argv=None):
    cfg = parse_config(Config, sys.argv[1:] if argv is None else list(argv))  # a bare --resume is --resume=true
    cfg.out = cfg.out or "runs/sft"
    d = compute_init(cfg.seed)
    if d.device.type == "cpu" and cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    world = d.world
    assert cfg.parallel in ("ddp", "fsdp"), f"--parallel must be ddp or fsdp, got {cfg.parallel!r}"
    assert cfg.batch_size % (world * cfg.micro_batch_size) == 0, \
        f"batch_size {cfg.batch_size} must divide into {world} ranks x micro_batch_size {cfg.micro_batch_size}"
    if cfg.resume:
        checkpoint.recover(cfg.out, d)
    checkpoint.check_writable(cfg.out)  # every rank, before any rendering or warm-up (all ranks stop alike)

    # ---- model
    init = cfg.out if cfg.resume else (cfg.init or cfg.model)
    model, processor = load_model(init, d.device, dtype=torch.float32, grad_ckpt=cfg.grad_ckpt)
    given = given_keys(sys.argv[1:] if argv is None else argv)
    for k, v in follow_layout(init, asdict(view_from(cfg)), given, print0).items():  # the layout it learnt
        setattr(cfg, k, v)
    view = view_from(cfg)

    data = Data(cfg, d, processor, view, model)

    # ---- optimisation
    steps_per_epoch = len(data.keep) // cfg.batch_size
    total = cfg.steps or max(1, int(cfg.epochs * steps_per_epoch))
    print0(f"{len(data.keep)} samples ({data.skipped} skipped), {steps_per_epoch} steps/epoch, {total} steps, "
           f"world {world} ({cfg.parallel}), model {init}")
    engine = wrap(PolicyNLL(model), model, d, cfg.parallel, cfg.bf16)
    params = [p for p in engine.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([dict(params=decay, weight_decay=cfg.weight_decay),
                                   dict(params=no_decay, weight_decay=0.0)], lr=cfg.lr, betas=(0.9, cfg.beta2))
    step, nonfinite = 0, 0
    if cfg.resume:
        st = checkpoint.resume(cfg.out, engine, optimizer, d, cfg, print0)
        step, nonfinite = st["step"], st["nonfinite_steps"]
        print0(f"resumed from {cfg.out} at step {step}")
    metrics = checkpoint.Metrics(cfg.out, step, d, cfg, cfg.wandb)
    fsdp = cfg.parallel == "fsdp" and world > 1  # FSDP2 casts through its MixedPrecisionPolicy instead
    bf16 = cfg.bf16 and d.device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 and not fsdp else nullcontext()
    end = min(total, cfg.stop_at) if cfg.stop_at else total
    bar = tqdm(total=total, initial=step, desc="sft", disable=not d.is_main, dynamic_ncols=True)
    orders = {}
    while step < end:
        t0 = time.time()
        lr = cfg.lr * lr_at(step, total, cfg.warmup_steps, cfg.min_lr_ratio)
        for g in optimizer.param_groups:
            g["lr"] = lr
        epoch, b = divmod(step, steps_per_epoch)
        if epoch not in orders:
            orders = {epoch: epoch_batches(data.lengths, cfg, epoch)}
        mine = orders[epoch][b][d.rank::world]  # rank-strided share of the (length-sorted) global batch
        micro = [[data.rendered(k) for k in mine[j:j + cfg.micro_batch_size]]
                 for j in range(0, len(mine), cfg.micro_batch_size)]
        loss, grad_norm, n_policy, n_tokens = train_step(engine, model, optimizer, micro,
                                                         processor.tokenizer.pad_token_id, cfg, d, autocast)
        ok = math.isfinite(loss) and math.isfinite(grad_norm)
        if not ok:
            nonfinite += 1
            print0(f"warning: step {step + 1}: non-finite loss {loss} / grad norm {grad_norm}: update skipped")
        optimizer.zero_grad(set_to_none=True)
        step += 1
        dt = time.time() - t0
        row = dict(step=step, epoch=round(step / steps_per_epoch, 3), loss=loss, lr=lr, grad_norm=grad_norm,
                   policy_tokens=int(n_policy), tokens=int(n_tokens), skipped_update=not ok,
                   nonfinite_steps=nonfinite, skipped_samples=data.skipped,
                   tokens_per_s=round(n_tokens / dt, 1), step_time=round(dt, 3))
        metrics.log(row)
        if d.is_main:
            bar.update(1)
            bar.write(f"step {step:5d}/{total} | loss {loss:.4f} | lr {lr:.2e} | gnorm {grad_norm:.3f} | "
                      f"{n_tokens / dt:7.0f} tok/s | {dt:.2f}s" + (" | SKIPPED" if not ok else ""))
        if step == end or (cfg.save_every and step % cfg.save_every == 0):
            checkpoint.save(cfg.out, model, processor, engine, optimizer, dict(
                step=step, epoch=epoch, batch_in_epoch=b + 1, nonfinite_steps=nonfinite, config=cfg), view, d)
    bar.close()
    metrics.close()
    print0(f"done: step {step}/{total}, checkpoint in {cfg.out}")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
