"""rollout.py against independent references: HF generate, a full forward pass, and the SFT renderer."""
import copy

import re

import pytest
import torch

from data import Renderer, ViewConfig, batch_to, collate, model_vision, render_sft
from model import TinyConfig, load_model, token_logprobs
from needle import NeedleConfig, generate
from rollout import RolloutConfig, rollout
from tools import observe

VIEW = ViewConfig(global_frames=16, crop_max_frames=8)
SMALL = TinyConfig(hidden=64, layers=2, heads=4, kv_heads=2, ffn=128, vision_hidden=32, vision_depth=1)  # overfits fast


@pytest.fixture(scope="module")
def needle_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("needle")
    rows = generate(NeedleConfig(out=str(out), num_train=3, num_eval=1, min_duration=60, max_duration=90,
                                 eval_min_duration=60, eval_max_duration=90, seed=3))
    for r in rows["sft"] + rows["train"] + rows["eval"]:
        r["video"] = str(out / r["video"])
    return rows


def full_logprobs(model, proc, trajs):
    """Reference: one forward pass over each final sequence (prompt, sampled ids, observations, frames), on the
    model's device (tests/test_cuda.py runs it on the GPU); fp32 on the CPU."""
    out, dev = [], next(model.parameters()).device
    for t in trajs:
        b = batch_to(collate(model, [t.rendered()], proc.tokenizer.pad_token_id), dev)
        with torch.no_grad():
            lp, _ = token_logprobs(model, b["input_ids"], b["attention_mask"], b["position_ids"],
                                   **model_vision(b["vision"]))
        out.append(lp[0].float().cpu())
    return out


@pytest.fixture(scope="module")
def scripted(needle_set):
    """A tiny model overfit on three SFT trajectories, so that greedy decoding replays them: a clean one,
    one whose first call is malformed JSON and second is outside the video, and one that keeps calling."""
    rows = copy.deepcopy(needle_set["sft"][:3])
    good = rows[0]["turns"]
    call = good[0][good[0].index("<tool_call>"):]
    rows[1]["turns"] = ['<think>try</think><tool_call>{"name": "crop_video", "arguments": {"start_time": 5,</tool_call>',
                        '<think>again</think><tool_call>{"name": "crop_video", "arguments": {"start_time": 900, '
                        '"end_time": 990}}</tool_call>'] + rows[1]["turns"]
    rows[2]["turns"] = [f"<think>look</think>{call}"] * 2 + ["<think>no more calls</think><answer>red</answer>"]
    model, proc = load_model("tiny", tiny=SMALL)
    ren = Renderer(proc, VIEW)
    rendered = [render_sft(ren, r, max_turns=2) for r in rows]
    batch = collate(model, rendered, proc.tokenizer.pad_token_id)
    vision = model_vision(batch["vision"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    mask = batch["policy_mask"]
    for _ in range(500):
        lp, _ = token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["position_ids"],
                               mask=mask, **vision)
        if lp[mask.bool()].min() > -0.1:  # every target token has p > 0.9: greedy decoding replays them all
            break
        loss = -(lp * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, proc, rows, rendered


def test_greedy_matches_hf_generate(needle_set):
    """No tools, greedy: the same ids as model.generate on a left-padded batch of prompts of different lengths."""
    model, proc = load_model("tiny")
    model.eval()
    view = ViewConfig(tools=False, global_frames=16)
    samples = [dict(needle_set["train"][0]), dict(needle_set["train"][1], question="Short?")]
    cfg = RolloutConfig(temperature=0, max_new_tokens=12)
    trajs = rollout(model, proc, samples, 1, cfg, view)
    ren = Renderer(proc, view)
    from data import global_view
    prompts = [ren.prompt(t.sample, *global_view(t.sample["video"], view, t.sample["duration"])) for t in trajs]
    assert len(prompts[0].input_ids) != len(prompts[1].input_ids)
    T = max(len(p.input_ids) for p in prompts)
    pad = proc.tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (T - len(p.input_ids)) + p.input_ids for p in prompts])
    att = torch.tensor([[0] * (T - len(p.input_ids)) + [1] * len(p.input_ids) for p in prompts])
    mm = torch.tensor([[0] * (T - len(p.input_ids)) + p.mm_token_type_ids for p in prompts])
    from data import cat_vision
    vision = cat_vision([p.vision for p in prompts])
    im_end = proc.tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=att, mm_token_type_ids=mm, do_sample=False,
                             max_new_tokens=12, eos_token_id=[im_end, pad], pad_token_id=pad, **vision)
    for b, t in enumerate(trajs):
        want = ref[b, T:].tolist()
        got = t.turn_ids[0]
        assert got == want[:len(got)]
        assert len(got) == 12 or got[-1] in (im_end, pad)


def test_logprobs_match_full_forward_with_tool_observations(scripted):
    """Sampling log-probs (temperature 1) == one full forward pass over the final sequences, observations and
    their video frames included: proves the cache appends and the M-RoPE positions are right."""
    model, proc, rows, _ = scripted
    cfg = RolloutConfig(temperature=1.0, max_new_tokens=80, max_turns=2, seed=1)
    trajs = rollout(model, proc, rows, 2, cfg, VIEW)
    assert sum(t.num_tool_calls for t in trajs) >= 4  # observations were really appended
    vid = proc.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert any(t.input_ids[t.prompt_len:].count(vid) > 0 for t in trajs)  # with their video frames
    for t, ref in zip(trajs, full_logprobs(model, proc, trajs)):
        mask = torch.tensor(t.policy_mask, dtype=torch.bool)
        got = torch.tensor(t.logprobs)
        assert (got[mask] - ref[mask]).abs().max() < 1e-4
        assert (got[~mask] == 0).all()


def test_replays_sft_token_exactly_and_policy_mask(scripted):
    """Greedy replay of the overfit trajectories: ids equal the SFT renderer's (prompt + assistant ids +
    observation chunks), so SFT data and rollouts tokenize identically; policy_mask is 1 exactly on sampled ids."""
    model, proc, rows, rendered = scripted
    trajs = rollout(model, proc, rows, 1, RolloutConfig(temperature=0, max_new_tokens=80, max_turns=2), VIEW)
    for t, r in zip(trajs, rendered):
        if t.stop_reason == "turn_limit":  # the row with a 3rd call beyond max_turns=2 stops right at that call
            assert r.input_ids[:len(t.input_ids)] == t.input_ids and t.num_tool_calls == 2
            continue
        assert t.input_ids == r.input_ids
        assert t.policy_mask == r.policy_mask
        sampled = sum(len(x) for x in t.turn_ids)
        assert sum(t.policy_mask) == sampled
        vis = {proc.tokenizer.convert_tokens_to_ids(x) for x in ("<|video_pad|>", "<|image_pad|>")}
        assert all(m == 0 for i, m in zip(t.input_ids, t.policy_mask) if i in vis)
        assert t.input_ids[:t.prompt_len] == r.input_ids[:t.prompt_len] and sum(t.policy_mask[:t.prompt_len]) == 0


def test_bad_calls_give_error_observations_and_turn_limit(scripted):
    model, proc, rows, _ = scripted
    trajs = rollout(model, proc, rows, 1, RolloutConfig(temperature=0, max_new_tokens=80, max_turns=2), VIEW)
    good, bad, greedy_caller = trajs
    assert good.stop_reason == "answer" and good.num_tool_calls == 1 and good.tool_calls[0]["error"] is None
    # malformed JSON, then a window outside the video: both error observations, and the episode went on
    assert bad.tool_calls[0]["error"] and bad.tool_calls[0]["window"] is None
    assert bad.tool_calls[1]["error"] and "outside" in bad.tool_calls[1]["error"]
    assert "Tool execution failed" in proc.tokenizer.decode(bad.input_ids)
    assert bad.num_tool_calls == 2 and bad.stop_reason == "turn_limit"
    # the row that used its last call got the no-more-calls note and still answered
    assert greedy_caller.num_tool_calls == 2 and greedy_caller.stop_reason == "answer"
    assert "No more tool calls" in proc.tokenizer.decode(greedy_caller.input_ids)


def test_total_token_budget_stops_with_length(scripted):
    model, proc, rows, rendered = scripted
    full = len(rendered[0].input_ids)
    cfg = dict(temperature=0, max_new_tokens=80)
    # a budget that ends inside the answer turn: decoding stops exactly at it
    t = rollout(model, proc, rows[:1], 1, RolloutConfig(**cfg, max_total_tokens=full - 5), VIEW)[0]
    assert t.stop_reason == "length" and len(t.input_ids) == full - 5 and t.num_tool_calls == 1
    # a budget the observation would cross: the observation is not appended
    t = rollout(model, proc, rows[:1], 1, RolloutConfig(**cfg, max_total_tokens=full - 30), VIEW)[0]
    assert t.stop_reason == "length" and len(t.input_ids) <= full - 30 and len(t.turns_text) == 1


def test_seeded_and_group_rows_differ(needle_set):
    model, proc = load_model("tiny")
    model.eval()
    cfg = RolloutConfig(temperature=1.0, max_new_tokens=6, seed=7)
    a = rollout(model, proc, needle_set["train"][:2], 4, cfg, VIEW)
    b = rollout(model, proc, needle_set["train"][:2], 4, cfg, VIEW)
    assert [t.input_ids for t in a] == [t.input_ids for t in b]
    for g in range(2):
        firsts = [t.turn_ids[0][0] for t in a[4 * g:4 * g + 4]]
        assert len(set(firsts)) > 1  # rows of a group differ from the first sampled token on


def test_missing_video_is_skipped(needle_set):
    model, proc = load_model("tiny")
    samples = [dict(needle_set["train"][0], video="/nonexistent.mp4", duration=None), needle_set["train"][1]]
    trajs = rollout(model, proc, samples, 2, RolloutConfig(max_new_tokens=4), VIEW)
    assert [t.stop_reason for t in trajs[:2]] == ["skipped"] * 2 and "nonexistent" in trajs[0].error
    assert all(t.stop_reason != "skipped" and t.input_ids for t in trajs[2:])


@pytest.mark.parametrize("fmt,stamps", [("video", False), ("images", True)])
def test_logprobs_match_full_forward_other_visual_formats(needle_set, fmt, stamps):
    """One video of many temporal patches (its M-RoPE time positions run past the text positions) and
    per-frame images: decoding continues from the right position after the prompt."""
    model, proc = load_model("tiny")
    model.eval()
    view = ViewConfig(visual_format=fmt, timestamps=stamps, global_frames=16, crop_max_frames=8)
    trajs = rollout(model, proc, needle_set["train"][:2], 2, RolloutConfig(max_new_tokens=6, seed=2), view)
    for t, ref in zip(trajs, full_logprobs(model, proc, trajs)):
        mask = torch.tensor(t.policy_mask, dtype=torch.bool)
        assert (torch.tensor(t.logprobs)[mask] - ref[mask]).abs().max() < 1e-4


def test_a_prompt_longer_than_the_budget_is_skipped_and_named_not_prefilled(needle_set, monkeypatch):
    """A question of 100,000 words (the prefill asked for 14.5 GB and the machine killed eval): the sample is skipped
    with its prompt's length and the budget in the error, before any forward pass; the other samples run."""
    import rollout as ro
    model, proc = load_model("tiny")
    long = dict(needle_set["train"][0], question="what " * 100_000)
    calls = []
    real = ro.Engine.feed
    monkeypatch.setattr(ro.Engine, "feed", lambda self, cache, att, chunks, offsets: calls.append(
        max(len(c.input_ids) for c in chunks)) or real(self, cache, att, chunks, offsets))
    trajs = rollout(model, proc, [long, needle_set["train"][1]], 2, RolloutConfig(max_new_tokens=4), VIEW)
    assert [t.stop_reason for t in trajs[:2]] == ["skipped"] * 2
    assert re.search(r"train_00000: its prompt is 100\d{3} tokens, no room for a turn in max_total_tokens=8192",
                     trajs[0].error), trajs[0].error
    assert all(t.stop_reason != "skipped" and t.input_ids for t in trajs[2:]) and max(calls) < 8192


def _same(a, b):
    """Trajectories equal token for token (ids, mask, stop, calls); sampling log-probs to float rounding."""
    assert [t.input_ids for t in a] == [t.input_ids for t in b]
    assert [t.policy_mask for t in a] == [t.policy_mask for t in b]
    assert [t.stop_reason for t in a] == [t.stop_reason for t in b]
    assert [[c["window"] for c in t.tool_calls] for t in a] == [[c["window"] for c in t.tool_calls] for t in b]
    for x, y in zip(a, b):
        assert max(abs(p - q) for p, q in zip(x.logprobs, y.logprobs)) < 1e-4


def test_rows_making_the_same_call_share_its_observation(scripted, monkeypatch):
    """Greedy rows of a group make the same calls: each distinct call is decoded and rendered once, its pixel tensors
    shared by the rows (the same object, not a copy); the trajectories equal a one-row-per-sample run's."""
    import rollout as ro
    model, proc, rows, _ = scripted
    seen = []
    monkeypatch.setattr(ro, "observe", lambda text, *a, **k: seen.append(text) or observe(text, *a, **k))
    cfg = RolloutConfig(temperature=0, max_new_tokens=80, max_turns=2, keep_vision=True)
    one = rollout(model, proc, rows, 1, cfg, VIEW)
    n_one = len(seen)
    four = rollout(model, proc, rows, 4, cfg, VIEW)
    assert n_one >= 4 and len(seen) == 2 * n_one  # four rows per sample, no more decodes than one row
    for k, t in enumerate(four):
        assert t.input_ids == one[k // 4].input_ids and t.num_tool_calls == one[k // 4].num_tool_calls
    a, b = four[0], four[1]
    assert a.num_tool_calls and all(x is y for x, y in zip(a.vision_parts, b.vision_parts))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_rows_do_not_depend_on_max_rows(scripted, temperature):
    """max_rows 1, 3 and 0 (all): the same trajectories, greedy and sampled. With 3 samples x 2 members, chunks of 3
    split the second sample's group over two chunks (its prompt is prefilled in each)."""
    model, proc, rows, _ = scripted
    runs = {}
    for m in (0, 1, 3):
        cfg = RolloutConfig(temperature=temperature, max_new_tokens=80, max_turns=2, seed=5, max_rows=m)
        stats = {}
        runs[m] = rollout(model, proc, rows, 2, cfg, VIEW, stats=stats)
        runs[m, "kv"] = stats["peak_kv"]
    assert sum(t.num_tool_calls for t in runs[0]) >= 4  # the episodes append observations
    if temperature:
        assert len({tuple(t.input_ids) for t in runs[0]}) > 3  # rows of a group sampled differently
    _same(runs[0], runs[1])
    _same(runs[0], runs[3])
    assert runs[1, "kv"] < runs[3, "kv"] < runs[0, "kv"]  # fewer live rows, less KV


@pytest.mark.parametrize("fmt,stamps", [("video", False), ("video", True), ("images", False)])
def test_chunked_prefill_equals_one_shot(scripted, fmt, stamps):
    """Prompts and observations entered in pieces of 24 query tokens in all (cut between images or temporal patches of
    one video, whose vision-tower features are then computed piece by piece): the same trajectories as in one
    forward, with log-probs equal to the one-shot prefill's within 1e-5 (fp64; in fp32 they differ by float noise, ~2e-5). In the view the
    scripted model learnt (video + timestamps) its episodes call the tool, so observations are cut too."""
    model, proc, rows, _ = scripted
    model = copy.deepcopy(model).double()  # fp64: float noise far below the 1e-5 asked (fp32's is ~2e-5 here)
    view = ViewConfig(visual_format=fmt, timestamps=stamps, global_frames=16, crop_max_frames=8)
    widest = {}
    real = model.forward

    def spy(*a, **kw):
        ids = kw["input_ids"]
        widest[key] = max(widest.get(key, 0), ids.shape[1])
        grid = kw.get("video_grid_thw", kw.get("image_grid_thw"))
        if grid is not None:
            widest["unit"] = max(widest.get("unit", 0), int(grid[:, 1:].prod(1).max()) // 4)
        return real(*a, **kw)
    model.forward = spy
    try:
        cfg = dict(max_new_tokens=80, max_turns=2, seed=3, temperature=1.0)
        key = 0
        one = rollout(model, proc, rows, 2, RolloutConfig(**cfg, prefill_chunk=0), view)
        key = 24
        cut = rollout(model, proc, rows, 2, RolloutConfig(**cfg, prefill_chunk=24), view)
    finally:
        del model.forward
    if (fmt, stamps) == ("video", True):
        assert sum(t.num_tool_calls for t in cut) >= 4
    assert widest[24] <= max(24, widest["unit"]) < widest[0]
    _same(one, cut)
    assert max(abs(p - q) for x, y in zip(one, cut) for p, q in zip(x.logprobs, y.logprobs)) < 1e-5
    for t, ref in zip(cut, full_logprobs(model, proc, cut)):  # and both equal a full forward's (to 1e-4, as above)
        mask = torch.tensor(t.policy_mask, dtype=torch.bool)
        assert (torch.tensor(t.logprobs)[mask] - ref[mask]).abs().max() < 1e-4


def test_split_points_keep_images_and_temporal_patches_whole(needle_set):
    from data import global_view
    from kvcache import piece_vision, split_points, vision_items
    _, proc = load_model("tiny")
    view = ViewConfig(visual_format="video", timestamps=False, global_frames=16)
    s = dict(needle_set["train"][0])
    r = Renderer(proc, view).prompt(s, *global_view(s["video"], view, s["duration"]))
    (start, end, grid), = list(vision_items(r, 4))
    per = int(grid[1] * grid[2]) // 4
    cuts = split_points(r, 4, 3 * per // 2)  # a limit of 1.5 temporal patches
    assert cuts[0] == 0 and cuts[-1] == len(r.input_ids) and all(b > a for a, b in zip(cuts, cuts[1:]))
    assert all(not (start < c < end) or (c - start) % per == 0 for c in cuts)
    pieces = [piece_vision(r, 4, a, b) for a, b in zip(cuts, cuts[1:])]
    assert torch.equal(torch.cat([p["pixel_values_videos"] for p in pieces if p]), r.vision["pixel_values_videos"])
    assert sum(int(p["video_grid_thw"][:, 0].sum()) for p in pieces if p) == int(grid[0])


def test_compacting_the_holes_changes_no_trajectory(scripted, monkeypatch):
    """With a budget below the longest episode, the holes of a chunk's shared time axis (rows of unequal prompts and
    turns) would take it past the budget: the cache is compacted before an append, and every trajectory is the one
    the uncompacted cache gives (the budget cuts the same rows at the same token)."""
    import rollout as ro
    model, proc, rows, _ = scripted
    cfg = dict(temperature=1.0, max_new_tokens=80, max_turns=2, seed=4)
    rows = rows + [dict(rows[0], question="what " * 150 + rows[0]["question"])]  # a longer prompt: holes after others
    free = rollout(model, proc, rows, 2, RolloutConfig(**cfg), VIEW)
    budget = int(0.9 * max(len(t.input_ids) for t in free))
    calls, real = [], ro.KVCache.compact
    monkeypatch.setattr(ro.KVCache, "compact", lambda self, att: calls.append(att.shape) or real(self, att))
    tight = rollout(model, proc, rows, 2, RolloutConfig(**cfg, max_total_tokens=budget), VIEW)
    assert calls
    monkeypatch.setattr(ro.KVCache, "compact", lambda self, att: att)  # the same run with its holes kept
    holes = rollout(model, proc, rows, 2, RolloutConfig(**cfg, max_total_tokens=budget), VIEW)
    _same(holes, tight)
    assert any(t.stop_reason == "length" for t in tight) and any(t.num_tool_calls == 2 for t in tight)
