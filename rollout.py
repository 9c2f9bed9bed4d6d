"""The hand-written batched multi-turn generation loop, with tool observations appended to the live KV cache.

    from rollout import rollout, RolloutConfig
    trajs = rollout(model, processor, samples, group_size=8, cfg=RolloutConfig(), view=ViewConfig())

How it works (one call = a batch of P samples x G rows):
1. Each sample's prompt (system + long global view + question) is prefilled ONCE, left-padded in one batch,
   and its KV cache is copied to the sample's G rows (repeat_interleave): the global view is the expensive part.
2. Decode: one token per live row per step, sampled with a seeded generator (temperature, top-k, top-p).
   A row stops its turn at `</tool_call>`, `<|im_end|>`/EOS or the per-turn budget. Rows that are done with
   the episode leave the batch and the cache at once; rows waiting on a tool call feed attention-mask holes.
3. When every live row has stopped its turn, their calls run in a thread pool (tools.observe) and each row's
   observation chunk (data.Renderer.observation: frames + text) is appended to the SAME cache in one
   left-padded prefill, with explicit M-RoPE position ids from the model's get_rope_index shifted to the row's
   current position. Then decoding resumes.
Sampled ids are never re-tokenized. The log-prob recorded for each sampled token is under the model's own
distribution (temperature 1, no top-k/top-p), i.e. exactly what a full forward pass over the final sequence
gives, which the tests check. Departure from LongVT: after the last allowed tool call the model still gets
an answer turn (the observation says no more calls are available); LongVT ends the episode there.
"""
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import AutoConfig, AutoProcessor, DynamicCache

from data import (Rendered, Renderer, ViewConfig, cat_vision, global_times, global_view, model_vision, positions,
                  sample_duration)
from model import build_tiny_processor, tiny_model_config, unwrap
from tools import LONGVT_OK, ToolError, fit_size, observe, video_info


@dataclass
class RolloutConfig:
    max_turns: int = 5             # tool calls per episode (LongVT: 5); then one answer turn
    max_new_tokens: int = 256      # tokens per assistant turn
    max_total_tokens: int = 8192   # tokens per row, prompt and observations included
    temperature: float = 1.0       # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                 # 0 = off
    seed: int = 0                  # seeds the sampling generator
    workers: int = 4               # threads decoding videos (global views, crops)


@dataclass
class Trajectory:
    sample: dict
    input_ids: list = field(default_factory=list)
    policy_mask: list = field(default_factory=list)   # 1 on sampled tokens only
    logprobs: list = field(default_factory=list)      # sampling log-prob of each token (0 where mask is 0)
    mm_token_type_ids: list = field(default_factory=list)
    vision: dict = field(default_factory=dict)        # all vision inputs of the sequence, in order
    prompt_len: int = 0
    turns_text: list = field(default_factory=list)    # decoded text of each assistant turn
    turn_ids: list = field(default_factory=list)      # sampled ids of each assistant turn
    tool_calls: list = field(default_factory=list)    # {raw, window, error, timestamps} per call
    stop_reason: str = ""                             # answer | eos | length | turn_limit | skipped
    error: str | None = None                          # why a sample was skipped (missing/corrupt video)
    seconds: float = 0.0
    index: int = 0                                    # row index in the batch (group members are contiguous)

    @property
    def num_tool_calls(self):
        return len(self.tool_calls)

    def rendered(self):
        return Rendered(self.input_ids, self.policy_mask, self.mm_token_type_ids, self.vision)

    def extend(self, r: Rendered, logprobs=None):
        self.input_ids += r.input_ids
        self.policy_mask += r.policy_mask
        self.mm_token_type_ids += r.mm_token_type_ids
        self.logprobs += logprobs or [0.0] * len(r.input_ids)
        if r.vision:
            self.vision = cat_vision([self.vision, r.vision])


@dataclass
class Row:
    traj: Trajectory
    next_pos: int          # M-RoPE position of the next token (text positions are equal in all 3 axes)
    pending: int = -1      # last sampled token, not yet fed to the cache
    turn: list = field(default_factory=list)
    done: str = ""         # why this row's turn stopped: "tool" or a final stop reason


def sample_tokens(logits, cfg: RolloutConfig, gen, banned):
    """logits (B, V) -> tokens (B,), log-probs under the unmodified model distribution (B,)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    scores = logits.float().clone()
    scores[:, banned] = float("-inf")  # vision placeholders would break the vision/token alignment
    if cfg.temperature <= 0:
        tok = scores.argmax(-1)
    else:
        scores = scores / cfg.temperature
        if cfg.top_k > 0:
            kth = scores.topk(min(cfg.top_k, scores.shape[-1]), dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if cfg.top_p < 1.0:
            srt, idx = scores.sort(-1, descending=True)
            cum = srt.softmax(-1).cumsum(-1)
            drop = cum - srt.softmax(-1) > cfg.top_p  # keep the smallest prefix whose mass reaches top_p
            scores = scores.scatter(-1, idx, srt.masked_fill(drop, float("-inf")))
        tok = torch.multinomial(scores.softmax(-1), 1, generator=gen).squeeze(-1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


class Engine:
    """The state of one rollout batch: live rows, their shared KV cache and 2-D attention mask (holes = 0)."""

    def __init__(self, model, processor, cfg: RolloutConfig, view: ViewConfig):
        self.model, self.cfg, self.view = model, cfg, view
        self.renderer = Renderer(processor, view)
        tok = processor.tokenizer
        self.device = next(model.parameters()).device
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.tool_end = tok.convert_tokens_to_ids("</tool_call>")
        eos = unwrap(model).generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
        self.stops = set(eos) | {tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id} - {None}
        self.banned = tok.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"])
        self.gen = torch.Generator(self.device).manual_seed(cfg.seed)
        self.tok = tok

    @torch.no_grad()
    def forward(self, chunks, offsets):
        """Append left-padded chunks (one Rendered per live row) to the cache. Returns the last-position logits
        (B, V) and each row's next position: its last token's + 1 (chunks end with text, whose three M-RoPE axes
        are equal; not the maximum + 1, since a video's time axis can run past the text positions)."""
        L = max(len(c.input_ids) for c in chunks)
        B = len(chunks)
        ids = torch.full((B, L), self.pad, dtype=torch.long)
        att = torch.zeros(B, L, dtype=torch.long)
        pos = torch.zeros(3, B, L, dtype=torch.long)
        for b, (c, off) in enumerate(zip(chunks, offsets)):
            n = len(c.input_ids)
            ids[b, L - n:] = torch.tensor(c.input_ids)
            att[b, L - n:] = 1
            pos[:, b, L - n:] = positions(self.model, c) + off
        self.att = att if self.att is None else torch.cat([self.att, att], 1)
        vision = model_vision(cat_vision([c.vision for c in chunks]), self.device)
        out = self.model(input_ids=ids.to(self.device), attention_mask=self.att.to(self.device),
                         position_ids=pos.to(self.device), past_key_values=self.cache, use_cache=True,
                         logits_to_keep=1, **vision)
        return out.logits[:, -1], (pos[0, :, -1] + 1).tolist()

    def keep(self, idx, logits):
        """Drop rows that are finished from the batch and the cache."""
        if len(idx) == len(self.rows):
            return logits
        t = torch.tensor(idx, dtype=torch.long, device=self.device)
        self.cache.batch_select_indices(t)
        self.att = self.att[idx]
        self.rows = [self.rows[i] for i in idx]
        return logits[t]

    def run(self, samples, prompts, group_size):
        self.cache, self.att = DynamicCache(), None
        logits, starts = self.forward(prompts, [0] * len(prompts))  # one prefill per sample
        G = group_size
        self.cache.batch_repeat_interleave(G)
        self.att = self.att.repeat_interleave(G, 0)
        logits = logits.repeat_interleave(G, 0)
        self.rows = []
        for s, p, start in zip(samples, prompts, starts):
            for _ in range(G):
                t = Trajectory(sample=s, prompt_len=len(p.input_ids), index=len(self.rows))
                t.extend(p)
                self.rows.append(Row(t, start))
        finished = []
        while self.rows:
            logits = self.decode_turn(logits, finished)
            if not self.rows:
                break
            logits = self.tool_turn(finished)
        return finished

    def decode_turn(self, logits, finished):
        """Sample until every live row has stopped its turn; finished rows leave the batch at once."""
        cfg = self.cfg
        for r in self.rows:
            r.turn, r.done = [], ""
        for step in range(cfg.max_new_tokens):
            active = [i for i, r in enumerate(self.rows) if not r.done]
            tok, lp = sample_tokens(logits[active], cfg, self.gen, self.banned)
            for i, t, l in zip(active, tok.tolist(), lp.tolist()):
                r = self.rows[i]
                r.traj.extend(Rendered([t], [1], [0], {}), [l])
                r.turn.append(t)
                r.pending = t
                if t == self.tool_end and self.view.tools:
                    r.done = "tool" if r.traj.num_tool_calls < cfg.max_turns else "turn_limit"
                elif t in self.stops:
                    r.done = "answer"
                elif len(r.traj.input_ids) >= cfg.max_total_tokens or step == cfg.max_new_tokens - 1:
                    r.done = "length"
            keep = [i for i, r in enumerate(self.rows) if r.done in ("", "tool")]
            for r in self.rows:
                if r.done not in ("", "tool"):
                    self.finish(r, r.done, finished)
            logits = self.keep(keep, logits)
            if all(r.done for r in self.rows):
                return logits
            logits = self.step()
        return logits

    @torch.no_grad()
    def step(self):
        """Feed the pending token of every row still decoding; rows waiting for a tool get a hole. (B, V)"""
        live = [not r.done for r in self.rows]
        ids = torch.tensor([[r.pending if ok else self.pad] for r, ok in zip(self.rows, live)])
        pos = torch.tensor([r.next_pos for r in self.rows]).view(1, -1, 1).expand(3, -1, 1)
        self.att = torch.cat([self.att, torch.tensor(live, dtype=torch.long)[:, None]], 1)
        out = self.model(input_ids=ids.to(self.device), attention_mask=self.att.to(self.device),
                         position_ids=pos.to(self.device), past_key_values=self.cache, use_cache=True)
        for r, ok in zip(self.rows, live):
            r.next_pos += ok
        return out.logits[:, -1]

    def finish(self, r, reason, finished):
        if r.turn:
            r.traj.turn_ids.append(list(r.turn))
            r.traj.turns_text.append(self.tok.decode(r.turn, skip_special_tokens=False))
        if reason == "answer" and "<answer>" not in r.traj.turns_text[-1]:
            reason = "eos"
        r.traj.stop_reason = reason
        finished.append(r.traj)

    def tool_turn(self, finished):
        """Run every live row's call and append [pending token] + observation chunk to the cache."""
        cfg, view = self.cfg, self.view
        texts = []
        for r in self.rows:
            r.traj.turn_ids.append(list(r.turn))
            texts.append(self.tok.decode(r.turn, skip_special_tokens=False))
            r.traj.turns_text.append(texts[-1])

        def run(i):
            s = self.rows[i].traj.sample
            return observe(texts[i], s["video"], s["duration"], fps=view.crop_fps, max_frames=view.crop_max_frames,
                           min_frames=view.crop_min_frames, max_pixels=view.crop_max_pixels,
                           protocol=view.protocol)
        with ThreadPoolExecutor(cfg.workers) as pool:
            obs = list(pool.map(run, range(len(self.rows))))
        chunks, keep = [], []
        for i, (r, o) in enumerate(zip(self.rows, obs)):
            r.traj.tool_calls.append(dict(raw=o["raw"], window=o["window"], error=o["error"], timestamps=o["timestamps"]))
            obs_chunk = self.renderer.observation(o, last=r.traj.num_tool_calls >= cfg.max_turns)
            if len(r.traj.input_ids) + len(obs_chunk.input_ids) + 1 > cfg.max_total_tokens:
                r.traj.stop_reason = "length"
                finished.append(r.traj)
                continue
            r.traj.extend(obs_chunk)
            chunks.append(Rendered([r.pending], [1], [0], {}) + obs_chunk)
            keep.append(i)
        # finished rows leave before the append, so the chunk batch holds only live rows
        dummy = torch.zeros(len(self.rows), 1)
        self.keep(keep, dummy)
        if not self.rows:
            return None
        offs = [r.next_pos for r in self.rows]
        logits, nexts = self.forward(chunks, offs)
        for r, n in zip(self.rows, nexts):
            r.next_pos = n
        return logits


def prepare(samples, view: ViewConfig, workers=4):
    """Global views of all samples (threads). Returns [(sample with duration, frames, timestamps) or error str]."""
    def load(s):
        try:
            s = dict(s)
            s["duration"] = sample_duration(s)
            frames, ts = global_view(s["video"], view, s["duration"])
            return s, frames, ts
        except ToolError as e:
            return f"{s.get('id', s['video'])}: {e}"
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(load, samples))


def check_budget(processor, sample, view: ViewConfig, max_new_tokens, max_total_tokens):
    """Stop before any rollout when the first sample's prompt and one turn of max_new_tokens cannot fit
    max_total_tokens (every episode would end on `length` after its first tokens). A sample that cannot be read is
    left to the rollout, which skips and names it."""
    loaded = prepare([sample], view, 1)[0]
    if isinstance(loaded, str):
        return
    n = len(Renderer(processor, view).prompt(*loaded).input_ids)
    if n + max_new_tokens > max_total_tokens:
        raise SystemExit(f"the first sample's prompt is {n} tokens: with one turn of max_new_tokens={max_new_tokens} "
                         f"it does not fit max_total_tokens={max_total_tokens}. Raise --max_total_tokens (or shrink "
                         f"the view: --max_frames, --max_pixels)")


def dry_run(name, sample, view: ViewConfig, max_new_tokens, max_turns, max_total_tokens, rows=1):
    """--dry_run: what a run of `name` (tiny, a checkpoint dir or an HF id: its config only, never its weights)
    needs per episode, as text: the first sample's prompt tokens (its frame count and the video's frame size from
    the headers; blank frames), a full crop's, an episode's at most, and the bf16 KV cache they take per row."""
    note = ""
    if name == "tiny":
        proc = build_tiny_processor()
        config = tiny_model_config(proc.tokenizer)
    else:
        config = AutoConfig.from_pretrained(name)
        try:
            proc = AutoProcessor.from_pretrained(name)
        except (OSError, ValueError):  # a bare config.json: Qwen-VL's patching, the tiny tokenizer for the text
            proc, note = build_tiny_processor(), " (text counted with the tiny tokenizer: no tokenizer in --model)"
    try:
        info = video_info(sample["video"])
        width, height, duration = info["width"], info["height"], sample.get("duration") or info["duration"]
    except ToolError:  # the data may live elsewhere: a square frame of the pixel budget
        width = height = int(view.max_pixels ** 0.5)
        duration, note = float(sample.get("duration") or 600.0), note + " (video not found: square frames)"

    def blank(n, pixels):
        w, h = fit_size(width, height, pixels)
        return np.zeros((n, h, w, 3), np.uint8), (w, h)
    r = Renderer(proc, view)
    times = global_times(duration, view)
    frames, (w, h) = blank(len(times), view.max_pixels)
    prompt = len(r.prompt(dict(sample, duration=duration), frames, times).input_ids)
    crops, (cw, ch) = blank(view.crop_max_frames, view.crop_max_pixels)
    crop = len(r.observation(dict(frames=crops, timestamps=[float(i) for i in range(len(crops))],
                                  text=LONGVT_OK)).input_ids)
    episode = prompt + max_turns * (max_new_tokens + crop) + max_new_tokens
    text = getattr(config, "text_config", config)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * 2  # K and V, bf16
    need = min(episode, max_total_tokens)
    verdict = "fits" if episode <= max_total_tokens else f"longer than max_total_tokens={max_total_tokens}: " \
        f"episodes that use every turn end on `length`"
    gib = per_token * need / 2 ** 30
    return "\n".join([
        f"dry run of {name}{note}",
        f"  prompt: {prompt} tokens ({len(times)} frames of {w}x{h}, a {duration:.0f}-s video)",
        f"  one crop observation: {crop} tokens ({len(crops)} frames of {cw}x{ch})",
        f"  an episode at most: {prompt} + {max_turns} x ({max_new_tokens} + {crop}) + {max_new_tokens} = {episode} "
        f"tokens: {verdict}",
        f"  KV cache: {per_token / 1024:.1f} KiB per token ({text.num_hidden_layers} layers x "
        f"{text.num_key_value_heads} KV heads x {head_dim} x K,V x bf16) -> {gib:.2f} GiB per row at {need} "
        f"tokens, {gib * rows:.2f} GiB for {rows} rows"])


def rollout(model, processor, samples, group_size=1, cfg: RolloutConfig = RolloutConfig(),
            view: ViewConfig = ViewConfig()):
    """group_size trajectories per sample, grouped in sample order. A sample whose video cannot be read gives
    group_size trajectories with stop_reason 'skipped' and the error, so callers can count and name it."""
    t0 = time.time()
    engine = Engine(model, processor, cfg, view)
    loaded = prepare(samples, view, cfg.workers)
    prompts = []
    for i, x in enumerate(loaded):  # a prompt that leaves no room for a turn is skipped and named, never prefilled
        if not isinstance(x, str):
            p = engine.renderer.prompt(*x)
            if len(p.input_ids) + 1 > cfg.max_total_tokens:
                loaded[i] = (f"{x[0].get('id') or x[0]['video']}: its prompt is {len(p.input_ids)} tokens, no room "
                             f"for a turn in max_total_tokens={cfg.max_total_tokens} (raise it or shrink the view)")
            else:
                prompts.append(p)
    ok = [x for x in loaded if not isinstance(x, str)]
    finished = []
    if ok:
        finished = engine.run([x[0] for x in ok], prompts, group_size)
    by_sample = {}
    for t in sorted(finished, key=lambda t: t.index):
        by_sample.setdefault(id(t.sample), []).append(t)
    out, k = [], 0
    for s, x in zip(samples, loaded):
        if isinstance(x, str):
            out += [Trajectory(sample=s, stop_reason="skipped", error=x) for _ in range(group_size)]
        else:
            out += by_sample[id(ok[k][0])]
            k += 1
    for t in out:
        t.seconds = (time.time() - t0) / max(len(out), 1)
    return out
