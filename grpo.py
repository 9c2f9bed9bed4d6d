"""The GRPO algorithm, one step's math: group advantages (GRPO, Dr. GRPO, DGRPO), the clipped surrogate with verl's
switches (token or sequence ratios, dual clip, k3 KL, four loss aggregations), and the update over micro-batches.
train_grpo.py plays the rollouts and calls these; each is tested by hand in tests/test_grpo.py.

A step's rollouts are `groups`: [(group_size trajectories of one prompt, [(reward, components)] of each)].
"""
import math
from contextlib import nullcontext

import numpy as np
import torch

from data import collate
from model import all_gather_obj, all_sum
from reward import answer_type

LOSS_AGGS = ("global-token-mean", "token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def group_advantages(rewards, adv_norm="std", eps=1e-6):
    """rewards (P, G) -> advantages (P, G): r - group mean, / (the group's unbiased std + eps) for "std"; Dr. GRPO
    ("none") drops the division, which up-weights prompts whose rollouts barely differ. Equal rewards -> 0. A group
    of one gets its raw reward, as verl's (mean 0, std 1 there); train_grpo refuses group_size < 2."""
    if rewards.shape[1] < 2:
        return rewards.clone()
    adv = rewards - rewards.mean(1, keepdim=True)
    return adv / (rewards.std(1, keepdim=True) + eps) if adv_norm == "std" else adv


def aggregate(per_token, mask, mode, denom, budget):
    """A micro-batch's (B, T) token losses -> its share of the mini-batch loss. verl's modes: the micro-batch's token
    mean ("token-mean"), its mean of per-sequence token means ("seq-mean-token-mean") or its sum of per-sequence
    token sums / `budget` ("seq-mean-token-sum-norm": verl divides by its fixed padded response length; ours, the
    policy-token budget max_new_tokens x (max_turns + 1)), each / denom = the micro-batches of the mini-batch, as
    verl's gradient accumulation does (and DDP averages the ranks). "global-token-mean" (DAPO's, this project's
    default): the token sum / denom = the mini-batch's policy tokens on all ranks / ranks."""
    if mode == "global-token-mean":
        return per_token.sum() / denom
    if mode == "token-mean":
        return per_token.sum() / mask.sum().clamp(min=1) / denom
    if mode == "seq-mean-token-mean":
        return (per_token.sum(1) / mask.sum(1).clamp(min=1)).mean() / denom
    return per_token.sum() / budget / denom


def grpo_loss(logp, old_logp, ref_logp, adv, mask, cfg, denom):
    """Clipped surrogate + k3 KL on the policy tokens of one micro-batch (verl's core_algos, switch by switch).
    logp, old_logp, ref_logp, mask: (B, T); adv: (B,); denom: see aggregate. Returns (loss, sums of kl, clipped
    tokens, tokens)."""
    mask = mask.float()
    a = adv[:, None]                                                          # (B, 1)
    budget = cfg.max_new_tokens * (cfg.max_turns + 1)
    if cfg.ratio_level == "sequence":  # GSPO (verl's): the sequence's mean log-ratio, its value per token with each
        seq = ((logp - old_logp) * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)  # token's
        log_ratio = (logp - logp.detach() + seq.detach()).clamp(max=10.0)     # gradient, clamped at 10
        agg_pg = "seq-mean-token-mean"                                        # whatever loss_agg is; no dual clip
    else:
        log_ratio = ((logp - old_logp) * mask).clamp(-20.0, 20.0)            # (B, T), verl's clamp before exp
        agg_pg = cfg.loss_agg
    ratio = log_ratio.exp()                                                   # (B, T)
    # With one on-policy update per step, old_logp == logp: ratio == 1 and the clip is inert (the loss is
    # REINFORCE with a group baseline). Clipping bites from the 2nd mini-batch or epoch of a step on.
    surr = torch.min(ratio * a, ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high) * a)  # (B, T)
    pg = -surr
    if cfg.clip_ratio_c > 0 and cfg.ratio_level != "sequence":  # dual clip (verl): for A < 0 a token's loss is at
        pg = torch.where(a < 0, torch.min(pg, -a * cfg.clip_ratio_c), pg)  # most -A x c: a far off-policy token stops
    loss = aggregate(pg * mask, mask, agg_pg, denom, budget)                  # pulling
    kl = torch.zeros_like(pg)
    if cfg.kl_coef > 0:  # k3 = exp(ref - logp) - (ref - logp) - 1: unbiased, >= 0, low variance
        d = ((ref_logp - logp) * mask).clamp(-20, 20)                        # verl's clamps of the log-ratio and k3
        kl = (d.exp() - d - 1).clamp(-10, 10)                                 # (B, T)
        loss = loss + cfg.kl_coef * aggregate(kl * mask, mask, cfg.loss_agg, denom, budget)
    clipped = ((surr < ratio * a).float() * mask).sum()  # tokens whose clipped branch is the active one
    return loss, dict(kl=(kl * mask).sum().item(), clipped=clipped.item(), tokens=mask.sum().item())


def dgrpo_weights(acc_group, acc_task, cfg):
    """(P,) group mean accuracy, (P,) batch mean accuracy of the sample's task type -> (P,) advantage scales."""
    return (1 + cfg.dgrpo_task * (0.5 - acc_task)) * (1 + cfg.dgrpo_sample * (0.5 - acc_group))


def is_flat(rs):
    """A group whose rewards are all equal: advantage 0, no signal."""
    return max(r for r, _ in rs) == min(r for r, _ in rs)


def advantages(groups, cfg):
    """(P, G) advantages of this rank's groups: group_advantages, scaled by DGRPO's weights when it is on (the task
    accuracies are over every rank's groups)."""
    rewards = torch.tensor([[r for r, _ in rs] for _, rs in groups], dtype=torch.float64).view(-1, cfg.group_size)
    adv = group_advantages(rewards, cfg.adv_norm)                                          # (P, G)
    if cfg.dgrpo_task or cfg.dgrpo_sample:
        acc = torch.tensor([[c.get("accuracy", 0.0) for _, c in rs] for _, rs in groups]).view(-1, cfg.group_size)
        acc = acc.mean(1)                                                                  # (P,)
        types = [answer_type(g[0].sample) for g, _ in groups]
        every = [x for part in all_gather_obj(list(zip(types, acc.tolist()))) for x in part]  # all ranks' groups
        acc_task = torch.tensor([np.mean([a for u, a in every if u == t]) for t in types])     # (P,)
        adv = adv * dgrpo_weights(acc, acc_task, cfg).double()[:, None]
    return adv


def micro_batches(rows, spare, cfg, d):
    """rows [(trajectory, advantage)] -> mini_batches lists of micro-batches (dicts of trajectories and numbers; the
    tensors are collated when one runs). Every rank runs the same number (forward and backward issue collectives): a
    rank short of rows runs a copy of `spare` (one of its episodes) with loss weight 0; none at all when some rank
    has no episode (all of its prompts were skipped)."""
    M, mb = cfg.mini_batches, cfg.micro_batch
    minis = [rows[k * len(rows) // M:(k + 1) * len(rows) // M] for k in range(M)]
    n_micro = all_sum([math.ceil(len(p) / mb) for p in minis], d.device, "max")
    can_update = all_sum([spare is not None], d.device)[0] == d.world
    out = []
    for part, n in zip(minis, n_micro):
        out.append([])
        for i in range(int(n) if can_update else 0):
            chunk = part[i * mb:(i + 1) * mb]
            out[-1].append(dict(trajs=[t for t, _ in chunk or [(spare, 0.0)]], rows=len(chunk),
                                adv=torch.tensor([a for _, a in chunk] or [0.0]), weight=float(bool(chunk)),
                                tokens=sum(sum(t.policy_mask) for t, _ in chunk)))
    return out


def batch(m, hf, pad):
    """A micro-batch's tensors (vision included), with its old/ref log-probs once computed."""
    b = collate(hf, [t.rendered() for t in m["trajs"]], pad)
    return dict(b, **{k: m[k] for k in ("adv", "weight", "old", "ref") if k in m})


def update(net, ref, opt, micro, cfg, d, hf, pad):
    """ppo_epochs x mini-batches optimizer steps, gradients accumulated over micro-batches and synced on the last.
    Old log-probs come from a no-grad pass first, except for one epoch of one mini-batch (on-policy: old = the
    training forward's, detached: one forward fewer); ref log-probs too when a reference is loaded. Returns sums:
    kl, clipped, tokens, ent, gnorm, updates, nonfinite, err (the on-policy check: 0 unless the forward is
    nondeterministic)."""
    dev, fsdp = d.device, d.world > 1 and cfg.parallel == "fsdp"
    st = dict(kl=0.0, clipped=0.0, tokens=0.0, ent=0.0, gnorm=0.0, updates=0, nonfinite=0, err=0.0)
    on_policy = cfg.ppo_epochs == 1 and cfg.mini_batches == 1
    with torch.no_grad():
        for m in (m for items in micro for m in items):
            b = batch(m, hf, pad)
            if not on_policy:
                m["old"], ent = net(b, with_entropy=True)
                st["ent"] += (ent * b["policy_mask"].to(dev)).sum().item() * b["weight"]  # as 1 epoch's
            m["ref"] = ref(b)[0] if ref is not None else None
    for epoch in range(cfg.ppo_epochs):
        for k, items in enumerate(micro):
            tokens = all_sum([sum(m["tokens"] for m in items)], dev)[0]
            if not tokens:
                continue
            # global-token-mean: the mini-batch's tokens on all ranks / ranks (DDP/FSDP average the ranks);
            # verl's modes: the micro-batches of the mini-batch (the same number on every rank)
            denom = tokens / d.world if cfg.loss_agg == "global-token-mean" else len(items)
            for j, m in enumerate(items):
                last, b = j == len(items) - 1, batch(m, hf, pad)
                if fsdp:
                    net.set_requires_gradient_sync(last)
                with nullcontext() if last or not hasattr(net, "no_sync") else net.no_sync():
                    logp, ent = net(b, with_entropy=on_policy)
                    mask = b["policy_mask"].to(dev) * b["weight"]
                    if on_policy:
                        b["old"] = m["old"] = logp.detach()
                        st["ent"] += (ent * mask).sum().item()
                    loss, s = grpo_loss(logp, b["old"], b["ref"], b["adv"].to(dev), mask, cfg, denom)
                    loss.backward()
                st.update({key: st[key] + v for key, v in s.items()})
                if epoch == 0 and k == 0:
                    st["err"] = max(st["err"], ((logp - b["old"]).abs() * mask).max().item())
            gnorm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            gnorm = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
            if math.isfinite(gnorm):  # the same global norm on every rank: all step, or all skip and log it
                opt.step()
                st.update(gnorm=st["gnorm"] + gnorm, updates=st["updates"] + 1)
            st["nonfinite"] += not math.isfinite(gnorm)
            opt.zero_grad(set_to_none=True)
    return st
