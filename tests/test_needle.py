"""The needle benchmark's generators (needle.py) and its skill warm-up stage (needle_warmup.py)."""
import os
import random

import numpy as np
import pytest
import torch

import needle
import needle_warmup as warmup
from data import Renderer, ViewConfig, global_times, render_sft
from model import build_tiny_processor, load_model
from needle import COLOURS


def test_needle_is_a_whole_frame_flash_by_default_and_a_small_square_on_request(tmp_path):
    """Decoded from the written video: at the needle's time the whole frame is the needle colour (default), or a
    square of a quarter of the side is (square=0.25)."""
    from needle import NeedleConfig, make_sample
    from video import decode_frames
    for square, name in [(1.0, "flash"), (0.25, "square")]:
        cfg = NeedleConfig(size=112, square=square)
        d = tmp_path / name
        d.mkdir()
        sample, _ = make_sample(0, "train", random.Random(4), cfg, str(d))
        nd = sample["needle"]
        t = nd["start"] + cfg.needle_seconds / 2
        frame = decode_frames(os.path.join(str(d), os.path.basename(sample["video"])), [t], 112 * 112)[0][0]
        want = np.array(COLOURS[nd["colour"]], float)
        near = np.abs(frame.astype(float) - want).max(-1) < 40  # h264 is lossy
        assert nd["side"] == round(112 * square)
        assert near.mean() == pytest.approx(square ** 2, abs=0.06)


def test_reading_example_and_warmup():
    """needle_warmup.reading_example: the loss is on exactly the answer turn (the SFT wording), its colour is a
    needle colour, the vision blocks that differ from a plain scene block are the 1-2 holding the needle frames.
    skill_warmup on them lowers the loss within a few steps, deterministically."""
    model, proc = load_model("tiny")
    r, tok = Renderer(proc, ViewConfig()), proc.tokenizer
    for seed in range(12):
        ex = warmup.reading_example(r, random.Random(seed), pairs=4)
        turn = tok.decode([i for i, m in zip(ex.input_ids, ex.policy_mask) if m])
        col = turn.split("show a ")[1].split(" ")[0]
        q = tok.decode(ex.input_ids[:ex.policy_mask.index(1)])
        assert col in needle.NEEDLE_COLOURS
        assert "flashes between" in q or "A flash appears. What colour is it between" in q
        assert turn == f"<think>The cropped frames show a {col} flash.</think><answer>{col}</answer><|im_end|>"
        assert q.endswith("</tool_response><|im_end|>\n<|im_start|>assistant\n")
        px = ex.vision["pixel_values_videos"].reshape(4, -1)  # one row per temporal patch (2 frames)
        counts = torch.bincount(torch.unique(px, dim=0, return_inverse=True)[1])
        assert 4 - counts.max() in (1, 2)  # the plain blocks are all equal; 1-2 blocks hold the flash
    kinds = [(4, lambda r, rng: warmup.reading_example(r, rng, rng.randint(1, 2)))]
    losses = warmup.skill_warmup(model, proc, ViewConfig(), 15, kinds)
    assert losses[-1] < losses[0] - 2
    model2, _ = load_model("tiny")
    assert warmup.skill_warmup(model2, proc, ViewConfig(), 15, kinds) == losses


@pytest.mark.parametrize("seed", [0, 3])
def test_episode_example_is_the_sft_row_rendered_on_its_video(tmp_path, seed):
    """needle_warmup.episode_example draws an SFT row (episode_row) and renders it without decoding a video: the
    question alone, then the row's turns token for token as train_sft renders the same row on the written video
    (render_sft, the real tool's crop), the crop's frames matching the decoded ones (h264 is lossy). The loss is on
    exactly the two turns; a strict question's call is its window and its crop shows the flash, a lazy skim's [0, B]
    does not."""
    proc = build_tiny_processor()
    tok = proc.tokenizer
    view = ViewConfig(global_frames=8)
    cfg = needle.NeedleConfig(loose_fraction=0.5, lazy_fraction=1.0)  # every loose question skims
    seen = set()
    for k in range(8):
        row, scenes, nd = warmup.episode_row(random.Random(f"{seed}:{k}"), cfg)
        bare = warmup.episode_example(Renderer(proc, view), random.Random(f"{seed}:{k}"), cfg)
        path = str(tmp_path / f"{k}.mp4")
        needle.write_video(path, row["duration"], scenes, dict(nd, x=0, y=0, side=cfg.size), cfg)
        real = render_sft(Renderer(proc, view), dict(row, video=path))
        policy = tok.decode([i for i, m in zip(bare.input_ids, bare.policy_mask) if m])
        assert policy == tok.decode([i for i, m in zip(real.input_ids, real.policy_mask) if m])
        assert policy == "".join(row["turns"]) + "<|im_end|>"
        assert tok.decode(bare.input_ids).startswith(f"<|im_start|>user\n{row['question']}<|im_end|>")
        n = len(bare.vision["pixel_values_videos"])  # the crop: the last rows of the real render's video pixels
        assert (bare.vision["pixel_values_videos"] - real.vision["pixel_values_videos"][-n:]).abs().max() < 0.2
        g = bare.vision["video_grid_thw"]
        assert g.tolist() == real.vision["video_grid_thw"][-len(g):].tolist()
        lazy = "skim" in row["turns"][0]
        a, b = row["window"]
        assert needle.call_text(0 if lazy else a, b) in row["turns"][0]
        shows = _shows(proc, bare.vision["pixel_values_videos"],
                       needle.frame_at(nd["start"] + 1, scenes, dict(nd, x=0, y=0, side=56), 56))
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


def test_warmup_stage_writes_a_checkpoint_sft_starts_from(tmp_path):
    """needle_warmup.py: the tiny model warmed for a few steps on the data's wording, saved with its view.json; the
    checkpoint (what train_sft.py --init= loads) holds exactly the weights of the same steps run here; a missing
    data folder is a clear error."""
    import json
    from needle import NeedleConfig, generate
    data = tmp_path / "data"
    generate(NeedleConfig(out=str(data), num_train=2, num_eval=0, num_eval_short=0, num_rl=0, min_duration=60,
                          max_duration=70))
    with pytest.raises(SystemExit, match="no such folder"):
        warmup.main([f"--data={tmp_path / 'nope'}", f"--out={tmp_path / 'w'}"])
    warmup.main([f"--data={data}", f"--out={tmp_path / 'w'}", "--steps=3"])
    assert json.load(open(tmp_path / "w" / "view.json"))["crop_max_frames"] == ViewConfig().crop_max_frames
    warm = load_model(str(tmp_path / "w"))[0].state_dict()
    fresh = load_model("tiny")[0].state_dict()
    assert warm.keys() == fresh.keys() and any(not torch.equal(warm[k], fresh[k]) for k in warm)  # it trained
    torch.manual_seed(0)  # the stage's init (compute_init seeds with --seed), trained for the same 3 steps here
    again = load_model("tiny")[0]
    warmup.skill_warmup(again, build_tiny_processor(), ViewConfig(), 3,
                        warmup.kinds(ViewConfig(), needle.load_config(str(data))), seed=0)
    assert all(torch.equal(again.state_dict()[k], warm[k]) for k in warm)  # the checkpoint holds exactly those


def test_load_config_reads_the_config_the_data_was_made_with(tmp_path):
    """The warm-up draws its examples as the data was made (its config.json); a dir without one gets the defaults,
    an unreadable one is a clear error naming the file."""
    from needle import NeedleConfig, generate, load_config
    generate(NeedleConfig(out=str(tmp_path), num_train=1, num_eval=0, num_eval_short=0, num_rl=0, min_duration=60,
                          max_duration=60, square=0.25, loose_fraction=0.9))
    assert load_config(str(tmp_path)) == NeedleConfig(out=str(tmp_path), num_train=1, num_eval=0, num_eval_short=0,
                                                      num_rl=0, min_duration=60, max_duration=60, square=0.25,
                                                      loose_fraction=0.9)
    assert load_config(str(tmp_path / "none")) == NeedleConfig()
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        load_config(str(tmp_path))
