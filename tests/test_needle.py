"""The needle benchmark's generators (needle.py), the warm-ups (warmup.py) and the studies behind their defaults
(bench/)."""
import json
import os
import random
import sys

import numpy as np
import pytest
import torch

import needle
import warmup
from data import Renderer, ViewConfig, global_times
from model import COLOURS, load_model
from needle import crop_window_for


def test_sft_crop_window_of_the_last_scene_reaches_past_the_last_frame():
    """A 223-s video (frames 0, 10, ..., 220; pairs (0, 10) ... (200, 210), (220,)) whose last scene runs from
    195 s to the end: the window starts at the pair before the scene and ends one step past the last frame, so a
    needle at 219.6 s, after the last frame, is inside it (it used to end at 221 or, with a coarser view, 211)."""
    times = global_times(223, ViewConfig())
    assert times[-1] == 220.0
    assert crop_window_for((195.01, 223.0, "teal"), times) == (180.0, 230.0)
    assert crop_window_for((20.0, 45.0, "navy"), times) == (0.0, 60.0)  # pairs (20, 30), (40, 50) show it


def test_grounding_study_runs_and_reports(tmp_path):
    """bench/grounding.py (the study behind the tokenizer, time-grid and warm-up defaults) runs and writes its
    lines, with the dense queries and shifted timestamps on."""
    import subprocess
    out = tmp_path / "g.jsonl"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "bench/grounding.py", "--steps=2", "--eval_every=2", "--num_eval=2",
                        "--batch_size=2", "--factors=true", "--queries=3", "--max_offset=600", f"--out={out}"], cwd=root,
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    line = json.loads(out.read_text().splitlines()[-1])
    assert line["step"] == 2 and 0 <= line["start_acc"] <= 1 and 0 <= line["end_acc"] <= 1 and 0 <= line["iou"] <= 1
    assert line["config"]["number_digits"] == 1 and line["config"]["grid"] == 5.0 and line["config"]["queries"] == 3
    factors = [json.loads(x) for x in r.stdout.splitlines() if x.startswith('{"factor"')]
    from bench.grounding import FACTORS
    assert [f["factor"] for f in factors] == list(FACTORS) and all(0 <= f["iou"] <= 1 for f in factors)


def test_reading_study_crops_like_the_tool_and_runs(tmp_path):
    """bench/reading.py draws its crops in memory: the frame times must be the ones tools.crop_video decodes from a
    real needle video, and the target after "show a" must be the square's colour. A short run (perception warm-up
    then the in-context task) reports both stages."""
    from bench import reading
    from model import load_model
    from needle import NeedleConfig, make_layout, write_video
    from tools import crop_video
    cfg = NeedleConfig(size=56)
    scenes, k, nd = make_layout(random.Random(3), 200.0, cfg)
    path = str(tmp_path / "v.mp4")
    write_video(path, 200.0, scenes, nd, cfg)
    view = ViewConfig()
    for a, b in [(0.0, 60.0), (37.0, 101.0), (150.0, 199.0)]:
        clip = crop_video(path, a, b, fps=view.crop_fps, max_frames=view.crop_max_frames,
                          min_frames=view.crop_min_frames)
        assert reading.crop_times(a, b, view) == pytest.approx(list(clip.timestamps), abs=1e-6)
    _, proc = load_model("tiny")
    rcfg = reading.Config()
    rendered, (i1, i2) = reading.example(proc, view, random.Random(0), rcfg)
    tok = proc.tokenizer
    assert tok.decode(rendered.input_ids[i1]).strip() == tok.decode(rendered.input_ids[i2]).strip()
    assert tok.decode(rendered.input_ids[i1]).strip() in reading.needle.NEEDLE_COLOURS
    assert sum(rendered.policy_mask) > 0 and all(m == 0 for m in rendered.policy_mask[:i1])
    lines = reading.main(["--pretrain=2", "--steps=2", "--eval_every=2", "--num_eval=2", "--batch_size=2"])
    assert [x["stage"] for x in lines] == ["pretrain (isolated)", "in context"]
    assert all(0 <= x["answer_acc"] <= 1 and 0 <= x["think_colour_acc"] <= 1 for x in lines)


def test_needle_is_a_whole_frame_flash_by_default_and_a_small_square_on_request(tmp_path):
    """Decoded from the written video: at the needle's time the whole frame is the needle colour (default), or a
    square of a quarter of the side is (square=0.25); the questions name what to look for."""
    from needle import NeedleConfig, make_sample
    from tools import decode_frames
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
    warmup.reading_warmup lowers its loss within a few steps, deterministically."""
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
            assert "flashes between" in q or "A flash appears between" in q
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
    losses = warmup.reading_warmup(model, proc, ViewConfig(), 15, max_pairs=2, batch_size=4)
    assert losses[-1] < losses[0] - 2
    model2, _ = load_model("tiny")
    assert warmup.reading_warmup(model2, proc, ViewConfig(), 15, max_pairs=2, batch_size=4) == losses


def test_reading_warmup_with_copy_mix_adds_the_copy_rows_token_mean():
    """reading_warmup(copy_mix=3): each step's loss is the token mean of its reading batch plus that of 3 copy_example
    rows in the real prompt (fit sums the means of a list of batches): the first step's loss, computed before any
    update, equals the two means recomputed here from the same seeded draws under the initial weights."""
    from data import collate
    from train_sft import policy_nll
    model, proc = load_model("tiny")
    view, pad = ViewConfig(), proc.tokenizer.pad_token_id
    r, rng = Renderer(proc, view), random.Random(0)
    main = [warmup.reading_example(r, rng, rng.randint(1, 2), needle.NeedleConfig(), 56) for _ in range(2)]
    mix = [warmup.copy_example(r, rng, frames=6)[0] for _ in range(3)]
    with torch.no_grad():
        means = [policy_nll(model, b).item() / b["policy_mask"][:, 1:].sum().item()
                 for b in (collate(model, main, pad), collate(model, mix, pad))]
    want, alone = sum(means), means[0]
    losses = warmup.reading_warmup(model, proc, view, 2, max_pairs=2, batch_size=2, copy_mix=3, copy_frames=6)
    assert losses[0] == pytest.approx(want, rel=1e-5) and want > alone + 1  # the copy term is there (~ln 10 at init)


def frame_colours(proc, rendered):
    """The colour name of every frame of a rendered global view, read back from its pixel values (each frame is one
    solid colour): the per-channel mean of each frame of each temporal patch against that of a solid frame pair."""
    def means(px):  # (patches, C * T * P * P) -> (T, C) channel means per frame
        return px.reshape(px.shape[0], 3, 2, -1).mean((0, 3)).T
    refs = {c: means(proc.video_processor(videos=[np.full((2, 56, 56, 3), COLOURS[c], np.uint8)], return_tensors="pt",
                                          do_sample_frames=False)["pixel_values_videos"])[0] for c in COLOURS}
    px, thw, out = rendered.vision["pixel_values_videos"], rendered.vision["video_grid_thw"], []
    for g in torch.split(px, [int(n) for n in thw.prod(-1)]):
        for m in means(g):
            out.append(min(refs, key=lambda c: float((refs[c] - m).abs().sum())))
    return out


def test_grounding_example_targets_the_window_read_off_the_prompt():
    """warmup.grounding_example, checked against the prompt alone: the colour of each global-view frame is read back
    from its pixels and the timestamps from the text, and every target (the think's first sentence for the
    question's scene, then each extra "Where is the X scene?") must be the window from the timestamp of the frame
    pair before the first pair showing X to that of the pair after the last one (one frame step past the last frame
    when none follows). The loss is on the targets only, the question is of either kind, the frame count varies."""
    import re
    model, proc = load_model("tiny")
    r, tok = Renderer(proc, ViewConfig()), proc.tokenizer
    kinds, counts, checked = set(), set(), 0
    for seed in range(16):
        ex = warmup.grounding_example(r, random.Random(seed), queries=4)
        text = tok.decode(ex.input_ids)
        times = [float(t) for t in re.findall(r"(\d+(?:\.\d)?)s<\|vision_start\|>", text)]
        cols = frame_colours(proc, ex)
        assert len(cols) == 2 * len(times)
        if any(c in needle.NEEDLE_COLOURS for c in cols):
            continue  # a global frame caught the flash: its scene is not visible in it
        step = times[1] - times[0]
        pairs = [cols[2 * i:2 * i + 2] for i in range(len(times))]
        targets = re.findall(r"The (\w+) scene is around (\d+)s to (\d+)s\.", text)
        loss_text = tok.decode([i for i, m in zip(ex.input_ids, ex.policy_mask) if m])
        assert loss_text == "<think>" + "".join(f"The {c} scene is around {a}s to {b}s." for c, a, b in targets)
        q = re.search(r"(What colour is the flash that appears during|At what second does the flash appear in) "
                      r"the (\w+) scene\?", text)
        assert q and targets[0][0] == q.group(2)
        kinds.add(q.group(1)[:2])
        assert len({c for c, _, _ in targets}) == len(targets) <= 4
        for colour, a, b in targets:
            hit = [i for i, p in enumerate(pairs) if colour in p]
            assert hit == list(range(hit[0], hit[-1] + 1))  # one scene of that colour
            want_a = times[hit[0] - 1] if hit[0] > 0 else 0.0
            # past the last pair: one frame step (half a pair step) past its last frame, which is the pair's second
            # frame or, when the frame count is odd, its first one repeated (the prompt cannot tell which)
            want_b = [times[hit[-1] + 1]] if hit[-1] + 1 < len(times) else [times[-1] + step / 2, times[-1] + step]
            assert float(a) == want_a and float(b) in want_b, (colour, hit, times)
        counts.add(len(times))
        checked += 1
    assert checked >= 10 and kinds == {"Wh", "At"} and len(counts) > 3


def test_in_memory_examples_render_in_longvt_wording():
    """The warm-ups' in-memory prompts have no video file: under longvt_text they render without LongVT's video-path
    sentence (it raised KeyError 'video'); a real sample keeps it."""
    _, proc = load_model("tiny")
    r, tok = Renderer(proc, ViewConfig(longvt_text=True)), proc.tokenizer
    x, _ = warmup.time_example(r, random.Random(0), 2)
    y, _ = warmup.copy_example(r, random.Random(0), frames=4)
    assert all("video path" not in tok.decode(e.input_ids) for e in (x, y))
    real = r.prompt(dict(question="Q?", video="/v/clip_7.mp4"), np.zeros((2, 56, 56, 3), np.uint8), [0.0, 10.0])
    assert "The video path is: clip_7.mp4" in tok.decode(real.input_ids)


def test_time_copy_study_targets_the_timestamp_before_the_scene_and_runs(tmp_path):
    """warmup.time_example (bench/time_copy.py's views), checked against the prompt alone: the colour of each
    temporal patch read back from its pixels, the timestamps from the text; the target names the question's colour
    and the timestamp written before that colour's patch (random times: not the patch's position x 10 s); the loss
    is on the target only; `at` is the colour word's index. Asked the other way (describe), the target is the colour
    of the patch after the asked time. With prefix, the same draw behind a system turn (the real one or a token
    prefix of it). A short run reports both accuracies, the curriculum's, and behind the system turn; it saves a
    checkpoint that a second run starts from."""
    import re
    from bench import time_copy
    _, proc = load_model("tiny")
    r, tok, shifted = Renderer(proc, ViewConfig()), proc.tokenizer, 0
    for seed in range(8):
        for bare in (False, True):
            x, at = warmup.time_example(r, random.Random(seed), 5, bare=bare)
            text = tok.decode(x.input_ids)
            times = re.findall(r"(\d+)s<\|vision_start\|>", text)
            pairs = [set(p) for p in zip(*[iter(frame_colours(proc, x))] * 2)]
            colour = re.search(r"the (\w+) scene\?", text).group(1)
            assert len(times) == 5 and all(len(p) == 1 for p in pairs) and len(set.union(*pairs)) == 5
            want = times[[i for i, p in enumerate(pairs) if colour in p][0]]
            assert tok.decode([i for i, m in zip(x.input_ids, x.policy_mask) if m]) == \
                f"<think>The {colour} scene is around {want}s"
            assert tok.decode(x.input_ids[at:]) == f" {colour} scene is around {want}s"
            assert ("# Tools" in text) != bare
            shifted += times != [str(10 * i) for i in range(5)]
            y, _ = warmup.time_example(r, random.Random(seed), 5, bare=bare, describe=True)  # asked the other way
            text = tok.decode(y.input_ids)
            times = re.findall(r"(\d+)s<\|vision_start\|>", text)
            pairs = [set(p) for p in zip(*[iter(frame_colours(proc, y))] * 2)]
            t = re.search(r"What colour is the scene at (\d+)s\?", text).group(1)
            assert tok.decode([i for i, m in zip(y.input_ids, y.policy_mask) if m]) == \
                f"<think>The scene at {t}s is {pairs[times.index(t)].pop()}"
    assert shifted == 16
    first = Renderer(proc, ViewConfig(ask_first=True))
    for bare in (False, True):  # ask_first: the same draw and target, the question also before the view
        x, at = warmup.time_example(r, random.Random(3), 5, bare=bare)
        y, at_y = warmup.time_example(first, random.Random(3), 5, bare=bare)
        q = re.search(r"(What colour|At what second)[^?]*\?", tok.decode(x.input_ids)).group(0)
        head = tok.decode(y.input_ids).split("<|vision_start|>")[0]
        assert head.split("<|im_start|>user\n")[1].startswith(q + "\n") and tok.decode(x.input_ids).count(q) == 1
        assert tok.decode(y.input_ids).count(q) == 2 and tok.decode(y.input_ids[at_y:]) == tok.decode(x.input_ids[at:])
    system = r.text(r.system_text()).input_ids
    cuts = set()
    for seed in range(12):  # prefix: the same draw and target behind the system turn or a token prefix of it
        x, at = warmup.time_example(r, random.Random(seed), 3, bare=True)
        y, at_y = warmup.time_example(r, random.Random(seed), 3, bare=True, prefix=1.0)
        n = len(y.input_ids) - len(x.input_ids)
        assert y.input_ids[n:] == x.input_ids and y.policy_mask[n:] == x.policy_mask and at_y == at + n
        if n:
            opening, close = tok("<|im_start|>system\n").input_ids, tok("<|im_end|>\n").input_ids
            body = y.input_ids[len(opening):n - len(close)]
            assert y.input_ids[:len(opening)] == opening and body == system[:len(body)] and sum(y.policy_mask[:n]) == 0
            cuts.add(len(body) == len(system))
    assert cuts == {True, False}  # both the whole system prompt and shorter prefixes
    out = str(tmp_path / "bound")
    lines = time_copy.main(["--groups=3", "--short_steps=1", "--steps=2", "--eval_every=2", "--num_eval=2",
                            "--batch_size=2", "--describe=1", "--prefix=0.5", "--instruction_first", "--time_after",
                            "--name_steps=2", '--tiny={"layers": 3}', f"--save={out}"])
    assert [x["step"] for x in lines] == [2] and all(0 <= lines[0][k] <= 1 for k in (
        "colour_acc", "time_acc", "short_colour_acc", "short_time_acc", "sys_time_acc"))
    again = time_copy.main(["--groups=3", "--steps=1", "--eval_every=1", "--num_eval=2", f"--init={out}", "--lr=0"])
    assert again[0]["step"] == 1 and load_model(out)[0].config.text_config.num_hidden_layers == 3
    with pytest.raises(ValueError, match="random or regular"):
        warmup.time_example(r, random.Random(0), 2, times="sorted")
    with pytest.raises(SystemExit, match="random or regular"):
        time_copy.main(["--times=sorted"])


def test_time_warmup_trains_on_bare_two_patch_views_deterministically():
    """warmup.time_warmup (train_sft --time_warmup) lowers its loss within a few steps and repeats itself exactly
    for a seed."""
    model, proc = load_model("tiny")
    losses = warmup.time_warmup(model, proc, ViewConfig(), 12, lr=4e-3, batch_size=4)
    assert sum(losses[-3:]) / 3 < losses[0] - 1
    model2, _ = load_model("tiny")
    assert warmup.time_warmup(model2, proc, ViewConfig(), 12, lr=4e-3, batch_size=4) == losses


def test_grounding_warmup_lowers_its_loss_deterministically():
    """warmup.grounding_warmup lowers its loss within a few steps and repeats itself exactly for a seed."""
    model, proc = load_model("tiny")
    losses = warmup.grounding_warmup(model, proc, ViewConfig(), 12, queries=3, batch_size=2)
    assert sum(losses[-3:]) / 3 < losses[0] - 2
    model2, _ = load_model("tiny")
    assert warmup.grounding_warmup(model2, proc, ViewConfig(), 12, queries=3, batch_size=2) == losses


def test_copy_study_examples_and_run():
    """bench/copy_study.py: the loss is on exactly "<think>The <colour>", the colour is the question's, every context
    ends with the question right before the assistant turn, an unknown context is a clear error; a short run
    reports its accuracy."""
    from bench import copy_study
    _, proc = load_model("tiny")
    r, tok = Renderer(proc, ViewConfig()), proc.tokenizer
    for context in ("short", "system", "video"):
        x, c = copy_study.example(r, random.Random(1), context)
        assert tok.decode([i for i, m in zip(x.input_ids, x.policy_mask) if m]) == f"<think>The {c}"
        prompt = tok.decode(x.input_ids[:x.policy_mask.index(1)])
        assert prompt.endswith(f"the {c} scene?<|im_end|>\n<|im_start|>assistant\n")
        assert ("<|vision_start|>" in prompt) == (context == "video") and ("# Tools" in prompt) == (context != "short")
    with pytest.raises(SystemExit, match="--context"):
        copy_study.example(r, random.Random(1), "long")
    lines = copy_study.main(["--context=video", "--short_steps=1", "--steps=2", "--eval_every=2", "--num_eval=2",
                             "--batch_size=2"])
    assert [x["step"] for x in lines] == [2] and 0 <= lines[0]["colour_acc"] <= 1


def test_copy_warmup_teaches_the_colour_copy():
    """warmup.copy_warmup (150 steps of the question alone -> "<think>The <colour>", seconds on CPU) makes the model
    name the question's colour after "<think>The" in the full prompt (system text, global view, question), where
    the untrained model is at chance; it is deterministic for a seed."""
    from bench import copy_study
    model, proc = load_model("tiny")
    r, pad = Renderer(proc, ViewConfig()), proc.tokenizer.pad_token_id
    cfg = copy_study.Config(context="video", num_eval=32)
    before = copy_study.colour_acc(model, r, cfg, pad)
    losses = warmup.copy_warmup(model, proc, ViewConfig(), 150)
    after = copy_study.colour_acc(model, r, cfg, pad)
    assert before <= 0.3 and after >= 0.7, (before, after)
    model2, _ = load_model("tiny")
    assert warmup.copy_warmup(model2, proc, ViewConfig(), 150) == losses


def test_name_example_names_the_colour_its_frames_show():
    """warmup.name_example (bench/time_copy --name_steps): every frame, read back from its pixels, is the colour the
    target names; the loss is on the target alone; 1..max_groups patches."""
    _, proc = load_model("tiny")
    r, tok, counts = Renderer(proc, ViewConfig()), proc.tokenizer, set()
    for seed in range(12):
        x = warmup.name_example(r, random.Random(seed))
        target = tok.decode([i for i, m in zip(x.input_ids, x.policy_mask) if m])
        colours = frame_colours(proc, x)
        assert len(set(colours)) == 1 and target == f"<think>The scene is {colours[0]}"
        text = tok.decode(x.input_ids)
        assert text.startswith("<|im_start|>user\n") and text.endswith(
            "<|vision_end|>What colour is this scene?<|im_end|>\n<|im_start|>assistant\n" + target)
        counts.add(len(colours) // 2)
    assert counts == {1, 2, 3}


def test_long_read_study_scores_against_the_target_and_runs(monkeypatch):
    """bench/long_read.accuracy: an oracle that predicts every next token scores (1, 1), one that predicts the token
    itself (never the next) (0, 0); a short run (warm-up, then growing crops) reports both at each eval patch count."""
    from types import SimpleNamespace
    from bench import long_read
    model, proc = load_model("tiny")
    r, V = Renderer(proc, ViewConfig()), len(proc.tokenizer)
    for shift, want in ((1, (1.0, 1.0)), (0, (0.0, 0.0))):  # logits from the ids: the next token, or the token itself
        monkeypatch.setattr(model, "forward", lambda input_ids, **_: SimpleNamespace(
            logits=torch.nn.functional.one_hot(torch.roll(input_ids, -shift, dims=1), V).float()))
        assert long_read.accuracy(model, r, 3, 4, 0) == want
    lines = long_read.main(["--warmup_steps=2", "--steps=2", "--grow=1", "--top=4", "--eval_every=2", "--num_eval=2",
                            "--eval_pairs=1,4", "--time_after"])
    assert [x["step"] for x in lines] == [0, 2]
    assert all(0 <= x[k] <= 1 for x in lines for k in ("colour1", "time1", "colour4", "time4"))
