"""The hand-written batched multi-turn generation loop, with tool observations appended to the live KV cache.

    from rollout import rollout, RolloutConfig
    trajs = rollout(model, processor, samples, group_size=8, cfg=RolloutConfig(max_rows=16), view=ViewConfig())

How it works (one call = P samples x G rows, in row order: sample 0's G members, then sample 1's, ...):
1. Rows run in chunks of at most `max_rows` (0: all at once), so at most max_rows rows hold KV. In a chunk, each
   sample's prompt (system + long global view + question) is prefilled ONCE, alone, in pieces of at most
   `prefill_chunk` tokens cut at frame boundaries (the vision tower runs per piece), then its KV is copied to its
   rows of the chunk. A chunk's rows share one time axis; a row's unused columns are holes (attention mask 0), and
   when they would take the axis past max_total_tokens the cache is compacted (each row's columns moved up).
2. Decode: one token per live row per step. Each row samples with its own generator, seeded from (seed, sample,
   member): a trajectory does not depend on which rows share its batch or chunk. A row stops its turn at
   `</tool_call>`, `<|im_end|>`/EOS or the per-turn budget. Rows done with the episode leave the cache at once.
3. When every live row has stopped its turn, their calls run in a thread pool (tools.observe; a call several rows
   make runs once, its frames shared) and each row's observation chunk (data.Renderer.observation: frames + text)
   is appended to the SAME cache, all rows at once in pieces of about prefill_chunk tokens in all, with explicit
   M-RoPE position ids from the model's get_rope_index shifted to the row's current position. Then decoding resumes.
The KV cache is written in place (KVCache: buffers grown in blocks, never a torch.cat of the whole cache per token).
Sampled ids are never re-tokenized. The log-prob recorded for each sampled token is under the model's own
distribution (temperature 1, no top-k/top-p), i.e. exactly what a full forward pass over the final sequence
gives, which the tests check. The rows of a group share their prompt's vision tensors (no copy per row).
Departure from LongVT: after the last allowed tool call the model still gets an answer turn (the observation says
no more calls are available); LongVT ends the episode there.
"""
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from data import Rendered, Renderer, ViewConfig, cat_vision, global_view, model_vision, positions, sample_duration
from kvcache import KVCache, piece_vision, split_points
from model import unwrap
from tools import observe
from video import VideoError


@dataclass
class RolloutConfig:
    max_turns: int = 5             # tool calls per episode (LongVT: 5); then one answer turn
    max_new_tokens: int = 256      # tokens per assistant turn
    max_total_tokens: int = 8192   # tokens per row, prompt and observations included
    temperature: float = 1.0       # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                 # 0 = off
    seed: int = 0                  # with (sample, member), seeds each row's sampling generator
    workers: int = 4               # threads decoding videos (global views, crops)
    max_rows: int = 0              # rows holding KV at once (0 = all rows of the call); the dry run names one that fits
    prefill_chunk: int = 2048      # query tokens per forward when a prompt or observations enter the cache
    keep_vision: bool = True       # trajectories keep their vision tensors (GRPO's update needs them; eval does not)


@dataclass
class Trajectory:
    sample: dict
    input_ids: list = field(default_factory=list)
    policy_mask: list = field(default_factory=list)   # 1 on sampled tokens only
    logprobs: list = field(default_factory=list)      # sampling log-prob of each token (0 where mask is 0)
    mm_token_type_ids: list = field(default_factory=list)
    vision_parts: list = field(default_factory=list)  # vision inputs of the sequence in order (the prompt's is shared)
    prompt_len: int = 0
    turns_text: list = field(default_factory=list)    # decoded text of each assistant turn
    turn_ids: list = field(default_factory=list)      # sampled ids of each assistant turn
    tool_calls: list = field(default_factory=list)    # {raw, window, error, timestamps} per call
    stop_reason: str = ""                             # answer | eos | length | turn_limit | skipped
    error: str | None = None                          # why a sample was skipped (missing/corrupt video)
    seconds: float = 0.0
    index: int = 0                                    # row index in the call (group members are contiguous)

    @property
    def num_tool_calls(self):
        return len(self.tool_calls)

    @property
    def vision(self):
        return cat_vision(self.vision_parts)

    def rendered(self):
        return Rendered(self.input_ids, self.policy_mask, self.mm_token_type_ids, self.vision)

    def extend(self, r: Rendered, logprobs=None):
        self.input_ids += r.input_ids
        self.policy_mask += r.policy_mask
        self.mm_token_type_ids += r.mm_token_type_ids
        self.logprobs += logprobs or [0.0] * len(r.input_ids)
        if r.vision:
            self.vision_parts.append(r.vision)


@dataclass
class Row:
    traj: Trajectory
    next_pos: int          # M-RoPE position of the next token (text positions are equal in all 3 axes)
    gen: torch.Generator   # this row's sampling generator
    pending: int = -1      # last sampled token, not yet fed to the cache
    turn: list = field(default_factory=list)
    done: str = ""         # why this row's turn stopped: "tool" or a final stop reason


# --------------------------------------------------------------------------- sampling
def row_generator(seed, sample, member):
    """The sampling generator of one row: seeded from (seed, sample, member) alone."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, sample, member]).generate_state(1)[0]))


def sample_tokens(logits, cfg: RolloutConfig, gens, banned):
    """logits (B, V), one generator per row -> tokens (B,), log-probs under the unmodified model distribution (B,).
    A row draws one uniform from its own generator per token (inverse CDF), whatever the batch holds."""
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
        cdf = scores.softmax(-1).cumsum(-1)                                          # (B, V)
        u = torch.tensor([torch.rand((), generator=g).item() for g in gens], dtype=cdf.dtype, device=cdf.device)
        tok = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1)  # never a 0-prob token
        tok = tok.clamp(max=cdf.shape[-1] - 1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


# --------------------------------------------------------------------------- the engine
class Engine:
    """The state of one chunk of rows: live rows, their shared KV cache and 2-D attention mask (holes = 0)."""

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
        self.merge = processor.image_processor.merge_size ** 2
        self.tok = tok
        self.cache, self.errors = None, {}  # errors: {sample index: why it was skipped} (run fills it)
        self.peak_kv = 0  # the most bytes the KV cache held (memory.py's estimate is tested against it)

    @torch.no_grad()
    def feed(self, cache, att, chunks, offsets):
        """Append one chunk (a Rendered) per row of `cache` to it, in forwards of about prefill_chunk query tokens in
        all (each row's pieces cut at frame boundaries, right-aligned so every row's last piece is in the last
        forward; a row with fewer pieces gets holes). Returns (last-position logits (B, V), each row's next position:
        its last token's + 1 (chunks end with text, whose three M-RoPE axes are equal), the attention mask)."""
        B = len(chunks)
        limit = max(1, self.cfg.prefill_chunk // B) if self.cfg.prefill_chunk > 0 else 1 << 60
        pos = [positions(self.model, c) + off for c, off in zip(chunks, offsets)]
        cuts = [split_points(c, self.merge, limit) for c in chunks]
        K = max(len(c) - 1 for c in cuts)
        for k in range(K):
            parts = []
            for c, cut in zip(chunks, cuts):
                j = k - (K - (len(cut) - 1))  # this row's piece index at step k (negative: none yet)
                parts.append((cut[j], cut[j + 1]) if j >= 0 else (0, 0))
            L = max(b - a for a, b in parts)
            ids = torch.full((B, L), self.pad, dtype=torch.long)
            new = torch.zeros(B, L, dtype=torch.long)
            p = torch.zeros(3, B, L, dtype=torch.long)
            vision = []
            for i, (c, (a, b)) in enumerate(zip(chunks, parts)):
                if b > a:
                    ids[i, L - (b - a):] = torch.tensor(c.input_ids[a:b])
                    new[i, L - (b - a):] = 1
                    p[:, i, L - (b - a):] = pos[i][:, a:b]
                    if c.vision:
                        vision.append(piece_vision(c, self.merge, a, b))
            att = new.to(self.device) if att is None else torch.cat([att, new.to(self.device)], 1)
            out = self.model(input_ids=ids.to(self.device), attention_mask=att, position_ids=p.to(self.device),
                             past_key_values=cache, use_cache=True, logits_to_keep=1,
                             **model_vision(cat_vision(vision), self.device))
            self.note(cache)
        return out.logits[:, -1], [int(x[0, -1]) + 1 for x in pos], att

    def keep(self, idx, logits):
        """Drop rows that are finished from the batch and the cache."""
        if len(idx) == len(self.rows):
            return logits
        t = torch.tensor(idx, dtype=torch.long, device=self.device)
        self.cache.batch_select_indices(t)
        self.att = self.att[t]
        self.rows = [self.rows[i] for i in idx]
        return logits[t]

    def prompt(self, s):
        """Sample s's rendered prompt (rendered once, when its first row starts), or None when it leaves no room for a
        turn (the sample is then skipped and named, never prefilled)."""
        if s not in self.prompts:
            p = self.renderer.prompt(*self.loaded[s])
            if len(p.input_ids) + 1 > self.cfg.max_total_tokens:
                x = self.loaded[s][0]
                self.errors[s] = (f"{x.get('id') or x['video']}: its prompt is {len(p.input_ids)} tokens, no room "
                                  f"for a turn in max_total_tokens={self.cfg.max_total_tokens} (raise it or shrink "
                                  f"the view)")
                p = None
            self.prompts[s] = p
        return self.prompts[s]

    def start(self, members):
        """Prefill a chunk: members [(sample, member, row index)]; each distinct sample's prompt once, alone, then
        copied to its rows. Returns the rows' next-token logits (R, V)."""
        members = [m for m in members if self.prompt(m[0]) is not None]
        self.cache, R = KVCache(), len(members)
        self.rows, logits, lens = [None] * R, [None] * R, [0] * R
        for s in dict.fromkeys(m[0] for m in members):
            p, mine = self.prompts[s], [k for k, m in enumerate(members) if m[0] == s]
            one = KVCache()
            lg, nxt, _ = self.feed(one, None, [p], [0])  # one sample, alone: no padding
            self.cache.put(mine, one, R)
            self.note(one)
            del one
            for k in mine:
                t = Trajectory(sample=self.loaded[s][0], prompt_len=len(p.input_ids), index=members[k][2])
                t.extend(p)  # the prompt's vision dict is shared by the group's rows, not copied
                self.rows[k] = Row(t, nxt[0], row_generator(self.cfg.seed, self.keys[s], members[k][1]))
                logits[k], lens[k] = lg[0], len(p.input_ids)
        if not R:
            return None
        n = self.cache.get_seq_length()
        self.att = (torch.arange(n)[None] < torch.tensor(lens)[:, None]).long().to(self.device)  # holes after a prompt
        return torch.stack(logits)

    def note(self, extra=None):
        """Record the KV bytes held now: the chunk's cache, and a prompt's one-row cache while it is prefilled."""
        now = (self.cache.nbytes() if self.cache is not None else 0)
        now += extra.nbytes() if extra is not None and extra is not self.cache else 0
        self.peak_kv = max(self.peak_kv, now)

    def run(self, members, loaded, keys):
        """Roll out members [(sample index, member, row index)] of loaded samples (prepare()'s items) in chunks of
        max_rows rows. Returns the finished trajectories; self.errors names the samples skipped for their length."""
        self.loaded, self.keys, self.prompts, self.errors = loaded, keys, {}, {}
        finished, step = [], self.cfg.max_rows if self.cfg.max_rows > 0 else len(members)
        for c in range(0, len(members), step):
            logits = self.start(members[c:c + step])
            while self.rows:
                logits = self.decode_turn(logits, finished)
                if not self.rows:
                    break
                logits = self.tool_turn(finished)
            self.cache = self.att = None
            later = {m[0] for m in members[c + step:]}
            self.prompts = {s: p for s, p in self.prompts.items() if s in later or p is None}  # free the done ones
        return finished

    def decode_turn(self, logits, finished):
        """Sample until every live row has stopped its turn; finished rows leave the batch at once."""
        cfg = self.cfg
        for r in self.rows:
            r.turn, r.done = [], ""
        for step in range(cfg.max_new_tokens):
            active = [i for i, r in enumerate(self.rows) if not r.done]
            tok, lp = sample_tokens(logits[active], cfg, [self.rows[i].gen for i in active], self.banned)
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
        self.att = torch.cat([self.att, torch.tensor(live, dtype=torch.long, device=self.device)[:, None]], 1)
        out = self.model(input_ids=ids.to(self.device), attention_mask=self.att, position_ids=pos.to(self.device),
                         past_key_values=self.cache, use_cache=True)
        self.note()
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
        self.done(r.traj, finished)

    def done(self, traj, finished):
        if not self.cfg.keep_vision:
            traj.vision_parts = []
        finished.append(traj)

    def tool_turn(self, finished):
        """Run every live row's call and append [pending token] + observation chunk to the cache."""
        cfg, view = self.cfg, self.view
        texts = []
        for r in self.rows:
            r.traj.turn_ids.append(list(r.turn))
            texts.append(self.tok.decode(r.turn, skip_special_tokens=False))
            r.traj.turns_text.append(texts[-1])

        def run(key):
            call, video, duration = key
            return observe(call, video, duration, fps=view.crop_fps, max_frames=view.crop_max_frames,
                           min_frames=view.crop_min_frames, max_pixels=view.crop_max_pixels, protocol=view.protocol)
        # a call's result depends only on the text from its turn's last <tool_call> on and on the video: rows making
        # the same call (a group often does) share one decode, one rendering and its pixel tensors
        keys = [(t[max(t.rfind("<tool_call>"), 0):], r.traj.sample["video"], r.traj.sample["duration"])
                for t, r in zip(texts, self.rows)]
        unique = list(dict.fromkeys(keys))
        with ThreadPoolExecutor(cfg.workers) as pool:
            obs = dict(zip(unique, pool.map(run, unique)))
        chunks, keep, rendered = [], [], {}
        for i, (r, key) in enumerate(zip(self.rows, keys)):
            o, last = obs[key], r.traj.num_tool_calls + 1 >= cfg.max_turns
            r.traj.tool_calls.append(dict(raw=o["raw"], window=o["window"], error=o["error"], timestamps=o["timestamps"]))
            if (key, last) not in rendered:
                rendered[key, last] = self.renderer.observation(o, last=last)
            obs_chunk = rendered[key, last]
            if len(r.traj.input_ids) + len(obs_chunk.input_ids) + 1 > cfg.max_total_tokens:
                r.traj.stop_reason = "length"
                self.done(r.traj, finished)
                continue
            r.traj.extend(obs_chunk)
            chunks.append(Rendered([r.pending], [1], [0], {}) + obs_chunk)
            keep.append(i)
        # finished rows leave before the append, so the chunk batch holds only live rows
        self.keep(keep, torch.zeros(len(self.rows), 1, device=self.device))
        if not self.rows:
            return None
        if self.cache.get_seq_length() + max(len(c.input_ids) for c in chunks) > cfg.max_total_tokens:
            self.att = self.cache.compact(self.att)  # holes would take the time axis past any row's own budget
        logits, nexts, self.att = self.feed(self.cache, self.att, chunks, [r.next_pos for r in self.rows])
        for r, n in zip(self.rows, nexts):
            r.next_pos = n
        return logits


def prepare(samples, view: ViewConfig, workers=4, done=None):
    """Global views of all samples (threads). Returns [(sample with duration, frames, timestamps) or error str].
    done: {id(sample): item} decoded already (the budget check's first sample); each is taken out when used, so a
    later call decodes that sample afresh and the dict no longer holds its frames."""
    def load(s):
        try:
            s = dict(s)
            s["duration"] = sample_duration(s)
            frames, ts = global_view(s["video"], view, s["duration"])
            return s, frames, ts
        except VideoError as e:
            return f"{s.get('id', s['video'])}: {e}"
    known = {id(s): done.pop(id(s)) for s in samples if done and id(s) in done}
    with ThreadPoolExecutor(workers) as pool:
        decoded = iter(pool.map(load, [s for s in samples if id(s) not in known]))
    return [known[id(s)] if id(s) in known else next(decoded) for s in samples]


def check_budget(processor, loaded, view: ViewConfig, max_new_tokens, max_total_tokens):
    """Stop before any rollout when the first sample's prompt and one turn of max_new_tokens cannot fit
    max_total_tokens (every episode would end on `length` after its first tokens). `loaded`: prepare()'s item for
    the first sample (the caller passes its global view on to the rollout: it is decoded once); an error string (a
    sample that cannot be read) is left to the rollout, which skips and names it."""
    if isinstance(loaded, str):
        return
    n = len(Renderer(processor, view).prompt(*loaded).input_ids)
    if n + max_new_tokens > max_total_tokens:
        raise SystemExit(f"the first sample's prompt is {n} tokens: with one turn of max_new_tokens={max_new_tokens} "
                         f"it does not fit max_total_tokens={max_total_tokens}. Raise --max_total_tokens (or shrink "
                         f"the view: --max_frames, --max_pixels)")


def rollout(model, processor, samples, group_size=1, cfg: RolloutConfig = RolloutConfig(),
            view: ViewConfig = ViewConfig(), loaded=None, keys=None, stats=None):
    """group_size trajectories per sample, grouped in sample order. A sample whose video cannot be read gives
    group_size trajectories with stop_reason 'skipped' and the error, so callers can count and name it.
    loaded: prepare()'s items for `samples` when the caller has them already. keys: an int per sample that seeds its
    rows with cfg.seed and the member (default: its position in `samples`). stats: a dict that gets peak_kv."""
    t0 = time.time()
    engine = Engine(model, processor, cfg, view)
    loaded = list(loaded) if loaded is not None else prepare(samples, view, cfg.workers)
    members = [(i, j, i * group_size + j) for i, x in enumerate(loaded) if not isinstance(x, str)
               for j in range(group_size)]
    keys = list(keys) if keys is not None else list(range(len(samples)))
    finished = engine.run(members, loaded, keys) if members else []
    if stats is not None:
        stats["peak_kv"] = engine.peak_kv
    by_index = {t.index: t for t in finished}
    out = []
    for i, (s, x) in enumerate(zip(samples, loaded)):
        error = x if isinstance(x, str) else engine.errors.get(i)
        out += [Trajectory(sample=s, stop_reason="skipped", error=error, index=i * group_size + j) if error else
                by_index[i * group_size + j] for j in range(group_size)]
    for t in out:
        t.seconds = (time.time() - t0) / max(len(out), 1)
    return out
