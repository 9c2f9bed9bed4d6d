"""train_sft.py: the masked loss, 1 process vs 2-process DDP / FSDP2, exact resume, crash-safe checkpoints,
bad rows and non-finite losses. Tiny needle videos and small frame budgets keep the file fast on 2 CPU cores."""
import dataclasses
import json
import re
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train_sft
from data import Renderer, ViewConfig, collate, model_vision, render_sft, view_from
from model import load_model, resolve_checkpoint, token_logprobs
from readers import DataError
from conftest import ranks_output, run_ranks
from needle import NeedleConfig, generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = ("tokens_per_s", "step_time")


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("needle")
    generate(NeedleConfig(out=str(out), num_train=8, num_eval=1, min_duration=60, max_duration=90,
                          eval_min_duration=60, eval_max_duration=90, seed=1))
    return str(out / "sft.jsonl")


def args(data, out, **kw):
    """Small runs: 8 short videos, 8-frame budgets, global batch 4 in micro-batches of 1."""
    base = dict(data=data, out=out, global_frames=8, crop_max_frames=8, batch_size=4, micro_batch_size=1,
                steps=2, lr=1e-3, warmup_steps=1, save_every=0)
    base.update(kw)
    return [f"--{k}={v}" for k, v in base.items()]


def params(out):
    return load_file(os.path.join(out, "model.safetensors"))


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_same_params(a, b, atol):
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], atol=atol, rtol=0, msg=k)


# --------------------------------------------------------------------------- the loss
def test_loss_only_trains_policy_tokens(sft_file):
    """Targets at mask-0 positions (prompt, vision pads, tool observation) do not change the loss or any
    gradient; a target at a mask-1 position does. The loss equals -(token_logprobs * policy_mask).sum()."""
    torch.manual_seed(0)
    model, proc = load_model("tiny")
    r = render_sft(Renderer(proc, ViewConfig(global_frames=8, crop_max_frames=8)),
                   train_sft.read_samples([sft_file])[0][0])
    batch = collate(model, [r], proc.tokenizer.pad_token_id)
    mask = batch["policy_mask"]
    assert 0 < mask.sum() < mask.numel() and mask[0, 0] == 0
    obs_start = r.input_ids.index(proc.tokenizer.convert_tokens_to_ids("<tool_response>"))
    assert mask[0, obs_start] == 0  # the tool observation is in the sequence and masked

    def loss_and_grads(labels):
        model.zero_grad()
        loss = train_sft.policy_nll(model, batch, labels)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    ids = batch["input_ids"]
    loss, grads = loss_and_grads(ids)
    vision = model_vision(batch["vision"])
    with torch.no_grad():
        logp, _ = token_logprobs(model, ids, batch["attention_mask"], batch["position_ids"], **vision)
    torch.testing.assert_close(loss, -(logp * mask).sum(), rtol=1e-5, atol=1e-4)

    g = torch.Generator().manual_seed(1)
    other = torch.where(mask.bool(), ids, torch.randint(0, 100, ids.shape, generator=g))  # every mask-0 target changed
    assert (other != ids).sum() > 0.9 * (mask == 0).sum()
    loss2, grads2 = loss_and_grads(other)
    assert torch.equal(loss, loss2)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads2))

    t = int(mask[0].nonzero()[0])  # a policy token
    changed = ids.clone()
    changed[0, t] = (changed[0, t] + 1) % 100
    assert not torch.equal(loss_and_grads(changed)[0], loss)


def test_padded_batch_equals_single_rows(sft_file):
    """policy_nll runs without an attention mask: with right padding no real token can see a pad."""
    model, proc = load_model("tiny")
    samples = train_sft.read_samples([sft_file])[0]
    rs = [render_sft(Renderer(proc, ViewConfig(global_frames=n, crop_max_frames=8)), s)
          for n, s in zip((2, 4, 8), samples)]
    assert len({len(r.input_ids) for r in rs}) > 1  # the batch is padded
    pad = proc.tokenizer.pad_token_id
    with torch.no_grad():
        together = train_sft.policy_nll(model, collate(model, rs, pad))
        alone = sum(train_sft.policy_nll(model, collate(model, [r], pad)) for r in rs)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-3)


# --------------------------------------------------------------------------- distributed
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one(sft_file, tmp_path, parallel):
    one = str(tmp_path / "one")
    train_sft.main(args(sft_file, one))
    two = str(tmp_path / parallel)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_sft.py",
           *args(sft_file, two, parallel=parallel)]
    p = run_ranks(cmd, cwd=ROOT, timeout=300)
    assert p.returncode == 0, ranks_output(p)
    for a, b in zip(metrics(one), metrics(two), strict=True):
        assert a["policy_tokens"] == b["policy_tokens"] and a["tokens"] == b["tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)  # fp32 norms of differently split sums
    assert_same_params(one, two, atol=1e-4)
    model, _ = load_model(two)  # a gathered FSDP2 checkpoint loads as a plain HF model, tied weights tied
    assert model.lm_head.weight is model.get_input_embeddings().weight


# --------------------------------------------------------------------------- resume and checkpoints
def test_resume_is_exact(sft_file, tmp_path):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    kw = dict(steps=6, batch_size=2, save_every=2)
    train_sft.main(args(sft_file, straight, **kw))
    train_sft.main(args(sft_file, split, stop_at=3, **kw))
    assert [m["step"] for m in metrics(split)] == [1, 2, 3]
    train_sft.main(args(sft_file, split, **kw) + ["--resume"])
    assert_same_params(straight, split, atol=0)
    strip = [[{k: v for k, v in m.items() if k not in TIMING} for m in metrics(o)] for o in (straight, split)]
    assert strip[0] == strip[1] and len(strip[0]) == 6
    state = torch.load(os.path.join(split, "trainer_state.pt"), weights_only=False)
    assert state["step"] == 6 and state["config"]["steps"] == 6 and len(state["rng"]) == 1
    view = json.load(open(os.path.join(split, "view.json")))  # the view it trained with, for eval.py's check
    assert view == dataclasses.asdict(view_from(train_sft.Config(**state["config"])))
    assert view["global_frames"] == 8 and view["crop_max_frames"] == 8


def test_resume_after_a_kill_mid_append_drops_the_cut_row(sft_file, tmp_path):
    """A kill while a step's row is appended to metrics.jsonl leaves a cut last line: --resume drops it (its step is
    redone) instead of failing on it, and the run ends with the uninterrupted run's rows."""
    out = str(tmp_path / "run")
    kw = dict(steps=3, batch_size=2, save_every=1)
    train_sft.main(args(sft_file, out, stop_at=2, **kw))
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"step": 3, "loss": 0.')  # what a kill mid-write leaves
    train_sft.main(args(sft_file, out, **kw) + ["--resume"])
    assert [m["step"] for m in metrics(out)] == [1, 2, 3]


KILLER = """
import os, signal, sys, torch
import model, train_sft
mode, calls = sys.argv[1], []
if mode == "mid_write":  # die while trainer_state.pt of the 2nd checkpoint is being written
    real = torch.save
    def save(obj, path, *a, **k):
        if str(path).endswith("trainer_state.pt"):
            calls.append(path)
            if len(calls) == 2:
                open(path, "wb").write(b"partial")
                os.kill(os.getpid(), signal.SIGKILL)
        return real(obj, path, *a, **k)
    torch.save = save
else:  # die between atomic_dir's two renames of the 2nd checkpoint: <out> is gone, <out>.old holds the 1st
    real = os.rename
    def rename(a, b):
        if os.path.basename(str(a)).startswith(".tmp_ckpt_") and os.path.exists(str(b) + ".old/trainer_state.pt"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(a, b)
    model.os.rename = rename
train_sft.main(sys.argv[2:])
"""


@pytest.mark.parametrize("mode", ["mid_write", "mid_swap"])
def test_kill_during_checkpoint_keeps_previous(sft_file, tmp_path, mode):
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-c", KILLER, mode, *args(sft_file, out, steps=3, batch_size=2, save_every=1)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == -9, p.stdout[-3000:] + p.stderr[-3000:]
    ckpt = resolve_checkpoint(out)
    assert ckpt == (out if mode == "mid_write" else out + ".old")
    load_model(ckpt)
    assert torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=False)["step"] == 1
    train_sft.main(args(sft_file, out, steps=3, batch_size=2, save_every=1) + ["--resume"])
    assert [m["step"] for m in metrics(out)] == [1, 2, 3]
    assert not os.path.exists(out + ".old")


# --------------------------------------------------------------------------- bad data and non-finite losses
def test_bad_rows_and_missing_videos_are_skipped(sft_file, tmp_path, capsys):
    """The one rule of every script for a bad row: stop, naming file:line (here before any work), unless
    --skip_bad_rows=true skips it with that warning. A missing video is always a named skip."""
    rows = [json.loads(line) for line in open(sft_file)]
    for r in rows:
        r["video"] = os.path.join(os.path.dirname(sft_file), r["video"])
    bad = dict(rows[0], id="gone", video=str(tmp_path / "missing.mp4"))
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps(r) for r in rows[:4]] + ["{not json", json.dumps({"question": "q"}), json.dumps(bad)]
    path.write_text("\n".join(lines) + "\n")
    out = str(tmp_path / "run")
    with pytest.raises(DataError, match=r"mixed.jsonl:5: malformed JSON"):
        train_sft.main(args(str(path), out, steps=1))
    train_sft.main(args(str(path), out, steps=1, skip_bad_rows=True))
    err = capsys.readouterr().out
    assert "mixed.jsonl:5" in err and "mixed.jsonl:6" in err and "gone" in err
    assert metrics(out)[0]["skipped_samples"] == 3


def test_non_finite_loss_skips_the_step(sft_file, tmp_path, monkeypatch):
    real, calls = train_sft.policy_nll, []

    def nan_on_second_step(model, batch, labels=None):
        calls.append(1)
        loss = real(model, batch, labels)
        return loss * float("nan") if 5 <= len(calls) <= 8 else loss  # the 4 micro-batches of step 2
    monkeypatch.setattr(train_sft, "policy_nll", nan_on_second_step)
    out = str(tmp_path / "run")
    train_sft.main(args(sft_file, out, steps=3))
    m = metrics(out)
    assert [x["skipped_update"] for x in m] == [False, True, False]
    assert m[-1]["nonfinite_steps"] == 1 and all(torch.isfinite(p).all() for p in params(out).values())


def test_an_out_that_cannot_be_written_stops_before_any_work(tmp_path, monkeypatch):
    """train_sft.py checks --out first: an impossible path stops it, naming the flag, before the model is loaded,
    the samples rendered or the warm-up run (they took minutes before the check came)."""
    def no_work(*a, **k):
        raise AssertionError("work started before the --out check")
    monkeypatch.setattr(train_sft, "load_model", no_work)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(SystemExit, match=r"--out=.*a_file/sft: cannot write there"):
        train_sft.main(args(str(tmp_path / "sft.jsonl"), f"{blocker}/sft"))


def test_a_row_longer_than_the_models_context_is_skipped_and_counted(sft_file, tmp_path, capsys):
    """max_len 0 is the model's context (max_position_embeddings; 32768 for the tiny model): a row of a 40,000-word
    question is skipped with its length and counted, not trained on for minutes; the other rows train."""
    rows = [json.loads(line) for line in open(sft_file)]
    for r in rows:
        r["video"] = os.path.join(os.path.dirname(sft_file), r["video"])
    path = tmp_path / "long.jsonl"
    long = dict(rows[0], id="long", question="what " * 40_000)
    path.write_text("\n".join(json.dumps(r) for r in rows[:4] + [long]) + "\n")
    out = str(tmp_path / "run")
    train_sft.main(args(str(path), out, steps=1))
    assert re.search(r"skipping sample long: 4\d{4} tokens > max_len 32768 \(the model's context",
                     capsys.readouterr().out)
    assert metrics(out)[0]["skipped_samples"] == 1


def test_a_row_without_duration_on_a_corrupt_video_says_what_is_wrong(tmp_path, capsys):
    """A needle SFT row without `duration` whose video is corrupt was skipped with "KeyError: 'duration'", hiding the
    cause: the warning now names the video and says it cannot be read."""
    generate(NeedleConfig(out=str(tmp_path), num_train=5, num_eval=0, num_eval_short=0, min_duration=60,
                          max_duration=80, seed=3))
    rows = [json.loads(line) for line in open(tmp_path / "sft.jsonl")]
    (tmp_path / "videos" / "bad.mp4").write_bytes(b"\x00" * 5000)
    rows[0] = {k: v for k, v in dict(rows[0], video="videos/bad.mp4").items() if k != "duration"}
    (tmp_path / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    train_sft.main(args(str(tmp_path / "sft.jsonl"), str(tmp_path / "out"), steps=1,
                        view_jitter=False))  # (the jittered view probes the video first)
    out = capsys.readouterr().out
    assert re.search(r"skipping sample train_00000 \(.*bad.mp4\): VideoError: cannot read video .*bad.mp4", out), out
    assert "KeyError" not in out


def test_runs_from_a_checkpoint_keep_its_prompt_layout(sft_file, tmp_path, capsys):
    """SFT with --timestamps=false -> GRPO and RFT from it render the same layout without being told (the view.json
    each writes says so); a flag given explicitly wins, with a warning naming the flag that matches."""
    import train_grpo
    sft, grpo, rft, other = (str(tmp_path / n) for n in ("sft", "grpo", "rft", "other"))
    train_sft.main(args(sft_file, sft, steps=1, timestamps="false"))
    view = lambda d: json.load(open(os.path.join(d, "view.json")))  # noqa: E731
    assert view(sft)["timestamps"] is False
    rl = os.path.join(os.path.dirname(sft_file), "train.jsonl")
    train_grpo.train(train_grpo.Config(init=sft, data=rl, eval_data="", out=grpo, steps=1, prompts_per_step=1,
                                       group_size=2, max_turns=1, max_new_tokens=2, kl_coef=0.0, eval_every=0,
                                       save_every=0, log_rollouts_every=0, global_frames=4))
    assert "timestamps=False: as" in capsys.readouterr().out
    assert view(grpo)["timestamps"] is False and view(grpo)["global_frames"] == 4
    with pytest.raises(ValueError, match="protocol"):  # checked when the flags are read, before any work
        train_grpo.Config(init=sft, data=rl, out=str(tmp_path / "x"), protocol="verl")
    assert not (tmp_path / "x").exists()
    train_sft.main(args(sft_file, rft, steps=1, init=grpo))
    assert "timestamps=False: as" in capsys.readouterr().out and view(rft)["timestamps"] is False
    train_sft.main(args(sft_file, other, steps=1, init=grpo, timestamps="true"))
    out = capsys.readouterr().out
    assert "warning" in out and "--timestamps=false" in out and view(other)["timestamps"] is True


def test_wandb_gets_the_rows_of_metrics_jsonl(sft_file, tmp_path, monkeypatch):
    """--wandb=<project>: every row written to metrics.jsonl is also logged to the W&B run (a stand-in module here, as
    the package is optional), at its step, with the config; without the package it is a clear error."""
    import types
    calls = []

    class Run:
        def log(self, row, step):
            calls.append(("log", row, step))

        def finish(self):
            calls.append(("finish",))
    fake = types.SimpleNamespace(init=lambda **k: calls.append(("init", k)) or Run())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = str(tmp_path / "run")
    train_sft.main(args(sft_file, out, steps=2, wandb="my-project"))
    assert calls[0][0] == "init" and calls[0][1]["project"] == "my-project" and calls[0][1]["config"]["steps"] == 2
    assert [(c[1], c[2]) for c in calls if c[0] == "log"] == [(m, m["step"]) for m in metrics(out)]
    assert calls[-1] == ("finish",)
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(SystemExit, match="pip install wandb"):
        train_sft.main(args(sft_file, str(tmp_path / "b"), steps=1, wandb="my-project"))
