"""Build or load the policy and its processor; run setup for torchrun; checkpoints; per-token log-probs.

    from model import load_model, compute_init
    model, processor = load_model("tiny")                       # built-in tiny Qwen2.5-VL, seeded
    model, processor = load_model("Qwen/Qwen2.5-VL-7B-Instruct") # or a local dir: any Qwen2/2.5/3-VL checkpoint

`tiny` is a randomly initialised Qwen2.5-VL-architecture model with a tokenizer built in code: whole words
of the prompts are single tokens (with and without the space before them), numbers are written digit by digit,
anything else falls back to single characters (lossless for ASCII and Latin-1; any other character becomes
<unk>), plus Qwen's special and tool tokens. Why digits: a window the policy writes is copied from the
timestamps in its prompt, and with ten digit tokens every timestamp of a 15-minute eval video is made of pieces
the model saw in training on 3-5 minute videos (one token per number leaves the tokens of times above 300 s
untrained); with the round-time global view (data.ViewConfig.time_grid) the window copy is learned much sooner
(docs/studies.md, the grounding study, measured both).
"""
import json
import math
import os
import random
import re
import sys
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.distributed as dist

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|video_pad|>", "<|image_pad|>"]
TOOL_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
               "<think>", "</think>", "<answer>", "</answer>"]
# Whole-word tokens of the tiny tokenizer: the words of our prompts, tool protocol and needle questions.
# Words not listed still encode losslessly, one character per token.
WORDS = """
a an the is are was were be been it its this that these those of in on at to from for with by and or not no as if
then than so what which who when where how why do does did can could should would will may might must there here
you your i we they he she me my our video videos frame frames second seconds time times start end scene scenes colour
color colours square squares small appears appear appeared appearing visible shows shown show see seen look looking
during before after between while first last next previous answer answers question questions think thinking tool
tools call calls function functions crop_video crop cropped window windows view global dense sampled sample samples
timestamps timestamp returned result results executed successfully failed execution error name arguments
start_time end_time video_path type object number string properties required description parameters
red green blue yellow orange purple pink cyan magenta white black gray grey brown teal navy lime maroon olive
assistant user system helpful provided following given options option choose letter best reasoning reason step
need needed more available only once must within inside outside invalid empty long short range
please carefully final answered answering here processed use using used about around closely closer densely
default duration give greater misses moment optional part reply signature sparsely now wrong really args
flash flashes
""".split()
CHAT_TEMPLATE = (  # Qwen-style ChatML so saved checkpoints work with apply_chat_template / vLLM
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'text' %}{{ c['text'] }}{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@dataclass
class TinyConfig:
    hidden: int = 128        # text hidden size
    layers: int = 4          # decoder layers
    heads: int = 4           # attention heads (head_dim = hidden / heads)
    kv_heads: int = 2        # grouped-query KV heads
    ffn: int = 384           # MLP width
    vision_hidden: int = 64  # vision tower width
    vision_depth: int = 2    # vision blocks
    seed: int = 0            # init seed: the same tiny model on every rank and every run


# --------------------------------------------------------------------------- tokenizer / processor
def build_tiny_tokenizer():
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    base = set(WORDS)
    words = sorted(base | {w.capitalize() for w in base}, key=lambda w: (-len(w), w))
    chars = [chr(c) for c in range(32, 127)] + [chr(c) for c in range(160, 256)] + ["\n", "\t", "\r"]
    numbers = [str(i) for i in range(10)]  # numbers are written digit by digit (docs/studies.md)
    vocab = {}
    for t in ["<unk>"] + chars + numbers + words + [" " + w for w in words]:
        vocab.setdefault(t, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # A whole known word (longest first), else one character (a digit, too). A word keeps the space before it, so
    # prose costs one token per word.
    pattern = r" ?\b(?:" + "|".join(re.escape(w) for w in words) + r")\b|[\s\S]"
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tok.decoder = decoders.Fuse()  # concatenate pieces: decode(encode(s)) == s
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_TOKENS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<|endoftext|>",
                                   eos_token="<|im_end|>", chat_template=CHAT_TEMPLATE, model_max_length=1 << 20)


def build_tiny_processor():
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    # Frames are resized by our decoder already; the processors only normalise and patchify.
    pix = dict(min_pixels=28 * 28, max_pixels=1024 * 28 * 28)
    return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**pix), tokenizer=build_tiny_tokenizer(),
                               video_processor=Qwen2VLVideoProcessor(**pix, cap_pixels_per_frame=True),
                               chat_template=CHAT_TEMPLATE)


def tiny_model_config(tokenizer, cfg: TinyConfig = TinyConfig()):
    from transformers import Qwen2_5_VLConfig
    ids = tokenizer.convert_tokens_to_ids
    head_dim = cfg.hidden // cfg.heads
    half = head_dim // 2  # M-RoPE splits the rotary half-dim over (time, height, width)
    mrope = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=cfg.hidden, intermediate_size=cfg.ffn,
                         num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
                         max_position_embeddings=32768, rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                                             mrope_section=mrope),
                         bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
                         pad_token_id=ids("<|endoftext|>")),
        vision_config=dict(depth=cfg.vision_depth, hidden_size=cfg.vision_hidden, intermediate_size=2 * cfg.vision_hidden,
                           num_heads=2, out_hidden_size=cfg.hidden, fullatt_block_indexes=[cfg.vision_depth - 1],
                           window_size=112, tokens_per_second=2),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True)


# --------------------------------------------------------------------------- model
def pick_attention(device) -> str:
    if torch.device(device).type == "cuda":
        try:
            import flash_attn  # noqa: F401
            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def load_model(name="tiny", device="cpu", dtype=None, grad_ckpt=False, tiny: TinyConfig = TinyConfig()):
    """(model, processor). dtype defaults to bf16 on CUDA and fp32 on CPU."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    attn = pick_attention(device)
    if name == "tiny":
        processor = build_tiny_processor()
        config = tiny_model_config(processor.tokenizer, tiny)
        config._attn_implementation = attn
        from transformers import Qwen2_5_VLForConditionalGeneration
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(tiny.seed)
            model = Qwen2_5_VLForConditionalGeneration(config)
        model.to(dtype)
    else:
        if resolve_checkpoint(name) != name:  # a kill between atomic_dir's two renames left only <name>.old
            print0(f"note: {name} is missing; loading {resolve_checkpoint(name)}, the checkpoint a save left there "
                   f"when it was interrupted between its two renames")
            name = resolve_checkpoint(name)
        if not os.path.isdir(name) and os.path.exists(name):
            raise ValueError(f"--model={name}: not a directory (expected 'tiny', an HF id or a checkpoint dir)")
        processor = AutoProcessor.from_pretrained(name)
        model = AutoModelForImageTextToText.from_pretrained(name, dtype=dtype, attn_implementation=attn)
    model.to(device)
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # HF hooks every input embedding (the vision tower's patch embedding too) to make its output require grad,
        # for frozen-embedding (PEFT) training; non-reentrant checkpointing needs none of it, and with it a frozen
        # vision tower would still keep its activations and run its backward (tests/test_memory.py)
        model.disable_input_require_grads()
        model.config.use_cache = False
    return model, processor


def unwrap(model):
    """The bare HF model inside DDP (FSDP2 shards in place, so it needs no unwrapping)."""
    return model.module if hasattr(model, "module") else model


def rope_index(model, input_ids, mm_token_type_ids, image_grid_thw=None, video_grid_thw=None, second_per_grid_ts=None):
    """M-RoPE position ids (3, B, T) of unpadded sequences, from the model's own get_rope_index."""
    inner = unwrap(model).model
    kw = dict(image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw)
    if second_per_grid_ts is not None and "second_per_grid_ts" in inner.get_rope_index.__code__.co_varnames:
        kw["second_per_grid_ts"] = second_per_grid_ts
    pos, _ = inner.get_rope_index(input_ids, mm_token_type_ids=mm_token_type_ids, **kw)
    return pos


# --------------------------------------------------------------------------- log-probs
def token_logprobs(model, input_ids, attention_mask=None, position_ids=None, chunk=1024, with_entropy=False,
                   mask=None, temperature=1.0, **vision):
    """Log-prob of each token given its prefix: out[:, t] = log p(input_ids[:, t] | input_ids[:, :t]); out[:, 0] = 0.
    p is the distribution the rollout samples from at `temperature` (logits / temperature, as verl scores them).

    Runs the decoder once for hidden states and applies the LM head in chunks of `chunk` positions, so a
    full (B, T, V) fp32 tensor never exists. With `mask` (B, T), only positions where mask == 1 are scored
    (the rest are 0): the LM head is most of a small model's compute, and only policy tokens need it.
    Returns (logp (B, T), entropy (B, T) or None).
    It calls the bare model's submodules directly, so it bypasses a DDP/FSDP wrapper's forward hooks (no
    gradient all-reduce): under DDP/FSDP, wrap a module whose forward calls this (the trainers do)."""
    bare = unwrap(model)
    out = bare.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     use_cache=False, **vision)
    hidden = out.last_hidden_state  # (B, T, H)
    B, T = input_ids.shape
    want = torch.ones(B, T, dtype=torch.bool, device=input_ids.device) if mask is None else mask.bool()
    want = want.clone()
    want[:, 0] = False                       # nothing predicts the first token
    b_idx, t_idx = want.nonzero(as_tuple=True)  # (N,) target positions, scored from hidden[t - 1]
    logp = hidden.new_zeros(B, T, dtype=torch.float32)
    ent = hidden.new_zeros(B, T, dtype=torch.float32) if with_entropy else None
    # with gradient checkpointing each chunk's logits are recomputed in the backward too: the graph keeps (c, H)
    # hidden states per chunk instead of (c, V) fp32 logits (16k policy tokens x 152k vocab: 10 GB at 7B)
    ckpt = torch.is_grad_enabled() and hidden.requires_grad and getattr(bare, "is_gradient_checkpointing", False)
    for s in range(0, len(b_idx), chunk):
        b, t = b_idx[s:s + chunk], t_idx[s:s + chunk]
        h, target = hidden[b, t - 1], input_ids[b, t, None]
        if ckpt:
            from torch.utils.checkpoint import checkpoint
            lp, logits, lse = checkpoint(_head, bare.lm_head, h, target, temperature, use_reentrant=False)
        else:
            lp, logits, lse = _head(bare.lm_head, h, target, temperature)
        logp = logp.index_put((b, t), lp)
        if with_entropy:  # a metric: no graph (the training forward may ask for it too)
            with torch.no_grad():
                ent = ent.index_put((b, t), lse - (torch.softmax(logits, dim=-1) * logits).sum(-1))
    return logp, ent


def _head(lm_head, h, target, temperature):
    """(log-prob of each target (c,), the fp32 logits (c, V) / temperature, their logsumexp (c,))."""
    logits = lm_head(h).float()  # (c, V)
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)
    return logits.gather(-1, target).squeeze(-1) - lse, logits, lse


# --------------------------------------------------------------------------- run setup
@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    is_main: bool


def compute_init(seed=0) -> Dist:
    """Process group from torchrun's env vars (nccl on CUDA, gloo on CPU); also works without a launcher.
    Seeds python, numpy and torch with seed + rank so ranks sample different data."""
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)
    return Dist(rank, world, local, device, rank == 0)


def all_sum(values, device, op="sum"):
    """Element-wise sum (or max) of a list of numbers over ranks."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def all_gather_obj(obj):
    """[obj of each rank] ([obj] in one process)."""
    out = [obj] * (dist.get_world_size() if dist.is_initialized() else 1)
    if dist.is_initialized():
        dist.all_gather_object(out, obj)
    return out


def wrap(net, hf, d, parallel="ddp", bf16=True):
    """`net` (a module whose forward runs the HF model `hf`: the trainers' loss or log-prob module) for d.world
    ranks: DDP, or FSDP2 (fully_shard on each of hf's `_no_split_modules` (decoder layers, vision blocks), then net
    as the root; bf16 compute with fp32 reductions on CUDA when `bf16`). Wrap the module whose forward the step
    calls: DDP's and FSDP2's hooks run around its forward only. One process: net as it is."""
    if d.world == 1:
        return net
    cuda = d.device.type == "cuda"
    if parallel == "ddp":
        return torch.nn.parallel.DistributedDataParallel(net, device_ids=[d.local_rank] if cuda else None,
                                                         forward_sync_buffers=False)  # no buffer to sync
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    kw = dict(mp_policy=MixedPrecisionPolicy(torch.bfloat16, torch.float32)) if bf16 and cuda else {}
    for m in hf.modules():
        if type(m).__name__ in hf._no_split_modules:  # Qwen*VLDecoderLayer, Qwen*VLVisionBlock
            fully_shard(m, **kw)
    return fully_shard(net, **kw)


def lr_at(step, total, warmup_steps, min_lr_ratio=1.0):
    """The learning-rate multiplier of the optimizer step after `step` completed ones: linear warm-up over
    warmup_steps, then a cosine from 1 to min_lr_ratio at `total` (min_lr_ratio=1: constant, as GRPO's)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def print0(*a, **k):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **k, flush=True)


def expand_configs(argv):
    """argv with each `--config=<file.json>` (a JSON object of flags: a stage's checked-in settings, configs/)
    replaced by its `--key=value` pairs, in place: a flag after it wins."""
    out = []
    for arg in argv:
        if not arg.startswith("--config="):
            out.append(arg)
            continue
        path = arg.split("=", 1)[1]
        try:
            with open(path) as f:
                items = json.load(f)
        except (OSError, ValueError) as e:
            raise SystemExit(f"--config={path}: {e}") from None
        if not isinstance(items, dict):
            raise SystemExit(f"--config={path}: not a JSON object of flags")
        out += [f"--{k}=" + (str(v).lower() if isinstance(v, bool) else v if isinstance(v, str) else json.dumps(v))
                for k, v in items.items()]
    return out


def parse_config(cls, argv=None):
    """A `cls` dataclass from `--key=value` arguments (and `--config=<file.json>`: expand_configs), each cast to the
    field's type (a bare `--flag` sets a boolean field); unknown keys are an error."""
    argv = expand_configs(sys.argv[1:] if argv is None else argv)
    types = {f.name: f.type for f in fields(cls)}
    kw = {}
    for arg in argv:
        if arg.startswith("--") and "=" not in arg and types.get(arg[2:]) in (bool, "bool"):
            arg += "=true"  # a bare boolean flag: --resume
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"expected --key=value, got {arg!r}")
        key, val = arg[2:].split("=", 1)
        if key not in types:
            raise SystemExit(f"unknown option --{key}; known: {', '.join(sorted(types))}")
        t = types[key] if isinstance(types[key], type) else eval(types[key], {})  # annotations may be strings
        if t is bool:
            if val.lower() not in ("1", "0", "true", "false", "on", "off", "yes", "no"):
                raise SystemExit(f"--{key} takes true/false, got {val!r}")
            kw[key] = val.lower() in ("1", "true", "on", "yes")
        elif t in (int, float, str):
            try:
                kw[key] = t(val)
            except ValueError:
                raise SystemExit(f"--{key} takes a {t.__name__}, got {val!r}") from None
        else:
            kw[key] = json.loads(val)
    return cls(**kw)


def given_keys(argv):
    """The keys an argument list sets (`--key=value` or a bare `--flag`): the flags a user chose, which win over a
    checkpoint's view.json (data.follow_layout)."""
    return {a[2:].split("=")[0] for a in expand_configs(argv) if a.startswith("--")}


# --------------------------------------------------------------------------- checkpoints
def resolve_checkpoint(path):
    """A checkpoint dir, falling back to `<dir>.old` when a crash happened between the two renames of atomic_dir."""
    if not os.path.exists(path) and os.path.isdir(path.rstrip("/") + ".old"):
        return path.rstrip("/") + ".old"
    return path
