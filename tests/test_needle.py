"""The needle benchmark's generators (needle.py) and the skill warm-up's examples (warmup.py)."""
import os
import random

import numpy as np
import pytest
import torch

import needle
import train_sft
import warmup
from data import Renderer, ViewConfig, global_times, render_sft
from model import COLOURS, build_tiny_processor, load_model
from needle import crop_window_for


def test_sft_crop_window_of_the_last_scene_reaches_past_the_last_frame():
    """A 223-s video (frames 0, 10, ..., 220; pairs (0, 10) ... (200, 210), (220,)) whose last scene runs from
    195 s to the end: the window starts at the pair before the scene and ends one step past the last frame, so a
    needle at 219.6 s, after the last frame, is inside it (it used to end at 221 or, with a coarser view, 211)."""
    times = global_times(223, ViewConfig())
    assert times[-1] == 220.0
    assert crop_window_for((195.01, 223.0, "teal"), times) == (180.0, 230.0)
    assert crop_window_for((20.0, 45.0, "navy"), times) == (0.0, 60.0)  # pairs (20, 30), (40, 50) show it


def test_needle_is_a_whole_frame_flash_by_default_and_a_small_square_on_request(tmp_path):
    """Decoded from the written video: at the needle's time the whole frame is the needle colour (default), or a
    square of a quarter of the side is (square=0.25); the questions name what to look for."""
    from needle import NeedleConfig, make_sample
    from video import decode_frames
    for square, word in [(1.0, "flash"), (0.25, "small square")]:
        cfg = NeedleConfig(size=112, square=square, when_fraction=0.0, task="scene")
        d = tmp_path / word.replace(" ", "_")
        d.mkdir()
        sample, _ = make_sample(0, "train", random.Random(4), cfg, str(d))
        nd = sample["needle"]
        assert f"the {word} that appears" in sample["question"]
        t = nd["start"] + cfg.needle_seconds / 2
        frame = decode_frames(os.path.join(str(d), os.path.basename(sample["video"])), [t], 112 * 112)[0][0]
        want = np.array(COLOURS[nd["colour"]], float)
        near = np.abs(frame.astype(float) - want).max(-1) < 40  # h264 is lossy
        assert nd["side"] == round(112 * square)
        assert near.mean() == pytest.approx(square ** 2, abs=0.06)


def test_reading_example_and_warmup():
    """warmup.reading_example: the loss is on exactly the answer turn (the SFT wording), its colour is a needle
    colour, the vision blocks that differ from a plain scene block are the 1-2 holding the needle frames.
    warmup.skill_warmup on them lowers the loss within a few steps, deterministically."""
    model, proc = load_model("tiny")
    r, tok = Renderer(proc, ViewConfig()), proc.tokenizer
    kinds = set()
    for seed in range(24):
        task = "scene" if seed % 2 else "window"  # the scene variant words its answer turn as its data does
        ex = warmup.reading_example(r, random.Random(seed), pairs=4, cfg=needle.NeedleConfig(task=task))
        turn = tok.decode([i for i, m in zip(ex.input_ids, ex.policy_mask) if m])
        col = turn.split("show a ")[1].split(" ")[0]
        ans = turn.split("<answer>")[1].split("</answer>")[0]
        q = tok.decode(ex.input_ids[:ex.policy_mask.index(1)])
        assert col in needle.NEEDLE_COLOURS
        if task == "window":
            assert "flashes between" in q or "A flash appears. What colour is it between" in q
            assert turn == f"<think>The cropped frames show a {col} flash.</think><answer>{col}</answer><|im_end|>"
            continue
        t = turn.split("at about ")[1].split("s.")[0]
        assert turn.startswith(f"<think>The cropped frames show a {col} flash at about ")
        assert ans == (t if "At what second" in q else col), (q, turn)  # the answer follows the question's kind
        kinds.add("At what second" in q)
        assert turn.endswith("</answer><|im_end|>") and tok.decode(ex.input_ids[:ex.policy_mask.index(1)]).endswith(
            "</tool_response><|im_end|>\n<|im_start|>assistant\n")
        px = ex.vision["pixel_values_videos"].reshape(4, -1)  # one row per temporal patch (2 frames)
        counts = torch.bincount(torch.unique(px, dim=0, return_inverse=True)[1])
        assert 4 - counts.max() in (1, 2)  # the plain blocks are all equal; 1-2 blocks hold the flash
    assert kinds == {True, False}
    kinds = [(4, lambda r, rng: warmup.reading_example(r, rng, rng.randint(1, 2)))]
    losses = warmup.skill_warmup(model, proc, ViewConfig(), 15, kinds, train_sft.policy_nll)
    assert losses[-1] < losses[0] - 2
    model2, _ = load_model("tiny")
    assert warmup.skill_warmup(model2, proc, ViewConfig(), 15, kinds, train_sft.policy_nll) == losses


@pytest.mark.parametrize("seed", [0, 3])
def test_episode_example_is_the_sft_row_rendered_on_its_video(tmp_path, seed):
    """warmup.episode_example draws a window-task row (episode_row) and renders it without decoding a video. With
    the full prompt it is token for token what train_sft renders for the same row on the written video (render_sft,
    the real tool's crop), and its frames match the decoded ones (h264 is lossy); the bare form is the question
    alone, then the same turns and crop. The loss is on exactly the two turns; a strict question's call is its
    window and its crop shows the flash, a lazy skim's [0, B] does not."""
    proc = build_tiny_processor()
    tok = proc.tokenizer
    view = ViewConfig(global_frames=8)  # 8 frames for every training duration: no view jitter
    cfg = needle.NeedleConfig(loose_fraction=0.5, lazy_fraction=1.0)  # every loose question skims
    seen = set()
    for k in range(8):
        row, scenes, nd = warmup.episode_row(random.Random(f"{seed}:{k}"), cfg)
        full = warmup.episode_example(Renderer(proc, view), random.Random(f"{seed}:{k}"), cfg, prompt=True)
        bare = warmup.episode_example(Renderer(proc, view), random.Random(f"{seed}:{k}"), cfg)
        path = str(tmp_path / f"{k}.mp4")
        needle.write_video(path, row["duration"], scenes, dict(nd, x=0, y=0, side=cfg.size), cfg)
        real = render_sft(Renderer(proc, view), dict(row, video=path))
        assert full.input_ids == real.input_ids and full.policy_mask == real.policy_mask
        for key in ("pixel_values_videos", "video_grid_thw"):
            a, b = full.vision[key], real.vision[key]
            assert a.shape == b.shape and (key == "video_grid_thw" or (a - b).abs().max() < 0.2)
        policy = tok.decode([i for i, m in zip(full.input_ids, full.policy_mask) if m])
        assert policy == "".join(row["turns"]) + "<|im_end|>"
        assert tok.decode(bare.input_ids).startswith(f"<|im_start|>user\n{row['question']}<|im_end|>")
        assert tok.decode([i for i, m in zip(bare.input_ids, bare.policy_mask) if m]) == policy
        lazy = "skim" in row["turns"][0]
        a, b = row["window"]
        assert needle.call_text(0 if lazy else a, b) in row["turns"][0]
        crop = bare.vision["pixel_values_videos"]  # the bare form's only vision: the crop
        shows = _shows(proc, crop, needle.frame_at(nd["start"] + 1, scenes, dict(nd, x=0, y=0, side=56), 56))
        assert shows == (not lazy), (row, shows)
        seen.add(lazy)
    assert seen == {True, False}


def _shows(proc, crop, flash):
    """Does a processed crop hold a frame of the flash (drawn in memory, so equal to it up to float rounding)? A row
    of pixel_values_videos is one patch of a temporal pair: (channel, frame of the pair, 14 x 14)."""
    f = proc.video_processor(videos=[np.stack([flash, flash])], return_tensors="pt", do_sample_frames=False)
    f = f["pixel_values_videos"][0].reshape(3, 2, -1)
    return bool(((crop.reshape(len(crop), 3, 2, -1) - f).abs().amax((1, 3)) < 1e-3).any())




def test_short_videos_still_place_the_flash_where_the_global_view_misses_it():
    """On videos of about a minute the lazy skim [0, B] is dense enough that no gap may be left for the 3-s flash:
    the layout then gives up only that constraint (the no-tool view still misses the flash) instead of failing."""
    cfg = needle.NeedleConfig()
    for seed in range(40):
        rng = random.Random(seed)
        duration = float(rng.randint(60, 90))
        _, (a, b), nd = needle.window_layout(rng, duration, cfg)
        assert a + 1 <= nd["start"] and nd["end"] <= b - 1 and nd["end"] - nd["start"] == cfg.needle_seconds
        assert not needle._seen(global_times(duration, ViewConfig()), nd["start"], cfg.needle_seconds)
