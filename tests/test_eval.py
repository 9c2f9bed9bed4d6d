"""Tests of eval.py and report.py on the tiny model and a few generated needle videos (CPU).

A random tiny model is never right, so the RFT export and the report are exercised with a *scripted* policy:
the real tiny model wrapped so that its next-token logits put all mass on a scripted token (the ids of an SFT
trajectory). Everything else is the real path: rollout (KV cache, real crop_video calls and observations),
reward, export with the token-exact re-render check, report. test_overfit_export (opt-in, LONGVT_SLOW_TESTS=1,
~2-3 CPU-minutes) does the same with a tiny model overfitted on one SFT trajectory, through the CLI.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import eval as ev  # noqa: E402
from data import Renderer, render_sft, view_from  # noqa: E402
from model import load_model  # noqa: E402
from needle import NeedleConfig, generate  # noqa: E402
from readers import load_samples  # noqa: E402
from conftest import ranks_output, run_ranks  # noqa: E402

FAST = ["--global_frames=4", "--max_pixels=784", "--crop_max_frames=4", "--crop_max_pixels=784"]
FAST_CFG = dict(global_frames=4, max_pixels=784, crop_max_frames=4, crop_max_pixels=784)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run ~10x slower with 2 intra-op threads on a busy 2-core machine (spinning OpenMP workers)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


ENV = dict(os.environ, OMP_NUM_THREADS="1")


def failure(r):
    """The first traceback of a failed subprocess (torchrun puts its own summary last)."""
    err = r.stderr
    return err[err.find("Traceback"):][:3000] if "Traceback" in err else err[-3000:]


@pytest.fixture(scope="module")
def needle_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("needle"))
    generate(NeedleConfig(out=out, num_train=4, num_eval=3, min_duration=60, max_duration=90,
                          eval_min_duration=60, eval_max_duration=120))
    return out


@pytest.fixture(scope="module")
def tiny():
    model, processor = load_model("tiny")
    return model, processor


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def with_bad_videos(needle_dir, rows):
    """rows + one sample whose video is missing and one whose video is garbage bytes."""
    bad = os.path.join(needle_dir, "videos", "corrupt.mp4")
    with open(bad, "wb") as f:
        f.write(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 20)
    base = {k: v for k, v in rows[0].items() if k not in ("turns",)}
    return rows + [dict(base, id="missing_video", video="videos/nope.mp4"),
                   dict(base, id="corrupt_video", video="videos/corrupt.mp4")]


class Scripted(torch.nn.Module):
    """A policy that emits scripted turns (lists of token ids), one episode per script, in order (batch of 1).
    The wrapped model still runs every forward (cache, positions, vision); `module` lets model.unwrap see it."""

    def __init__(self, model, tokenizer, scripts):
        super().__init__()
        self.module, self.scripts = model, list(scripts)
        ids = tokenizer.convert_tokens_to_ids
        self.im_start, self.im_end, self.tool_end = ids("<|im_start|>"), ids("<|im_end|>"), ids("</tool_call>")

    def forward(self, input_ids, **kw):
        out = self.module(input_ids=input_ids, **kw)
        assert input_ids.shape[0] == 1, "the scripted policy runs one sample per rollout call"
        first = int(input_ids[0, 0])
        if first == self.im_start:  # the prompt prefill: a new episode
            self.script, self.turn, self.pos = self.scripts.pop(0), 0, 0
        elif input_ids.shape[1] > 1:  # [</tool_call>] + tool observation: the next turn
            self.turn, self.pos = self.turn + 1, 0
        else:  # one decode step
            self.pos += 1
        turn = self.script[self.turn] if self.turn < len(self.script) else []
        tok = turn[self.pos] if self.pos < len(turn) else self.im_end
        logits = torch.full_like(out.logits[:, -1:], -1e4)
        logits[..., tok] = 0.0
        out.logits = logits
        return out


def script_of(tok, turns, spell_answer=False):
    """Token ids of each turn as the canonical encoding of its text (the final turn + <|im_end|>);
    spell_answer: the text inside <answer> one character per token (decodes to the same text, but
    re-encoding it gives other ids)."""
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    out = [enc(t) for t in turns]
    if spell_answer:
        head, rest = turns[-1].split("<answer>")
        ans, tail = rest.split("</answer>")
        out[-1] = enc(head + "<answer>") + [tok.convert_tokens_to_ids(c) for c in ans] + enc("</answer>" + tail)
    out[-1] = out[-1] + [tok.convert_tokens_to_ids("<|im_end|>")]
    return out


def call(a, b):
    return f'<tool_call>{{"name": "crop_video", "arguments": {{"start_time": {a}, "end_time": {b}}}}}</tool_call>'


def scripted_rows(needle_dir, tok):
    """4 SFT rows with their scripts: A the SFT trace (exportable), B the same with a non-canonical answer
    tokenization (correct, not exportable), C a wrong answer, D a bad call then a far-off crop then the right
    answer (correct, IoU < 0.3). Then one missing and one corrupt video (skipped, never reach the model)."""
    rows = load_samples(os.path.join(needle_dir, "sft.jsonl"))
    a, b, c, d = rows
    c_turns = c["turns"][:-1] + [c["turns"][-1].replace(f"<answer>{c['answer']}</answer>", "<answer>nothing</answer>")]
    w = d["window"]
    far = (w[1] + 1, w[1] + 3) if d["duration"] - w[1] > 5 else (0, 2)
    d_turns = [f"<think>Look.</think>{call(50, 10)}", f"<think>Again.</think>{call(*far)}",
               f"<think>So.</think><answer>{d['answer']}</answer>"]
    scripts = [script_of(tok, a["turns"]), script_of(tok, b["turns"], spell_answer=True),
               script_of(tok, c_turns), script_of(tok, d_turns)]
    return with_bad_videos(needle_dir, rows), scripts


# --------------------------------------------------------------------------- CLI on the random tiny model
@pytest.fixture(scope="module")
def cli_run(needle_dir, tmp_path_factory):
    rows = [json.loads(line) for line in open(os.path.join(needle_dir, "eval.jsonl"))]
    data = os.path.join(needle_dir, "eval_with_bad.jsonl")
    write_jsonl(data, with_bad_videos(needle_dir, rows))
    out = str(tmp_path_factory.mktemp("eval_out"))
    r = subprocess.run([sys.executable, "eval.py", "--model=tiny", f"--data={data}", f"--out={out}",
                        "--max_new_tokens=12", "--batch_size=2", "--report_samples=2", *FAST],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, failure(r)
    preds = [json.loads(line) for line in open(os.path.join(out, "predictions.jsonl"))]
    return out, json.load(open(os.path.join(out, "summary.json"))), preds, r.stdout


def test_summary_consistent_with_predictions(cli_run):
    out, s, preds, stdout = cli_run
    keys = ["n", "accuracy", "format_rate", "mean_iou", "tool_calls_per_episode", "tool_error_rate", "judge_failures",
            "mean_tokens", "seconds_per_sample", "skipped", "skipped_names", "accuracy_by_length"]
    assert all(k in s for k in keys), set(keys) - set(s)
    assert s["n"] == len(preds) == 5 and [p["index"] for p in preds] == list(range(5))
    scored = [p for p in preds if p["stop_reason"] != "skipped"]
    assert s["scored"] == len(scored) == 3
    assert s["accuracy"] == pytest.approx(sum(p["score"] for p in scored) / 3)
    assert s["format_rate"] == pytest.approx(sum(p["components"]["format"] for p in scored) / 3)
    assert s["mean_tokens"] == pytest.approx(sum(p["tokens"] for p in scored) / 3)
    assert s["tool_calls_per_episode"] == pytest.approx(sum(len(p["tool_calls"]) for p in scored) / 3)
    assert sum(v["n"] for v in s["accuracy_by_length"].values()) == 3
    assert sum(s["stop_reasons"].values()) == 5
    for p in scored:
        assert {"id", "question", "reference", "answer", "score", "components", "tool_calls", "stop_reason",
                "tokens", "latency"} <= set(p)
        assert 0 < p["tokens"] <= 12 * 6 and p["total_tokens"] > p["prompt_tokens"]
    assert "accuracy" in stdout and "seconds_per_sample" in stdout  # the printed table
    assert os.path.exists(os.path.join(out, "report.html"))


def test_missing_and_corrupt_videos_are_skipped_and_named(cli_run):
    _, s, preds, stdout = cli_run
    assert s["skipped"] == 2 and s["skipped_names"] == ["corrupt_video", "missing_video"]
    bad = {p["id"]: p for p in preds if p["stop_reason"] == "skipped"}
    assert set(bad) == {"missing_video", "corrupt_video"}
    assert "not found" in bad["missing_video"]["error"] and bad["corrupt_video"]["error"]
    assert "missing_video" in stdout and "corrupt_video" in stdout


KILL_EVAL = """
import os, signal, sys
import eval as ev
real, calls = ev.rollout, []
def rollout(*a, **k):
    calls.append(1)
    if len(calls) == int(sys.argv[1]):  # killed while this batch runs
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*a, **k)
ev.rollout = rollout
ev.main(sys.argv[2:])
"""


def test_a_killed_eval_goes_on_where_it_stopped(needle_dir, tmp_path, monkeypatch, capsys):
    """Killed in its third batch, an eval leaves the first two batches' results in <out>/partial_rank0.jsonl. The
    rerun keeps them, rolls out the other samples only, and writes the predictions and trajectories of an
    uninterrupted run, then removes the partial file. A line cut by the kill is dropped (its sample redone); a rerun
    with other settings keeps nothing."""
    data = os.path.join(needle_dir, "eval.jsonl")
    n = len(load_samples(data))
    base = dict(model="tiny", data=data, batch_size=1, samples=2, temperature=1.0, max_new_tokens=8,
                report_samples=0, save_trajectories="true")
    flags = lambda out, **kw: [f"--{k}={v}" for k, v in dict(base, out=out, **kw).items()] + FAST  # noqa: E731
    calls = []
    real = ev.rollout
    monkeypatch.setattr(ev, "rollout", lambda *a, **k: calls.append(1) or real(*a, **k))
    ev.main(flags(str(tmp_path / "straight")))
    assert len(calls) == n
    out = str(tmp_path / "killed")
    r = subprocess.run([sys.executable, "-c", KILL_EVAL, "3", *flags(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env=ENV)
    assert r.returncode == -9, failure(r)
    lines = open(os.path.join(out, "partial_rank0.jsonl")).read().splitlines()
    assert len(lines) == 1 + 2 * 2  # the settings, then two samples x two draws
    with open(os.path.join(out, "partial_rank0.jsonl"), "w") as f:
        f.write("\n".join(lines[:-1] + [lines[-1][:40]]))  # as if the kill had cut the second sample's last line
    calls.clear()
    ev.main(flags(out))
    assert len(calls) == n - 1 and f"resuming: 1 of {n} samples" in capsys.readouterr().out
    for name in ("predictions.jsonl", "trajectories.jsonl"):
        a, b = (open(os.path.join(str(tmp_path / d), name)).read().splitlines() for d in ("straight", "killed"))
        strip = lambda rows: [{k: v for k, v in json.loads(x).items() if k != "latency"} for x in rows]  # noqa
        assert strip(a) == strip(b), name
    assert not os.path.exists(os.path.join(out, "partial_rank0.jsonl"))
    r = subprocess.run([sys.executable, "-c", KILL_EVAL, "2", *flags(out)], cwd=ROOT, capture_output=True,
                       timeout=300, env=ENV)
    assert r.returncode == -9 and len(open(os.path.join(out, "partial_rank0.jsonl")).read().splitlines()) == 3
    calls.clear()
    ev.main(flags(out, max_new_tokens=6))  # other settings: the kept batch is not theirs
    assert len(calls) == n and "resuming" not in capsys.readouterr().out


def test_default_out_and_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert ev.default_model() == "tiny" and ev.default_out("tiny") == os.path.join("runs", "eval_tiny")
    for d in ("runs/sft", "runs/grpo"):
        os.makedirs(d)
        open(os.path.join(d, "config.json"), "w").close()
    os.utime("runs/sft/config.json", (1e9, 1e9))
    assert ev.default_model() == os.path.join("runs", "grpo")
    assert ev.default_out("runs/grpo") == os.path.join("runs", "grpo", "eval")


def test_prompt_layout_follows_the_checkpoint_unless_given(needle_dir, tmp_path, capsys):
    """A checkpoint's view.json (written by the trainers): a prompt-layout field (here timestamps) that eval's flags do
    not set is taken from it, and said; one they set otherwise is kept, with a warning naming the flag that matches.
    Frame budgets and tools are not layout: they follow eval's flags silently."""
    from data import ViewConfig, save_view
    from checkpoint import save_model
    ckpt = str(tmp_path / "ckpt")
    model, processor = load_model("tiny")
    save_model(ckpt, model, processor)
    save_view(ViewConfig(timestamps=False, global_frames=32), ckpt)
    data = os.path.join(needle_dir, "eval.jsonl")
    common = [f"--model={ckpt}", f"--data={data}", "--limit=1", "--max_new_tokens=4", "--report_samples=0", *FAST]
    view = lambda d: json.load(open(tmp_path / d / "summary.json"))["view"]  # noqa: E731
    ev.main(common + [f"--out={tmp_path / 'a'}"])
    out = capsys.readouterr().out
    assert "timestamps=False: as" in out and "warning" not in out
    assert view("a")["timestamps"] is False and view("a")["global_frames"] == 4
    ev.main(common + [f"--out={tmp_path / 'b'}", "--timestamps=true", "--tools=false"])
    out = capsys.readouterr().out
    assert "warning" in out and "timestamps=False" in out and "--timestamps=false" in out
    assert view("b")["timestamps"] is True and view("b")["tools"] is False


# --------------------------------------------------------------------------- scripted policy: RFT, tools off, report
@pytest.fixture(scope="module")
def scripted_run(needle_dir, tiny, tmp_path_factory, monkeypatch_module):
    model, processor = tiny
    rows, scripts = scripted_rows(needle_dir, processor.tokenizer)
    data = os.path.join(needle_dir, "scripted.jsonl")
    write_jsonl(data, rows)
    policy = Scripted(model, processor.tokenizer, scripts)
    monkeypatch_module.setattr(ev, "load_model", lambda name, device: (policy, processor))
    out = str(tmp_path_factory.mktemp("scripted_out"))
    rft = os.path.join(out, "rft.jsonl")
    ev.main(["--model=tiny", f"--data={data}", f"--out={out}", f"--export_rft={rft}", "--batch_size=1",
             "--max_new_tokens=96", "--save_trajectories=true"])
    assert not policy.scripts, "every script was used"
    preds = [json.loads(line) for line in open(os.path.join(out, "predictions.jsonl"))]
    trajs = [json.loads(line) for line in open(os.path.join(out, "trajectories.jsonl"))]
    return out, json.load(open(os.path.join(out, "summary.json"))), preds, trajs, rft, processor


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_rft_export_only_correct_grounded_and_token_exact(scripted_run, needle_dir):
    out, s, preds, trajs, rft, processor = scripted_run
    assert [p["score"] for p in preds[:4]] == [1.0, 1.0, 0.0, 1.0]
    assert preds[3]["tool_calls"][0]["error"] and preds[3]["components"]["iou"] < 0.3
    assert s["rft"] == dict(s["rft"], correct=3, candidates=2, exported=1, not_roundtrip=1)
    rows = load_samples(rft)
    assert [r["id"] for r in rows] == [preds[0]["id"]]
    # the exported row re-renders to exactly the ids the policy produced
    renderer = Renderer(processor, view_from(ev.Config()))
    for r in rows:
        t = next(t for t in trajs if t["id"] == r["id"])
        rendered = render_sft(renderer, r)
        assert rendered.input_ids == t["input_ids"] and rendered.policy_mask == t["policy_mask"]
    # ...which B's does not: the same text, but its answer was sampled one character per token
    sample_b = load_samples(os.path.join(needle_dir, "sft.jsonl"))[1]
    row_b = dict(sample_b, turns=preds[1]["turns"][:-1] + [preds[1]["turns"][-1].removesuffix("<|im_end|>")])
    assert row_b["turns"] == sample_b["turns"]
    assert render_sft(renderer, row_b).input_ids != trajs[1]["input_ids"]
    assert s["skipped"] == 2 and s["skipped_names"] == ["corrupt_video", "missing_video"]
    bad = {p["id"]: p for p in preds if p["stop_reason"] == "skipped"}
    assert set(bad) == {"missing_video", "corrupt_video"}
    assert "not found" in bad["missing_video"]["error"] and bad["corrupt_video"]["error"]


def test_tools_off_makes_no_tool_calls(needle_dir, tiny):
    model, processor = tiny
    rows = load_samples(os.path.join(needle_dir, "sft.jsonl"))[:2]
    policy = Scripted(model, processor.tokenizer, [script_of(processor.tokenizer, r["turns"]) for r in rows])
    s, preds, trajs = ev.evaluate(policy, processor, rows, dict(tools=False, batch_size=1, max_new_tokens=96,
                                                               **FAST_CFG), return_trajectories=True)
    assert s["tool_calls_per_episode"] == 0 and all(p["tool_calls"] == [] for p in preds)
    assert all(len(p["turns"]) == 1 and "<tool_call>" in p["turns"][0] for p in preds)  # tried, not executed
    prompt = processor.tokenizer.decode(trajs[0].input_ids[:trajs[0].prompt_len])
    assert "crop_video" not in prompt and "<tools>" not in prompt


def test_pass_at_k(needle_dir, tiny):
    model, processor = tiny
    rows = load_samples(os.path.join(needle_dir, "eval.jsonl"))[:2]
    s, preds = ev.evaluate(model, processor, rows, dict(samples=3, temperature=1.0, max_new_tokens=4, **FAST_CFG))
    assert [(p["index"], p["draw"]) for p in preds] == [(i, k) for i in range(2) for k in range(3)]
    assert s["n"] == 2 and s["trajectories"] == 6 and "pass@3" in s
    with pytest.raises(SystemExit, match="temperature"):
        ev.main(["--samples=2"])


def test_episodes_out_of_room_in_their_first_turn_are_counted(needle_dir, tiny):
    """max_total_tokens a few tokens above the prompt: every episode stops on `length` before any call or answer
    (the budget is too small for the task); the summary counts those apart from episodes cut after a call."""
    model, processor = tiny
    rows = load_samples(os.path.join(needle_dir, "eval.jsonl"))[:2]
    _, preds = ev.evaluate(model, processor, rows, dict(max_new_tokens=4, **FAST_CFG))
    tight = max(p["prompt_tokens"] for p in preds) + 3
    s, preds = ev.evaluate(model, processor, rows, dict(max_new_tokens=16, max_total_tokens=tight, **FAST_CFG))
    assert all(p["stop_reason"] == "length" and not p["tool_calls"] for p in preds) and s["first_turn_length"] == 2
    later = [dict(preds[0], stop_reason="length", tool_calls=[dict(window=[1.0, 2.0], error=None, raw="")]),
             dict(preds[1], stop_reason="answer")]
    assert ev.summarize(preds[:1] + later, 1.0)["first_turn_length"] == 1


CHROMIUM = "/usr/bin/chromium"


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium (apt-get install -y chromium)")
def test_report_renders_in_chromium(scripted_run, tmp_path):
    out, s, preds, *_ = scripted_run
    page = "file://" + os.path.join(out, "report.html")
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'chr'}",
             "--enable-logging=stderr", "--v=0"]
    r = subprocess.run(flags + ["--dump-dom", page], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    dom = r.stdout
    assert dom.count('<section class="sample"') == len(preds) == 6
    assert 'data-broken-images="0"' in dom  # the self-check ran (no script error) and every image decoded
    assert "Uncaught" not in r.stderr
    assert dom.count('<div class="crop"') == 4 and dom.count('<div class="gt"') == 4  # 1 valid crop per scored sample
    assert dom.count("badge correct") == 3 and dom.count("badge wrong") == 1 and dom.count("badge skipped") == 2
    art = os.path.join(ROOT, "test_artifacts")
    os.makedirs(art, exist_ok=True)
    shot = os.path.join(art, "report.png")
    r = subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1280,2000", "--hide-scrollbars", page],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and os.path.getsize(shot) > 10_000, r.stderr[-2000:]


# --------------------------------------------------------------------------- distributed and the opt-in overfit
def test_torchrun_two_ranks(needle_dir, tmp_path):
    out = str(tmp_path / "out")
    r = run_ranks([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   "eval.py", "--model=tiny", f"--data={needle_dir}/eval.jsonl", f"--out={out}",
                   "--max_new_tokens=4", "--report_samples=0", f"--export_rft={out}/rft.jsonl",
                   "--save_trajectories=true", *FAST], cwd=ROOT, timeout=300, env=ENV)
    assert r.returncode == 0, ranks_output(r)
    preds = [json.loads(line) for line in open(os.path.join(out, "predictions.jsonl"))]
    s = json.load(open(os.path.join(out, "summary.json")))
    assert [p["index"] for p in preds] == [0, 1, 2] and s["n"] == 3 and s["scored"] == 3
    trajs = [json.loads(line) for line in open(os.path.join(out, "trajectories.jsonl"))]  # gathered token ids
    assert [t["id"] for t in trajs] == [p["id"] for p in preds] and all(len(t["input_ids"]) > 4 for t in trajs)
    assert s["rft"]["exported"] == 0 and os.path.exists(os.path.join(out, "rft.jsonl"))
    assert [p["id"] for p in preds] == [x["id"] for x in load_samples(f"{needle_dir}/eval.jsonl")]


@pytest.mark.skipif(os.environ.get("LONGVT_SLOW_TESTS") != "1", reason="slow (~2-3 CPU-minutes): LONGVT_SLOW_TESTS=1")
def test_overfit_export(needle_dir, tmp_path):
    """Overfit a fresh tiny model on one SFT trajectory, save it, and export its greedy trace via the CLI."""
    from data import collate, model_vision
    from checkpoint import save_model
    from model import token_logprobs
    from data import ViewConfig
    model, processor = load_model("tiny")
    row = load_samples(os.path.join(needle_dir, "sft.jsonl"))[0]
    view = ViewConfig(global_frames=4, max_pixels=784, crop_max_frames=4, crop_max_pixels=784)
    batch = collate(model, [render_sft(Renderer(processor, view), row)], processor.tokenizer.pad_token_id)
    vision = model_vision(batch["vision"])
    mask = batch["policy_mask"].float()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.98), weight_decay=0.0)
    for _ in range(260):
        logp, _ = token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["position_ids"], **vision)
        loss = -(logp * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    ckpt = str(tmp_path / "ckpt")
    save_model(ckpt, model, processor)
    data = str(tmp_path / "one.jsonl")
    write_jsonl(data, [{k: v for k, v in row.items() if k != "turns"}])
    rft = str(tmp_path / "rft.jsonl")
    r = subprocess.run([sys.executable, "eval.py", f"--model={ckpt}", f"--data={data}", f"--export_rft={rft}",
                        "--max_new_tokens=96", *FAST], cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, failure(r)
    s = json.load(open(os.path.join(ckpt, "eval", "summary.json")))
    assert s["accuracy"] == 1.0 and s["rft"]["exported"] == 1
    assert load_samples(rft)[0]["turns"] == row["turns"]
    shutil.rmtree(ckpt)


def test_bad_outputs_and_an_unreachable_judge_stop_eval_before_any_work(needle_dir, tmp_path, monkeypatch):
    """eval.py checks that --out (and --export_rft's folder) can be written and health-checks a configured judge
    before it loads the model or rolls anything out: an impossible path is a SystemExit naming the flag, an
    unreachable judge train_grpo.py's error (not a run scored by rules alone that exits 0). summary.json is replaced
    through a temp file: a write that fails (a full disk) keeps the previous one whole."""
    def no_work(*a, **k):
        raise AssertionError("the model was loaded: the check came after work started")
    monkeypatch.setattr(ev, "load_model", no_work)
    data = os.path.join(needle_dir, "eval.jsonl")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(SystemExit, match=r"--out=.*a_file/out: cannot write there"):
        ev.main([f"--data={data}", f"--out={blocker}/out"])
    with pytest.raises(SystemExit, match=r"--export_rft=.*a_file/x: cannot write there"):
        ev.main([f"--data={data}", f"--out={tmp_path / 'ok'}", f"--export_rft={blocker}/x/rft.jsonl"])
    monkeypatch.setenv("LLM_AS_A_JUDGE_BASE", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(RuntimeError, match="LLM judge unreachable at http://127.0.0.1:9"):
        ev.main([f"--data={data}", f"--out={tmp_path / 'ok'}"])

    out = str(tmp_path / "w")
    summary = dict(n=1, view={})
    ev.write_outputs(out, summary, [], report_samples=0)
    real_open = open

    def full_disk(path, mode="r", *a, **k):  # the summary's temp file: half written, then the disk is full
        f = real_open(path, mode, *a, **k)
        if "summary" in str(path) and "w" in mode:
            f.write('{"n": ')
            f.flush()
            f.write = lambda *_: (_ for _ in ()).throw(OSError(28, "No space left on device"))
        return f
    monkeypatch.setattr("builtins.open", full_disk)
    with pytest.raises(OSError, match="No space left"):
        ev.write_outputs(out, dict(n=2, view={}), [], report_samples=0)
    monkeypatch.setattr("builtins.open", real_open)
    assert not [p for p in os.listdir(out) if ".tmp" in p]  # the temp file is removed
    assert json.load(open(os.path.join(out, "summary.json"))) == summary


def test_bad_rows_stop_eval_and_grpo_naming_file_and_line_unless_skipped(needle_dir, tmp_path, capsys, monkeypatch):
    """The rule train_sft.py follows too: a malformed line or a bad field stops eval.py and train_grpo.py with a
    DataError naming file:line before any work; --skip_bad_rows=true skips it with that warning and evaluates the
    rest."""
    import train_grpo
    from readers import DataError
    monkeypatch.setattr(ev, "load_model", load_model)  # not the scripted policy an earlier fixture put there
    good = [line for line in open(os.path.join(needle_dir, "eval.jsonl")) if line.strip()][:1]
    path = tmp_path / "mixed.jsonl"
    path.write_text(good[0].replace('"videos/', f'"{needle_dir}/videos/') + "{not json\n"
                    + json.dumps({"video": "a.mp4", "question": None, "answer": "red"}) + "\n")
    with pytest.raises(DataError, match=r"mixed.jsonl:2: malformed JSON"):
        ev.main([f"--data={path}", f"--out={tmp_path / 'e'}"])
    with pytest.raises(DataError, match=r"mixed.jsonl:2: malformed JSON"):
        train_grpo.train(train_grpo.Config(data=str(path), out=str(tmp_path / "g"), init="tiny", eval_every=0))
    ev.main([f"--data={path}", f"--out={tmp_path / 'e'}", "--skip_bad_rows=true", "--max_new_tokens=4",
             "--report_samples=0", *FAST])
    out = capsys.readouterr().out
    assert "skipping " in out and "mixed.jsonl:2: malformed JSON" in out and "mixed.jsonl:3: question must be" in out
    assert json.load(open(tmp_path / "e" / "summary.json"))["n"] == 1


def test_a_budget_the_first_prompt_cannot_fit_stops_eval_and_grpo_before_any_rollout(needle_dir, tmp_path,
                                                                                      monkeypatch):
    """The README's old 7B command ran every episode to `length` after one token, silently: eval.py and
    train_grpo.py render the first sample's prompt first and stop, naming its length, the budget and the flag."""
    import train_grpo
    monkeypatch.setattr(ev, "load_model", load_model)  # not the scripted policy an earlier fixture put there
    data = os.path.join(needle_dir, "eval.jsonl")
    msg = r"first sample's prompt is \d+ tokens: with one turn of max_new_tokens=64 it does not fit " \
          r"max_total_tokens=200. Raise --max_total_tokens"
    with pytest.raises(SystemExit, match=msg):
        ev.main([f"--data={data}", f"--out={tmp_path / 'e'}", "--max_total_tokens=200", "--max_new_tokens=64"])
    with pytest.raises(SystemExit, match=msg):
        train_grpo.train(train_grpo.Config(data=data, out=str(tmp_path / "g"), init="tiny", eval_every=0,
                                           kl_coef=0.0, max_total_tokens=200, max_new_tokens=64))
    assert not os.path.exists(tmp_path / "g" / "metrics.jsonl")


# Qwen2.5-VL-7B-Instruct's published config.json sizes (no weights exist here): what --dry_run reads
QWEN25_VL_7B = dict(
    text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000, rope_theta=1e6),
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31]))
LONGVT_VIEW = ["--visual_format=images", "--timestamps=false", "--protocol=longvt", "--time_grid=0",
               "--global_frames=512", "--global_fps=1", "--max_pixels=50176", "--crop_max_frames=128",
               "--crop_max_pixels=50176", "--max_new_tokens=1024"]


def test_dry_run_sizes_a_7b_run_from_its_config_alone(needle_dir, tmp_path, capsys):
    """--dry_run on a directory holding only a 7B-shaped config.json (no weights, no tokenizer): the prompt, crop
    and episode token counts of the view (vision tokens as Qwen-VL patches them: (w/14)(h/14)/4 per frame, plus
    its two markers) and the KV cache per row (2 x 28 layers x 4 KV heads x 128 x 2 bytes = 56 KiB per token);
    eval and train_grpo print the same numbers, load no weights and write nothing."""
    import train_grpo
    from transformers import Qwen2_5_VLConfig
    from video import fit_size, video_info
    cfg_dir = str(tmp_path / "qwen7b")
    Qwen2_5_VLConfig(**QWEN25_VL_7B).save_pretrained(cfg_dir)
    data = os.path.join(needle_dir, "eval.jsonl")
    sample = load_samples(data)[0]
    info = video_info(sample["video"])
    w, h = fit_size(info["width"], info["height"], 50176)
    per_frame = (w // 14) * (h // 14) // 4 + 2
    frames = min(512, int(sample["duration"]))
    ev.main([f"--model={cfg_dir}", f"--data={data}", f"--out={tmp_path / 'e'}", "--dry_run=true",
             "--max_total_tokens=81920", *LONGVT_VIEW])
    out = capsys.readouterr().out
    prompt = int(out.split("prompt: ")[1].split()[0])
    crop = int(out.split("one crop observation: ")[1].split()[0])
    assert frames * per_frame < prompt < frames * per_frame + 1500  # + the system turn, question, path (tiny tokens)
    assert 128 * per_frame < crop < 128 * per_frame + 60
    episode = prompt + 5 * (1024 + crop) + 1024
    assert f"= {episode} tokens" in out and "56.0 KiB per token" in out
    from kvcache import capacity  # the in-place cache's buffers: the episode's columns plus their headroom
    axis = min(episode, 81920 + crop + 1024 + 1)  # holes are compacted before the axis passes the budget
    assert f"{57344 * capacity(axis) / 2 ** 30:.1f} GiB per row" in out and "tiny tokenizer" in out
    assert re.search(r"^per GPU \(1 GPUs, 80 GiB\): rollout peak [\d.]+ GiB, update peak 0.0 GiB: fits$", out, re.M)
    assert not (tmp_path / "e").exists()
    view = dict(visual_format="images", timestamps=False, protocol="longvt", time_grid=0.0, global_frames=512,
                global_fps=1.0, max_pixels=50176, crop_max_frames=128, crop_min_frames=1, crop_max_pixels=50176)
    train_grpo.train(train_grpo.Config(init=cfg_dir, data=data, out=str(tmp_path / "g"), dry_run=True, **view,
                                       max_new_tokens=1024, max_total_tokens=8192, prompts_per_step=16,
                                       group_size=16, eval_every=0))
    out = capsys.readouterr().out
    assert f"prompt: {prompt} tokens" in out and "32 of 256 rows" not in out and "256 of 256 rows" in out
    assert not (tmp_path / "g").exists()


def test_the_readmes_longvt_budgets_pass_the_check_and_the_old_ones_stop(tmp_path):
    """The README's LongVT settings (512 frames at 1 fps, 224x224, 1,024-token turns) on a 224-px, 10-minute video:
    the budget check stops 16384 (the old RL budget) naming both numbers, and passes the corrected 86016 (the check eval.py and train_grpo.py run before any rollout)."""
    from data import ViewConfig
    from model import build_tiny_processor
    from rollout import check_budget, prepare
    generate(NeedleConfig(out=str(tmp_path), num_train=1, num_rl=0, num_eval=1, num_eval_short=0, size=224,
                          eval_min_duration=600, eval_max_duration=610, workers=1))
    sample = load_samples(str(tmp_path / "eval.jsonl"))[0]
    view = ViewConfig(visual_format="images", timestamps=False, protocol="longvt", time_grid=0.0, global_frames=512,
                      global_fps=1.0, max_pixels=50176, crop_max_frames=128, crop_min_frames=1,
                      crop_max_pixels=50176)
    proc = build_tiny_processor()
    with pytest.raises(SystemExit, match=r"prompt is \d{5} tokens: with one turn of max_new_tokens=1024 it does not "
                                         r"fit max_total_tokens=16384"):
        check_budget(proc, prepare([sample], view)[0], view, 1024, 16384)
    assert check_budget(proc, prepare([sample], view)[0], view, 1024, 86016) is None
