"""--dry_run: does a run fit? What eval.py or train_grpo.py needs per GPU, from the model's config and the first
sample's video headers alone (no weights are loaded, nothing is written):

    python train_grpo.py --init=Qwen/Qwen2.5-VL-7B-Instruct --dry_run=true --gpus=8 ...   # the run's own flags

Each term is an estimate of what the code keeps alive (bf16, flash_attention_2 when installed, else sdpa, as model.py
picks on CUDA), held against a measurement on tiny configs in tests/test_memory.py: the weights (the bf16 policy of
the rollout, fp32 shards, grads, AdamW, the reference, FSDP2's gathered units); the rollout's KV cache at max_rows;
the prefill/append transient of one prefill_chunk forward or of the vision tower on one piece; the update's peak
(one micro-batch with gradient checkpointing, the LM head in chunks); the host RAM of pixel values and frames.
"""
import numpy as np
import torch

from data import Renderer, global_times
from model import build_tiny_processor, pick_attention, tiny_model_config
from kvcache import capacity
from tools import LONGVT_OK
from video import VideoError, fit_size, video_info

GIB = 2 ** 30
RESERVE = 2 * GIB  # the CUDA context and the allocator's fragmentation, held back from every GPU
LM_CHUNK = 1024    # policy tokens per LM-head chunk (model.token_logprobs)


def load_config(name):
    """(HF config, processor, note) of `name`: "tiny", a checkpoint dir or an HF id; its config only."""
    if name == "tiny":
        proc = build_tiny_processor()
        return tiny_model_config(proc.tokenizer), proc, ""
    from transformers import AutoConfig, AutoProcessor
    config = AutoConfig.from_pretrained(name)
    try:
        return config, AutoProcessor.from_pretrained(name), ""
    except (OSError, ValueError):  # a bare config.json: Qwen-VL's patching, the tiny tokenizer for the text
        return config, build_tiny_processor(), " (text counted with the tiny tokenizer: no tokenizer in --model)"


def param_counts(config):
    """Parameter counts from a model built on the meta device: total, vision tower, the largest FSDP2 unit (a decoder
    layer or vision block) and the root unit (what no such unit holds: embeddings, LM head, norms, merger)."""
    from transformers import AutoModelForImageTextToText
    with torch.device("meta"):
        m = AutoModelForImageTextToText.from_config(config)
    units = [u for u in m.modules() if type(u).__name__ in m._no_split_modules]
    in_units = {id(p) for u in units for p in u.parameters()}
    total = sum(p.numel() for p in m.parameters())
    return dict(total=total, vision=sum(p.numel() for p in m.model.visual.parameters()),
                unit=max(sum(p.numel() for p in u.parameters()) for u in units),
                root=sum(p.numel() for p in m.parameters() if id(p) not in in_units))


def text_config(config):
    return getattr(config, "text_config", config)


def kv_per_token(config, nbytes=2):
    t = text_config(config)
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    return 2 * t.num_hidden_layers * t.num_key_value_heads * head_dim * nbytes


def kv_bytes(config, rows, tokens, nbytes=2):
    """Bytes of a kvcache.KVCache of `rows` rows holding `tokens` columns (its buffers, capacity included)."""
    return rows * capacity(tokens) * kv_per_token(config, nbytes)


def forward_transient(config, q, kv, rows, attn, nbytes=2, float_mask=False):
    """Peak bytes a no-grad forward of q query tokens (in all, over `rows` rows) against kv columns allocates beyond
    its inputs and the cache: the inputs' embeddings, the largest of a layer's attention and MLP phases, and for
    sdpa the (q, kv) boolean mask (with float_mask its fp32 copy too, as the CPU kernel makes) and the K/V repeated
    to every query head."""
    t = text_config(config)
    H, F, nh, nkv = t.hidden_size, t.intermediate_size, t.num_attention_heads, t.num_key_value_heads
    hd = getattr(t, "head_dim", None) or H // nh
    hidden = 3 * q * H * nbytes                               # embeddings, residual, normed input
    attn_phase = q * (2 * nh + 3 * nkv) * hd * nbytes         # q, k, v, their rotated copies, the output
    mask = 0
    if attn != "flash_attention_2":
        mask = q * kv * (1 + (4 if float_mask else 0))
        if nh > nkv:
            attn_phase += 2 * rows * nh * kv * hd * nbytes    # repeat_kv of K and V for grouped-query heads
    mlp = 3 * q * F * nbytes                                  # act(gate), up, their product
    return hidden + mask + max(attn_phase, mlp)


def vision_transient(config, patches, nbytes=2, pixel_copy=6):
    """Peak bytes of the vision tower on `patches` 14x14 patches (no grad): pixel_copy bytes per pixel value (on the
    GPU the fp32 copy to the device and its bf16 cast: 6; the CPU run measures one fp32 copy: 4), then the largest of a block's phases (the gated MLP; the attention runs per frame or window)."""
    v = config.vision_config
    pixels = patches * 3 * v.temporal_patch_size * v.patch_size ** 2 * pixel_copy
    attn = 10 * v.hidden_size  # qkv, the rotated q and k and their temporaries, per-window outputs, their cat, residual
    mlp = 2 * v.hidden_size + 4 * v.intermediate_size  # input, residual, gate, up, act(gate), product
    return pixels + patches * nbytes * max(attn, mlp)


def update_saved(config, tokens, policy_tokens, patches, freeze_vision, nbytes=2):
    """Bytes one micro-batch's forward leaves saved for the backward with gradient checkpointing: each decoder layer's
    input, the embeddings, the final norm's input and output (fp32 inside), the hidden states the LM-head chunks
    keep, and, unless frozen, each vision block's input and the tower's other saved tensors."""
    t, v = text_config(config), config.vision_config
    H = t.hidden_size
    saved = (t.num_hidden_layers + 2) * tokens * H * nbytes + tokens * H * 4 + policy_tokens * H * nbytes
    if not freeze_vision:  # + the patch embedding, the window reordering, the merger's norm, MLP and reordering
        saved += (v.depth + 6) * patches * v.hidden_size * nbytes
    return saved


def update_recompute(config, tokens, patches, freeze_vision, nbytes=2):
    """The backward's transient beyond the saved tensors: one decoder layer recomputed with its graph (fp32 norms,
    q/k/v, attention, the MLP's four (T, F) tensors) and its gradients, or one vision block's, and one LM-head chunk's
    fp32 logits, softmax and gradient."""
    t, v = text_config(config), config.vision_config
    H, F, hd = t.hidden_size, t.intermediate_size, getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    layer = tokens * (4 * H * 4 + (2 * t.num_attention_heads + 2 * t.num_key_value_heads) * hd * nbytes
                      + 6 * F * nbytes)
    block = 0 if freeze_vision else patches * (4 * v.hidden_size * 4 + 6 * v.intermediate_size * nbytes)
    return max(layer, block) + 3 * LM_CHUNK * t.vocab_size * 4


def episode(proc, config, sample, view, rc):
    """Token counts from the first sample's video headers (blank frames of its size): prompt, one full crop
    observation, an episode at most; and the vision patches of each."""
    note = ""
    try:
        info = video_info(sample["video"])
        width, height, duration = info["width"], info["height"], sample.get("duration") or info["duration"]
    except VideoError:  # the data may live elsewhere: square frames of the pixel budget
        width = height = int(view.max_pixels ** 0.5)
        duration, note = float(sample.get("duration") or 600.0), " (video not found: square frames)"
    r = Renderer(proc, view)
    times = global_times(duration, view)
    w, h = fit_size(width, height, view.max_pixels)
    p = r.prompt(dict(sample, duration=duration), np.zeros((len(times), h, w, 3), np.uint8), times)
    cw, ch = fit_size(width, height, view.crop_max_pixels)
    n = view.crop_max_frames
    c = r.observation(dict(frames=np.zeros((n, ch, cw, 3), np.uint8), timestamps=[float(i) for i in range(n)],
                           text=LONGVT_OK))
    patches = lambda x: sum(len(x.vision[k]) for k in ("pixel_values", "pixel_values_videos") if k in x.vision)  # noqa
    prompt, crop = len(p.input_ids), len(c.input_ids)
    episode = prompt + rc.max_turns * (rc.max_new_tokens + crop) + rc.max_new_tokens
    # a chunk's shared time axis: the episode at most, and never past max_total_tokens + one observation and one turn
    # (the rollout compacts the holes before an append that would cross the budget)
    axis = min(episode, rc.max_total_tokens + crop + rc.max_new_tokens + 1)
    return dict(prompt=prompt, crop=crop, episode=episode, axis=axis,
                prompt_patches=patches(p), crop_patches=patches(c), frames=len(times), size=(w, h), crop_size=(cw, ch),
                duration=duration, note=note, frame_bytes=w * h * 3)


def estimate(config, counts, ep, rc, rows, gpus, train=None, attn="flash_attention_2", max_rows=None):
    """Bytes per GPU of each term at max_rows (default rc.max_rows; 0 = all `rows`). train: train_grpo's Config
    (None: eval, rollout only)."""
    k = rc.max_rows if max_rows is None else max_rows
    live = min(rows, k) if k > 0 else rows
    t = text_config(config)
    N = counts["total"]
    out = dict(live=live)
    if train is None:
        out.update(policy=2 * N, shards=0, grads=0, adam=0, ref=0, gathered=0)
    else:
        Nt = N - (counts["vision"] if train.freeze_vision else 0)
        fsdp = gpus > 1 and train.parallel == "fsdp"
        g = gpus if fsdp else 1
        out.update(policy=2 * N if fsdp else 0, shards=4 * N / g, grads=4 * Nt / g, adam=8 * Nt / g,
                   ref=2 * N / g if train.kl_coef > 0 else 0,
                   gathered=2 * (2 * counts["unit"] + counts["root"]) if fsdp else 0)
    kv = kv_bytes(config, live, ep["axis"])
    out["kv"] = kv * (1 + 1 / t.num_hidden_layers) + kv_bytes(config, 1, ep["prompt"])  # a layer grown, a prompt's
    widest = max(ep["prompt"], live * ep["crop"])  # query tokens of a prompt's prefill or of one append, unchunked
    q = min(rc.prefill_chunk, widest) if rc.prefill_chunk > 0 else widest
    merge = config.vision_config.spatial_merge_size ** 2  # patches per vision token
    patches = min(q, ep["prompt_patches"] // merge) * merge if rc.prefill_chunk > 0 else ep["prompt_patches"]
    out["transient"] = max(forward_transient(config, q, ep["axis"], live, attn), vision_transient(config, patches))
    out["rollout"] = out["policy"] + out["shards"] + out["adam"] + out["ref"] + out["kv"] + out["transient"] + RESERVE
    out["update"] = 0
    if train is not None:
        T = min(rc.max_total_tokens, ep["episode"])
        crops = min(rc.max_turns, max(0, T - ep["prompt"]) // max(ep["crop"], 1))
        B = train.micro_batch
        vis = B * (ep["prompt_patches"] + crops * ep["crop_patches"])
        policy_tokens = B * min(T - ep["prompt"], (rc.max_turns + 1) * rc.max_new_tokens)
        saved = update_saved(config, B * T, policy_tokens, vis, train.freeze_vision)
        recompute = update_recompute(config, B * T, vis, train.freeze_vision)
        if not train.grad_ckpt:  # every layer's graph is kept, not just its input
            saved += (t.num_hidden_layers - 1) * recompute
        out.update(saved=saved, recompute=recompute, tokens=T,
                   update=out["shards"] + out["grads"] + out["adam"] + out["ref"] + out["gathered"] + saved + recompute
                   + RESERVE)
    prompts = -(-rows // max(train.group_size, 1)) if train is not None else rows
    px = 3 * config.vision_config.temporal_patch_size * config.vision_config.patch_size ** 2 * 4  # fp32 per patch
    out["host"] = (prompts * ep["prompt_patches"] + rows * rc.max_turns * ep["crop_patches"]) * px \
        + prompts * ep["frames"] * ep["frame_bytes"]
    return out


def dry_run(name, sample, view, rc, rows, gpus=1, gpu_memory_gib=80.0, train=None):
    """The dry run's text: each term per GPU and one verdict line (a `--max_rows` that fits, when the one given
    does not)."""
    config, proc, note = load_config(name)
    counts = param_counts(config)
    ep = episode(proc, config, sample, view, rc)
    attn = pick_attention("cuda")
    est = estimate(config, counts, ep, rc, rows, gpus, train, attn)
    cap = gpu_memory_gib * GIB
    g = lambda b: f"{b / GIB:.1f}"  # noqa: E731
    t = text_config(config)
    lines = [f"dry run of {name}{note}{ep['note']}: {counts['total'] / 1e9:.2f}B parameters, per GPU of {gpus}, "
             f"attention {attn}",
             f"  prompt: {ep['prompt']} tokens ({ep['frames']} frames of {ep['size'][0]}x{ep['size'][1]}, a "
             f"{ep['duration']:.0f}-s video); one crop observation: {ep['crop']} tokens ({view.crop_max_frames} frames "
             f"of {ep['crop_size'][0]}x{ep['crop_size'][1]})",
             f"  an episode at most: {ep['prompt']} + {rc.max_turns} x ({rc.max_new_tokens} + {ep['crop']}) + "
             f"{rc.max_new_tokens} = {ep['episode']} tokens; a chunk's time axis at most {ep['axis']} (a row stops at "
             f"max_total_tokens={rc.max_total_tokens}; holes are compacted past it)",
             f"  KV cache: {kv_per_token(config) / 1024:.1f} KiB per token ({t.num_hidden_layers} layers x "
             f"{t.num_key_value_heads} KV heads x K,V x bf16) -> {g(kv_bytes(config, 1, ep['axis']))} GiB per row",
             f"  weights: bf16 policy {g(est['policy'])} GiB (rollout), fp32 shards {g(est['shards'])}, grads "
             f"{g(est['grads'])}, AdamW {g(est['adam'])}, reference {g(est['ref'])}, gathered units "
             f"{g(est['gathered'])} (update)",
             f"  rollout: {est['live']} of {rows} rows at once (--max_rows={rc.max_rows}): KV {g(est['kv'])} GiB, "
             f"prefill/append transient {g(est['transient'])} GiB (--prefill_chunk={rc.prefill_chunk})"]
    if train is not None:
        lines.append(f"  update: {train.micro_batch} episode(s) of {est['tokens']} tokens per micro-batch: saved "
                     f"{g(est['saved'])} GiB, recompute {g(est['recompute'])} GiB (--grad_ckpt={train.grad_ckpt}, "
                     f"--freeze_vision={train.freeze_vision})")
    lines.append(f"  host RAM per rank: {g(est['host'])} GiB (pixel values, decoded frames); {g(RESERVE)} GiB of "
                 f"each GPU held back for the CUDA context")
    head = f"per GPU ({gpus} GPUs, {gpu_memory_gib:g} GiB): rollout peak {g(est['rollout'])} GiB, update peak " \
           f"{g(est['update'])} GiB"
    if est["rollout"] <= cap and est["update"] <= cap:
        return "\n".join(lines + [head + ": fits"])
    fit = [k for k in range(rows, 0, -1) if estimate(config, counts, ep, rc, rows, gpus, train, attn, k)["rollout"]
           <= cap]
    if est["update"] > cap or not fit:
        if est["update"] > cap and train is not None:
            lines.append("  the update does not fit: --grad_ckpt=true, --freeze_vision=true, --micro_batch=1, more "
                         "GPUs (FSDP2), or a shorter --max_total_tokens")
        return "\n".join(lines + [head + ": does not fit at any --max_rows"])
    return "\n".join(lines + [head + f": does not fit (fits with --max_rows={fit[0]})"])
