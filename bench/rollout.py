"""Benchmark: rollout.py vs HF generate, in one run, on one machine.

    python bench/rollout.py                     # P=2 prompts x G=8, >= 1,000 vision tokens per prompt

1. Single turn, no tools: rollout (prompt prefilled once, KV copied to the G rows) vs
   model.generate(num_return_sequences=G) (which prefills every row). Same sampling settings and length.
2. Episodes of 3 tool calls + an answer: rollout (observations appended to the live cache) vs the naive
   loop that re-renders the whole history and re-runs model.generate on it every turn.
   Both sides follow the same scripted turns (a logits bias towards a fixed text), so they do the same
   number of forward passes of the same model and differ only in how they use the cache.
3. Long context: 4 rows decode 64 tokens after an 8,192-token prompt, with kvcache.KVCache (written in place) vs
   transformers' DynamicCache (a torch.cat of each layer's whole cache per token), the same forwards otherwise.
Last lines: rollout_vs_hf_generate_speedup: X (target >= 4), multiturn_vs_reprefill_speedup: Y (>= 5),
inplace_vs_dynamic_cache_decode_speedup: Z.
"""
import os
import sys
import time

import torch
from transformers import LogitsProcessor, LogitsProcessorList

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import Rendered, Renderer, ViewConfig, cat_vision, global_view  # noqa: E402
from model import TinyConfig, load_model  # noqa: E402
from needle import NeedleConfig, generate  # noqa: E402
from kvcache import KVCache  # noqa: E402
from rollout import RolloutConfig, rollout  # noqa: E402
from transformers import DynamicCache  # noqa: E402
from tools import observe  # noqa: E402

P, G, NEW = 2, 8, 32
VIEW = ViewConfig(global_frames=128, global_fps=1.0, time_grid=0, max_pixels=112 * 112, crop_max_frames=16,
                  crop_max_pixels=112 * 112)
TURN = '<think>look closer</think><tool_call>{"name": "crop_video", "arguments": {"start_time": 30, "end_time": 60}}</tool_call>'
ANSWER = "<think>seen</think><answer>red</answer>"


class Forced(torch.nn.Module):
    """Wraps the model; pushes the logits towards the next token of a script (turn by turn, all rows in
    lockstep). The wrapped model does all the real work; `module` lets model.unwrap find it."""

    def __init__(self, model, turns):
        super().__init__()
        self.module, self.turns = model, turns

    def forward(self, input_ids, **kw):
        out = self.module(input_ids=input_ids, **kw)
        if input_ids.shape[1] > 1:  # a prefill: the prompt (turn 0) or an observation (next turn), maybe in pieces
            cache = kw.get("past_key_values")
            if cache is None or cache.get_seq_length() == input_ids.shape[1]:
                self.turn = 0
            elif not getattr(self, "appending", False):
                self.turn += 1
            self.pos, self.appending = 0, True
        else:
            self.pos, self.appending = self.pos + 1, False
        script = self.turns[min(self.turn, len(self.turns) - 1)]
        tok = script[min(self.pos, len(script) - 1)]
        out.logits[:, -1, tok] += 1e4
        return out


class ForceProcessor(LogitsProcessor):
    def __init__(self, script, start):
        self.script, self.start = script, start

    def __call__(self, input_ids, scores):
        i = min(input_ids.shape[1] - self.start, len(self.script) - 1)
        scores[:, self.script[i]] += 1e4
        return scores


def hf_batch(prompts, pad):
    T = max(len(p.input_ids) for p in prompts)
    ids = torch.tensor([[pad] * (T - len(p.input_ids)) + p.input_ids for p in prompts])
    att = torch.tensor([[0] * (T - len(p.input_ids)) + [1] * len(p.input_ids) for p in prompts])
    mm = torch.tensor([[0] * (T - len(p.input_ids)) + p.mm_token_type_ids for p in prompts])
    vision = {k: v for k, v in cat_vision([p.vision for p in prompts]).items()}
    return dict(input_ids=ids, attention_mask=att, mm_token_type_ids=mm, **vision), T


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main():
    torch.manual_seed(0)
    model, proc = load_model("tiny", tiny=TinyConfig(hidden=256, layers=6, heads=8, kv_heads=4, ffn=768,
                                                     vision_hidden=128, vision_depth=4))
    model.eval()
    tok = proc.tokenizer
    pad = tok.pad_token_id
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench_out", "needle")
    rows = generate(NeedleConfig(out=out, num_train=P, num_eval=0, min_duration=300, max_duration=300))["train"]
    for r in rows:
        r["video"] = os.path.join(out, r["video"])
    ren = Renderer(proc, VIEW)
    prompts = [ren.prompt(r, *global_view(r["video"], VIEW, r["duration"])) for r in rows]
    vis = sum(x > 0 for x in prompts[0].mm_token_type_ids)
    print(f"model {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params; prompt {len(prompts[0].input_ids)} "
          f"tokens of which {vis} vision; P={P} G={G}, {NEW} new tokens per turn; threads={torch.get_num_threads()}")

    # ---- 1. single turn, no tools
    view = ViewConfig(**{**VIEW.__dict__, "tools": False})
    cfg = RolloutConfig(temperature=1.0, max_new_tokens=NEW, seed=0)
    ours, t_ours = timed(lambda: rollout(model, proc, rows, G, cfg, view))
    n_ours = sum(len(t.turn_ids[0]) for t in ours)
    nt = [ren.prompt(r, *global_view(r["video"], view, r["duration"])) for r in rows]
    batch, T = hf_batch(nt, pad)
    with torch.no_grad():
        ref, t_hf = timed(lambda: model.generate(**batch, do_sample=True, temperature=1.0, top_k=0, max_new_tokens=NEW,
                                                 min_new_tokens=NEW, num_return_sequences=G, pad_token_id=pad))
    n_hf = (ref.shape[1] - T) * ref.shape[0]
    print(f"single turn: rollout {t_ours:.2f}s ({n_ours / t_ours:.1f} tok/s)  hf generate {t_hf:.2f}s "
          f"({n_hf / t_hf:.1f} tok/s)")
    speed1 = (n_ours / t_ours) / (n_hf / t_hf)

    # ---- 2. three tool calls, then an answer
    turns = [tok.encode(TURN, add_special_tokens=False)] * 3 + [tok.encode(ANSWER + "<|im_end|>", add_special_tokens=False)]
    cfg = RolloutConfig(temperature=1.0, max_new_tokens=64, max_turns=3, seed=0)
    ours, t_ours = timed(lambda: rollout(Forced(model, turns), proc, rows, G, cfg, VIEW))
    assert all(t.num_tool_calls == 3 and t.stop_reason == "answer" for t in ours), [t.stop_reason for t in ours]
    n_ours = sum(sum(len(x) for x in t.turn_ids) for t in ours)

    def naive():
        hist = [p for p in prompts for _ in range(G)]  # full re-rendered history of each row
        n = 0
        for k, script in enumerate(turns):
            batch, T = hf_batch(hist, pad)
            with torch.no_grad():
                out = model.generate(**batch, do_sample=True, temperature=1.0, top_k=0, max_new_tokens=len(script),
                                     min_new_tokens=len(script), pad_token_id=pad,
                                     logits_processor=LogitsProcessorList([ForceProcessor(script, T)]))
            n += (out.shape[1] - T) * out.shape[0]
            if k == len(turns) - 1:
                return n
            new = []
            for h, row, r in zip(hist, out[:, T:].tolist(), [r for r in rows for _ in range(G)]):
                o = observe(tok.decode(row), r["video"], r["duration"], fps=VIEW.crop_fps, max_frames=VIEW.crop_max_frames,
                            min_frames=VIEW.crop_min_frames, max_pixels=VIEW.crop_max_pixels)
                new.append(h + Rendered(row, [1] * len(row), [0] * len(row), {}) + ren.observation(o))
            hist = new
    n_naive, t_naive = timed(naive)
    print(f"3 tool calls: rollout {t_ours:.2f}s ({n_ours / t_ours:.1f} tok/s)  re-prefill loop {t_naive:.2f}s "
          f"({n_naive / t_naive:.1f} tok/s)")
    speed2 = (n_ours / t_ours) / (n_naive / t_naive)
    # ---- 3. long context: the cache's update cost per decoded token
    def decode(cache, rows=4, prompt=8192, steps=64):
        ids = torch.randint(200, 600, (rows, prompt))
        pos = torch.arange(prompt).expand(3, rows, -1)
        att = torch.ones(rows, prompt, dtype=torch.long)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=att, position_ids=pos, past_key_values=cache, use_cache=True,
                  logits_to_keep=1)
            t0 = time.perf_counter()
            for k in range(steps):
                att = torch.cat([att, torch.ones(rows, 1, dtype=torch.long)], 1)
                p = torch.full((3, rows, 1), prompt + k)
                model(input_ids=ids[:, :1], attention_mask=att, position_ids=p, past_key_values=cache, use_cache=True)
        return rows * steps / (time.perf_counter() - t0)
    decode(KVCache(), prompt=512, steps=4)  # warm-up
    inplace, dynamic = decode(KVCache()), decode(DynamicCache())
    print(f"long context (8,192-token prompt, 4 rows, 64 tokens): in-place {inplace:.1f} tok/s  DynamicCache "
          f"{dynamic:.1f} tok/s")
    print(f"rollout_vs_hf_generate_speedup: {speed1:.2f}")
    print(f"multiturn_vs_reprefill_speedup: {speed2:.2f}")
    print(f"inplace_vs_dynamic_cache_decode_speedup: {inplace / dynamic:.2f}")


if __name__ == "__main__":
    main()
