"""memory.py's estimate, term by term, against measurements on tiny configs on the CPU (fp32, sdpa): the KV cache's
bytes exactly, a chunked append's transient, the vision tower's and the update's saved tensors within 25%; and the
dry run's verdict line on a 7B-shaped config (LongVT's settings per rank on 8 GPUs)."""
import ctypes
import gc
import os
import re

import numpy as np
import pytest

import memory
from data import Rendered, Renderer, ViewConfig, collate, global_view, model_vision
from model import TinyConfig, load_model, token_logprobs
from needle import NeedleConfig, generate
from kvcache import KVCache
from rollout import Engine, RolloutConfig, rollout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIG = TinyConfig(hidden=256, layers=2, heads=8, kv_heads=2, ffn=2048, vision_hidden=128, vision_depth=2)
VIS = TinyConfig(hidden=64, layers=1, heads=4, kv_heads=2, ffn=128, vision_hidden=256, vision_depth=2)


def fixed_mmap_threshold():
    """Large blocks straight from mmap and back on free (no dynamic threshold), so the process's resident size
    follows what torch holds: the measurements below read it (VmRSS, and VmHWM after resetting it)."""
    ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD


def rss(key="VmRSS"):
    return int(re.search(key + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024


def peak_over(fn):
    """(fn's result, the resident peak during fn minus the resident size before it)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    base = rss()
    out = fn()
    return out, rss("VmHWM") - base


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    out = tmp_path_factory.mktemp("mem")
    rows = generate(NeedleConfig(out=str(out), num_train=2, num_rl=0, num_eval=1, num_eval_short=0, size=224,
                                 min_duration=120, max_duration=130, eval_min_duration=600, eval_max_duration=610,
                                 workers=1))
    for r in rows["train"]:
        r["video"] = str(out / r["video"])
    return out, rows["train"]


def text(n, seed=0):
    ids = np.random.default_rng(seed).integers(200, 600, n).tolist()
    return Rendered(ids, [0] * n, [0] * n, {})


def test_kv_cache_bytes_are_exact_and_bound_the_rollout(videos):
    model, proc = load_model("tiny")
    model.eval()
    eng = Engine(model, proc, RolloutConfig(), ViewConfig())
    cache = KVCache()
    eng.feed(cache, None, [text(700), text(700, 1), text(700, 2)], [0, 0, 0])
    assert cache.nbytes() == memory.kv_bytes(model.config, 3, 700, nbytes=4)
    eng.feed(cache, None, [text(600)] * 3, [700] * 3)  # grown past its capacity: still the formula's bytes
    assert cache.nbytes() == memory.kv_bytes(model.config, 3, 1300, nbytes=4)
    # a whole rollout never holds more than the estimate's KV at its max_rows (fp32 here, bf16 on the GPU)
    view = ViewConfig(crop_max_frames=8)
    rc = RolloutConfig(max_new_tokens=16, max_turns=2, max_rows=3)
    stats = {}
    rollout(model, proc, videos[1], 4, rc, view, stats=stats)
    cfg, counts = model.config, memory.param_counts(model.config)
    ep = memory.episode(proc, cfg, videos[1][0], view, rc)
    bound = memory.estimate(cfg, counts, ep, rc, rows=8, gpus=1)["kv"] * 2  # bf16 -> fp32
    assert memory.kv_bytes(cfg, 3, ep["prompt"], nbytes=4) <= stats["peak_kv"] <= bound


def fresh(name, *args):
    """Run measure_<name>(*args) in a new Python process (a process that has run other tests reuses freed heap without
    growing its resident size, which would hide a peak) and return its result."""
    import json
    import subprocess
    import sys
    code = (f"import sys, json; sys.path[:0] = {[ROOT, os.path.dirname(__file__)]!r}; import test_memory as t; "
            f"t.fixed_mmap_threshold(); print(json.dumps(t.measure_{name}(*{list(args)!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_append():
    model, proc = load_model("tiny", tiny=BIG)
    model.eval()
    measured = {}
    for chunk in (1024, 256):
        eng = Engine(model, proc, RolloutConfig(prefill_chunk=chunk), ViewConfig())
        cache = KVCache()
        _, _, att = eng.feed(cache, None, [text(5000), text(5000, 1)], [0, 0])
        new = [text(512, 2), text(512, 3)]
        _, measured[chunk] = peak_over(lambda: eng.feed(cache, att, new, [5000, 5000]))
    return measured


def test_an_append_transient_is_chunk_by_length():
    """Two rows with 5,000 cached tokens each take 1,024 query tokens in all (512 each): the resident peak above the
    inputs is memory.forward_transient's (mask, fp32 mask, K/V repeated to 8 heads, MLP) within 25%, and so it is at
    256 (the mask and MLP shrink with the chunk; the repeated K/V is per row and layer, O(length))."""
    measured = {int(k): v for k, v in fresh("append").items()}
    model, _ = load_model("tiny", tiny=BIG)
    for chunk in (1024, 256):
        want = memory.forward_transient(model.config, chunk, 5512, 2, "sdpa", nbytes=4, float_mask=True)
        assert abs(measured[chunk] - want) <= 0.25 * want, (chunk, measured, want)


def measure_vision(video, duration):
    model, proc = load_model("tiny", tiny=VIS)  # a small text model: the vision tower's peak is the larger
    model.eval()
    s = dict(video=video, duration=duration, question="What colour?")
    r = Renderer(proc, VIS_VIEW).prompt(s, *global_view(video, VIS_VIEW, duration))
    eng = Engine(model, proc, RolloutConfig(prefill_chunk=0), VIS_VIEW)
    _, measured = peak_over(lambda: eng.feed(KVCache(), None, [r], [0]))
    return dict(measured=measured, patches=len(r.vision["pixel_values"]))


VIS_VIEW = ViewConfig(visual_format="images", timestamps=False, time_grid=0, global_frames=120, global_fps=1.0,
                      max_pixels=50176)


def test_the_vision_tower_transient_of_a_piece(videos):
    """A prompt of 120 frames at 224x224 as images (30,720 patches) prefilled in one piece: the peak is the vision
    tower's (memory.vision_transient with one fp32 copy of the pixels, as the CPU run makes) within 25%."""
    s = videos[1][0]
    got = fresh("vision", s["video"], s["duration"])
    model, _ = load_model("tiny", tiny=VIS)
    want = memory.vision_transient(model.config, got["patches"], nbytes=4, pixel_copy=4)
    assert got["patches"] == 120 * 256 and abs(got["measured"] - want) <= 0.25 * want, (got, want)


def measure_update(video, duration, freeze):
    model, proc = load_model("tiny", tiny=BIG, grad_ckpt=True)
    model.train()
    if freeze:
        model.model.visual.requires_grad_(False)
    view = ViewConfig(visual_format="images", timestamps=False, time_grid=0, global_frames=60, global_fps=1.0,
                      max_pixels=50176)
    s = dict(video=video, duration=duration, question="What colour?")
    r = Renderer(proc, view).prompt(s, *global_view(video, view, duration)) + text(3000)
    r.policy_mask[-2000:] = [1] * 2000
    b = collate(model, [r], proc.tokenizer.pad_token_id)
    vision = model_vision(b["vision"])
    token_logprobs(model, b["input_ids"], b["attention_mask"], b["position_ids"], mask=b["policy_mask"],
                   **vision)[0].sum().backward()  # a first step: its one-time allocations are not
    model.zero_grad(set_to_none=False)  # counted below; the gradients already exist, as in a training step
    gc.collect()
    base = rss()
    loss = token_logprobs(model, b["input_ids"], b["attention_mask"], b["position_ids"], mask=b["policy_mask"],
                          **vision)[0].sum()
    held = rss() - base
    loss.backward()
    return dict(held=held, tokens=len(r.input_ids), patches=len(b["vision"]["pixel_values"]))


def test_the_updates_saved_tensors_with_gradient_checkpointing(videos):
    """One episode's training forward (token_logprobs with gradient checkpointing, vision tower trained or frozen):
    what stays resident until the backward is memory.update_saved's within 25%, both ways (frozen, the tower keeps
    nothing: model.load_model drops HF's input-grad hooks)."""
    s = videos[1][0]
    got = {f: fresh("update", s["video"], s["duration"], f) for f in (False, True)}  # a process each
    held = {f: got[f]["held"] for f in (False, True)}
    model, _ = load_model("tiny", tiny=BIG)
    want = {f: memory.update_saved(model.config, got[f]["tokens"], 2000, got[f]["patches"], f, nbytes=4)
            for f in (False, True)}
    for f in (False, True):
        assert abs(held[f] - want[f]) <= 0.25 * want[f], (f, held, want)


def test_the_dry_run_of_longvt_settings_names_a_max_rows_that_fits(tmp_path, capsys):
    """LongVT's RL settings per rank on 8 GPUs (16 prompts x 16 rollouts, 36,000 + 16,384 tokens, its view) on a
    7B-shaped config.json and a 224-px 10-minute video: does not fit with --max_rows=0 and names a --max_rows; with
    that value it fits. One verdict line, in the form the README quotes."""
    import train_grpo
    from test_eval import QWEN25_VL_7B
    from transformers import Qwen2_5_VLConfig
    generate(NeedleConfig(out=str(tmp_path), num_train=1, num_rl=0, num_eval=1, num_eval_short=0, size=224,
                          eval_min_duration=600, eval_max_duration=610, workers=1))
    cfg_dir = str(tmp_path / "qwen7b")
    Qwen2_5_VLConfig(**QWEN25_VL_7B).save_pretrained(cfg_dir)
    view = dict(visual_format="images", timestamps=False, protocol="longvt", time_grid=0.0, global_frames=512,
                global_fps=1.0, max_pixels=50176, crop_max_frames=128, crop_min_frames=1, crop_max_pixels=50176)
    args = dict(init=cfg_dir, data=str(tmp_path / "eval.jsonl"), out=str(tmp_path / "g"), dry_run=True, **view,
                gpus=8, prompts_per_step=16, group_size=16, max_new_tokens=1024, max_total_tokens=52384,
                parallel="fsdp", grad_ckpt=True, freeze_vision=True, micro_batch=1, eval_every=0)
    train_grpo.train(train_grpo.Config(**args, max_rows=0))
    out = capsys.readouterr().out
    verdict = [x for x in out.splitlines() if x.startswith("per GPU")]
    m = re.fullmatch(r"per GPU \(8 GPUs, 80 GiB\): rollout peak [\d.]+ GiB, update peak [\d.]+ GiB: does not fit "
                     r"\(fits with --max_rows=(\d+)\)", verdict[0])
    assert len(verdict) == 1 and m, out
    train_grpo.train(train_grpo.Config(**args, max_rows=int(m.group(1))))
    out = capsys.readouterr().out
    assert re.search(r"^per GPU \(8 GPUs, 80 GiB\): rollout peak [\d.]+ GiB, update peak [\d.]+ GiB: fits$", out, re.M)
    assert not (tmp_path / "g").exists()
