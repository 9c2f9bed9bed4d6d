"""train_grpo.py: the loss and advantages against hand-computed values, dynamic sampling, a toy reward that
the tiny model learns, 2-process DDP / FSDP2 on gloo with exact resume, and a judge that goes down mid-run.
Tiny needle videos, 2-frame global views, no tool schema and 2-token turns keep the file fast on 2 CPU cores."""
import json
import re
import math
import os
import sys
import threading
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from safetensors.torch import load_file

import train_grpo
from data import ViewConfig, collate, model_vision
from checkpoint import save_model
from model import load_model
from readers import load_samples
from conftest import ranks_output, run_ranks
from needle import NeedleConfig, generate
from rollout import RolloutConfig, rollout
from grpo import dgrpo_weights, group_advantages, grpo_loss
from train_grpo import Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = ("rollout_s", "update_s", "tok_s")
VIEW = dict(tools=False, global_frames=2, max_pixels=28 * 28)  # a ~90-token prompt


@pytest.fixture(scope="module")
def needle_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("needle")
    generate(NeedleConfig(out=str(out), num_train=6, num_eval=2, min_duration=60, max_duration=90,
                          eval_min_duration=60, eval_max_duration=90, size=56, seed=3))
    return str(out / "train.jsonl")


def tiny_cfg(data, out, **kw):
    base = dict(init="tiny", data=data, eval_data="", out=str(out), steps=2, prompts_per_step=1, group_size=4,
                max_turns=1, max_new_tokens=2, micro_batch=16, kl_coef=0.0, **VIEW, log_rollouts_every=0,
                eval_every=0, save_every=0)
    return Config(**{**base, **kw})


def metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


# --------------------------------------------------------------------------- advantages and loss, by hand
def test_group_advantages_std_none_and_flat_groups():
    R = torch.tensor([[1.0, 0, 0, 1], [2, 2, 2, 2], [0, 0, 0, 3]], dtype=torch.float64)
    a = group_advantages(R, "std", eps=0.0 + 1e-12)
    s = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]
    assert torch.allclose(a[0], torch.tensor([0.5, -0.5, -0.5, 0.5], dtype=torch.float64) / s)
    assert torch.equal(a[1], torch.zeros(4, dtype=torch.float64))  # zero variance -> zero advantage
    assert torch.allclose(a[2], torch.tensor([-0.5, -0.5, -0.5, 1.5], dtype=torch.float64))  # std = 1.5
    b = group_advantages(R, "none")  # Dr. GRPO: r - mean only
    assert torch.allclose(b, torch.tensor([[.5, -.5, -.5, .5], [0, 0, 0, 0], [-.75, -.75, -.75, 2.25]], dtype=torch.float64))
    for norm in ("std", "none"):  # group_size=1: verl's mean 0 and std 1 there, the raw reward (never NaN)
        assert torch.equal(group_advantages(R[:, :1], norm), R[:, :1])


def loss_inputs():
    """Two sequences; position 0 and row 1's last token are not policy tokens (mask 0)."""
    ratios = torch.tensor([[1.0, 1.1, 1.5, 0.5], [1.0, 0.7, 1.3, 9.0]])
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0]])
    return ratios.log(), torch.zeros(2, 4), torch.tensor([1.0, -2.0]), mask


@pytest.mark.parametrize("clip_high,agg,expected,clipped", [
    # A=+1: 1.1 in band -> 1.1; 1.5 -> clipped to 1.2; 0.5 -> 0.5 (low ratio, positive A: unclipped)
    # A=-2: 0.7 -> min(-1.4, -1.6) = -1.6 clipped; 1.3 -> min(-2.6, -2.4) = -2.6 unclipped
    (0.2, "global-token-mean", (-1.1 - 1.2 - 0.5 + 1.6 + 2.6) / 5, 2),
    (0.2, "token-mean", (-1.1 - 1.2 - 0.5 + 1.6 + 2.6) / 5, 2),
    (0.2, "seq-mean-token-mean", ((-1.1 - 1.2 - 0.5) / 3 + (1.6 + 2.6) / 2) / 2, 2),
    (0.2, "seq-mean-token-sum-norm", (-1.1 - 1.2 - 0.5 + 1.6 + 2.6) / 10, 2),  # / budget 5 x (1 + 1), not / seqs
    (0.28, "token-mean", (-1.1 - 1.28 - 0.5 + 1.6 + 2.6) / 5, 2),  # clip-higher: 1.5 -> 1.28
])
def test_grpo_loss_clipping_and_aggregation(clip_high, agg, expected, clipped):
    """One micro-batch (denom: 5 tokens for global-token-mean, 1 micro-batch for verl's modes)."""
    logp, old, adv, mask = loss_inputs()
    cfg = Config(clip_low=0.2, clip_high=clip_high, loss_agg=agg, kl_coef=0.0, max_new_tokens=5, max_turns=1)
    loss, st = grpo_loss(logp, old, None, adv, mask, cfg, 5 if agg == "global-token-mean" else 1)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert st["clipped"] == clipped and st["kl"] == 0.0


def test_verl_modes_average_micro_batches_ours_takes_the_global_token_mean():
    """Two micro-batches of a mini-batch, 3 and 1 policy tokens, token losses -1 (A = 1, ratio 1): verl's token-mean
    is the mean of the two micro-batches' token means, ours (global-token-mean) the mean over the 4 tokens; with
    token losses 1, 2, 3 | 10 the two differ: (2 + 10) / 2 = 6 vs 16 / 4 = 4."""
    mask = torch.tensor([[1, 1, 1]]), torch.tensor([[1, 0, 0]])
    adv = torch.tensor([-1.0])
    logps = torch.tensor([[0.0, math.log(2.0), math.log(3.0)]]), torch.tensor([[math.log(10.0), 0.0, 0.0]])
    cfg = dict(clip_low=100.0, clip_high=100.0, clip_ratio_c=0.0, kl_coef=0.0)  # no clip: the loss is ratio x 1
    verl = sum(grpo_loss(lp, torch.zeros(1, 3), None, adv, m, Config(loss_agg="token-mean", **cfg), 2)[0]
               for lp, m in zip(logps, mask))
    ours = sum(grpo_loss(lp, torch.zeros(1, 3), None, adv, m, Config(loss_agg="global-token-mean", **cfg), 4)[0]
               for lp, m in zip(logps, mask))
    assert verl.item() == pytest.approx(6.0) and ours.item() == pytest.approx(4.0)


def test_the_token_log_ratio_is_clamped_at_20_before_exp():
    """verl clamps logp - old_logp to [-20, 20]: a token at +25 with the dual clip off (A = -1) loses exp(20), not
    exp(25) (4.85e8 vs 7.2e10 over one token)."""
    logp, old, mask = torch.tensor([[0.0, 25.0]]), torch.zeros(1, 2), torch.tensor([[0, 1]])
    loss, _ = grpo_loss(logp, old, None, torch.tensor([-1.0]), mask, Config(kl_coef=0.0, clip_ratio_c=0.0), 1)
    assert loss.item() == pytest.approx(math.exp(20.0), rel=1e-5)


def test_grpo_loss_kl_k3():
    logp, old, adv, mask = loss_inputs()
    ref = torch.zeros(2, 4)
    k3 = lambda r: 1 / r + math.log(r) - 1  # noqa: E731  exp(ref - logp) - (ref - logp) - 1, with ref = 0
    kl_sum = sum(k3(r) for r in (1.1, 1.5, 0.5, 0.7, 1.3))
    cfg = Config(kl_coef=0.1, clip_high=0.2)
    loss, st = grpo_loss(logp, old, ref, adv, mask, cfg, 5)
    assert loss.item() == pytest.approx((-1.1 - 1.2 - 0.5 + 1.6 + 2.6 + 0.1 * kl_sum) / 5, abs=1e-6)
    assert st["kl"] == pytest.approx(kl_sum, abs=1e-6)


def test_grpo_loss_gspo_sequence_ratio():
    logp, old, adv, mask = loss_inputs()
    s0 = math.exp((math.log(1.1) + math.log(1.5) + math.log(0.5)) / 3)  # 0.938, inside the band
    s1 = math.exp((math.log(0.7) + math.log(1.3)) / 2)  # 0.954, inside the band
    for agg in ("seq-mean-token-mean", "token-mean", "global-token-mean"):  # GSPO aggregates as verl's, whatever
        cfg = Config(ratio_level="sequence", loss_agg=agg, kl_coef=0.0)       # loss_agg says
        loss, st = grpo_loss(logp, old, None, adv, mask, cfg, 1)
        assert loss.item() == pytest.approx((-s0 * 1.0 + s1 * 2.0) / 2, abs=1e-6)
        assert st["clipped"] == 0


def test_gspo_has_no_dual_clip_and_clamps_the_log_sequence_ratio_at_10():
    """verl's GSPO: for A < 0 a sequence far off-policy is not dual-clipped (loss A x ratio, ratio from the sequence's
    mean log-ratio, here log 12), and that log-ratio is clamped at 10 (a sequence at +15 loses exp(10))."""
    logp = torch.tensor([[0.0, math.log(12.0), math.log(12.0)]])
    old, mask, adv = torch.zeros(1, 3), torch.tensor([[0, 1, 1]]), torch.tensor([-2.0])
    loss, _ = grpo_loss(logp, old, None, adv, mask, Config(ratio_level="sequence", kl_coef=0.0, clip_ratio_c=3.0), 1)
    assert loss.item() == pytest.approx(24.0, rel=1e-5)  # the token-level dual clip would give 6
    far = torch.tensor([[0.0, 15.0, 15.0]])
    loss, _ = grpo_loss(far, old, None, adv, mask, Config(ratio_level="sequence", kl_coef=0.0), 1)
    assert loss.item() == pytest.approx(2.0 * math.exp(10.0), rel=1e-5)


def test_on_policy_loss_is_reinforce():
    """ratio == 1: the clip is inert and d loss / d logp = -A / tokens on policy tokens, 0 elsewhere."""
    _, _, adv, mask = loss_inputs()
    logp = torch.randn(2, 4, requires_grad=True)
    loss, st = grpo_loss(logp, logp.detach(), None, adv, mask, Config(kl_coef=0.0), 5)
    loss.backward()
    assert st["clipped"] == 0
    assert torch.allclose(logp.grad, -adv[:, None] * mask / 5)


def test_dgrpo_weights():
    cfg = Config(dgrpo_task=1.0, dgrpo_sample=1.0)
    w = dgrpo_weights(torch.tensor([0.0, 1.0]), torch.tensor([0.5, 0.25]), cfg)
    assert torch.allclose(w, torch.tensor([1.0 * 1.5, 1.25 * 0.5]))


def test_init_without_sft_checkpoint_says_what_to_run(tmp_path):
    with pytest.raises(SystemExit, match="train_sft.py"):
        train_grpo.init_path(str(tmp_path / "runs" / "sft"))
    assert train_grpo.init_path("tiny") == "tiny"


# --------------------------------------------------------------------------- training runs, in process
def test_dynamic_sampling_replaces_then_drops_flat_groups(needle_data, tmp_path, monkeypatch):
    monkeypatch.setattr(train_grpo, "reward_batch", lambda s, trajs, *a: [(1.0, {}) for _ in trajs])
    train_grpo.train(tiny_cfg(needle_data, tmp_path / "ds", steps=1, prompts_per_step=2, group_size=2,
                              dynamic_sampling=True, resample_rounds=2))
    m = metrics(tmp_path / "ds")[0]
    assert m["zero_var"] == 1.0 and m["resampled"] == 4 and m["data_pos"] == 6 and m["update_rows"] == 0
    train_grpo.train(tiny_cfg(needle_data, tmp_path / "plain", steps=1, prompts_per_step=2, group_size=2))
    m = metrics(tmp_path / "plain")[0]  # without it the flat groups stay, with advantage 0
    assert m["zero_var"] == 1.0 and m["resampled"] == 0 and m["data_pos"] == 2 and m["update_rows"] == 4


def test_top_k_reaches_the_rollouts(needle_data, tmp_path, monkeypatch):
    """--top_k=1 samples greedily: the 4 rollouts of each prompt are the same tokens, so every group's rewards (here
    the sum of the reply's token ids) are equal; at temperature 1 without it, they differ."""
    monkeypatch.setattr(train_grpo, "reward_batch",
                        lambda s, trajs, *a: [(float(sum(t.input_ids[t.prompt_len:])), {}) for t in trajs])
    for top_k, flat in ((1, 1.0), (0, 0.0)):
        train_grpo.train(tiny_cfg(needle_data, tmp_path / str(top_k), steps=1, prompts_per_step=2, top_k=top_k,
                                  max_new_tokens=4))
        assert metrics(tmp_path / str(top_k))[0]["zero_var"] == flat


def test_toy_reward_rises(needle_data, tmp_path, monkeypatch):
    """Reward 1 when the reply contains "red". A random tiny model almost never says it, so we first align the
    (tied) embedding of "red" with the model's mean final hidden state: a logit boost of log(V / 20), so about
    5% of tokens, a frequent token (V: the vocabulary size)."""
    model, processor = load_model("tiny")
    red = processor.tokenizer.convert_tokens_to_ids("red")
    trajs = rollout(model.eval(), processor, load_samples(needle_data)[:2], 4, RolloutConfig(max_new_tokens=6),
                    ViewConfig(**VIEW))
    b = collate(model, [t.rendered() for t in trajs], processor.tokenizer.pad_token_id)
    with torch.no_grad():
        vision = model_vision(b["vision"])
        h = model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                        position_ids=b["position_ids"], **vision).last_hidden_state[b["policy_mask"].bool()]
        u = h.mean(0)
        model.get_input_embeddings().weight[red] = math.log(len(processor.tokenizer) / 20) * u / u.norm() ** 2
    save_model(str(tmp_path / "init"), model, processor)
    says_red = lambda s, trajs, *a: [(float(any(red in turn for turn in t.turn_ids)), {}) for t in trajs]  # noqa: E731
    monkeypatch.setattr(train_grpo, "reward_batch", says_red)
    out = tmp_path / "toy"
    train_grpo.train(tiny_cfg(needle_data, out, init=str(tmp_path / "init"), steps=24, group_size=16, lr=1e-3,
                              warmup_steps=5, log_rollouts_every=12, curve=True))
    r = [m["reward"] for m in metrics(out)]
    first, last = sum(r[:6]) / 6, sum(r[-6:]) / 6
    assert last >= first + 0.3, r
    assert all(m["ratio_err"] == 0.0 for m in metrics(out))  # one on-policy update: old is the forward itself
    dumped = [json.loads(line) for line in open(out / "rollouts" / "step_0024.jsonl")]
    assert len(dumped) == 16 and {"turns", "tool_calls", "transcript", "advantage"} <= set(dumped[0])
    curve = (out / "reward_curve.svg").read_text()  # reward, accuracy, IoU: raw and smoothed, 24 points each
    lines = re.findall(r'<polyline [^>]*points="([^"]*)"', curve)
    assert len(lines) == 6 and all(len(p.split()) == 24 for p in lines)
    assert ">step</text>" in curve and ">1</text>" in curve and ">reward</text>" in curve


# --------------------------------------------------------------------------- 2 processes: DDP, FSDP2, resume
WRAPPER = """import sys
sys.path.insert(0, {root!r})
import train_grpo
from model import parse_config
def odd_tokens(samples, trajs, *a):  # a toy reward with variance, so parameters really move
    return [(float(sum(x % 2 for turn in t.turn_ids for x in turn)), {{}}) for t in trajs]
train_grpo.reward_batch = odd_tokens
train_grpo.train(parse_config(train_grpo.Config))
"""


def torchrun(script, data, out, **kw):
    cfg = dict(init="tiny", data=data, eval_data="", out=str(out), prompts_per_step=2, group_size=4, max_turns=1,
               max_new_tokens=3, micro_batch=2, mini_batches=2, ppo_epochs=2, lr=1e-3, kl_coef=1e-3,
               log_rollouts_every=2, save_every=2, **kw)
    args = [f"--{k}={json.dumps(v) if isinstance(v, dict) else v}" for k, v in {**cfg, **VIEW}.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script, *args]
    p = run_ranks(cmd, cwd=ROOT, timeout=300)
    assert p.returncode == 0, ranks_output(p)
    assert "broadcast_buffers" not in p.stdout + p.stderr  # DDP's current API: no FutureWarning on every run
    return metrics(out)


def untimed(ms):
    return [{k: v for k, v in m.items() if k not in TIMING} for m in ms]


def test_torchrun_ddp_fsdp_and_exact_resume(needle_data, tmp_path):
    script = tmp_path / "wrapper.py"
    script.write_text(WRAPPER.format(root=ROOT))
    straight = torchrun(str(script), needle_data, tmp_path / "a", steps=4)
    torchrun(str(script), needle_data, tmp_path / "b", steps=2)
    resumed = torchrun(str(script), needle_data, tmp_path / "b", steps=4, resume="true")
    assert untimed(straight) == untimed(resumed)  # N straight steps == N/2 + resume N/2, metrics exactly
    pa, pb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    assert straight[0]["ratio_err"] == 0.0 and any(m["clip_frac"] > 0 for m in straight)  # later mini-batches clip
    fsdp = torchrun(str(script), needle_data, tmp_path / "f", steps=2, parallel="fsdp")
    for m, n in zip(straight[:2], fsdp):  # the same math sharded: equal up to float reduction order
        assert m["reward"] == n["reward"] and m["grad_norm"] == pytest.approx(n["grad_norm"], rel=1e-4)
    layout = {p for p in os.listdir(tmp_path / "a")}
    assert {"config.json", "model.safetensors", "trainer_state.pt", "metrics.jsonl", "rollouts", "view.json"} <= layout
    assert json.load(open(tmp_path / "a" / "view.json")) == {**asdict(ViewConfig()), **VIEW}
    assert layout == set(os.listdir(tmp_path / "f"))
    assert load_file(tmp_path / "f" / "model.safetensors").keys() == pa.keys()
    train_grpo.train(tiny_cfg(needle_data, tmp_path / "one", steps=1, save_every=1, log_rollouts_every=1))
    assert set(os.listdir(tmp_path / "one")) == layout  # one process writes the same layout
    state = torch.load(tmp_path / "b" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 4 and state["data_pos"] == 8 and len(state["rng"]) == 2 and "optimizer" in state


# --------------------------------------------------------------------------- the judge goes down mid-run
class JudgeHandler(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def reply(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # /v1/models
        self.reply({"data": [{"id": "loopback-judge"}]})

    def do_POST(self):  # /v1/chat/completions: every answer is judged correct
        self.rfile.read(int(self.headers["Content-Length"]))
        self.server.requests += 1
        self.reply({"choices": [{"message": {"content": "1"}}]})


def test_judge_down_mid_run_falls_back_to_rules(needle_data, tmp_path, monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), JudgeHandler)
    server.requests = 0
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("LLM_AS_A_JUDGE_BASE", f"http://127.0.0.1:{server.server_address[1]}")
    for k in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "OPENAI_MODEL_NAME"):
        monkeypatch.delenv(k, raising=False)
    real_rollout, rollouts, answers = train_grpo.rollout, [], iter(range(1000))

    def answering_rollout(*a, **kw):  # the tiny model never answers: give each episode a distinct answer
        rollouts.append(1)
        if len(rollouts) == 2:  # the second step: the judge server goes away
            server.shutdown()
            server.server_close()
        trajs = real_rollout(*a, **kw)
        for t in trajs:
            t.turns_text[-1] = f"<think>look</think><answer>colour {next(answers)}</answer>"
        return trajs
    monkeypatch.setattr(train_grpo, "rollout", answering_rollout)
    out = tmp_path / "judge"
    train_grpo.train(tiny_cfg(needle_data, out, steps=3, group_size=2,
                              reward=dict(judge_retries=0, judge_backoff=0.0, judge_timeout=5.0)))
    m = metrics(out)
    assert len(m) == 3 and server.requests == 2  # training went on after the judge died
    assert m[0]["judge_failures"] == 0 and m[0]["accuracy"] == 1.0  # judged correct while it was up
    assert all(x["judge_failures"] == 2 and x["accuracy"] == 0.0 for x in m[1:])  # then the rule scorer, counted


def test_on_policy_update_equals_the_update_with_a_separate_old_pass(needle_data):
    """One epoch of one mini-batch takes old log-probs from the training forward (detached) instead of a no-grad
    pass before it: the same numbers and the same gradient as with the separate pass (the path mini_batches > 1
    still takes), on a batch of real rollouts."""
    model, processor = load_model("tiny")
    trajs = rollout(model.eval(), processor, load_samples(needle_data)[:2], 2, RolloutConfig(max_new_tokens=6),
                    ViewConfig(**VIEW))
    b = collate(model, [t.rendered() for t in trajs], processor.tokenizer.pad_token_id)
    net, cfg = train_grpo.LogProbs(model), Config(kl_coef=0.0)
    adv, mask = torch.tensor([1.0, -1.0, 0.5, -0.5]), b["policy_mask"].float()
    grads = []
    for separate in (True, False):
        model.zero_grad()
        with torch.no_grad():
            old = net(b)[0] if separate else None
        logp, _ = net(b)
        loss, _ = grpo_loss(logp, logp.detach() if old is None else old, None, adv, mask, cfg, mask.sum())
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0 and all(torch.equal(x, y) for x, y in zip(*grads))


def test_dual_clip_and_k3_clamps_bound_far_off_policy_tokens():
    """verl's dual clip (clip_ratio_c 3, LongVT's): a token with A = -2 and ratio 12 (far off-policy, from a 2nd
    mini-batch or epoch) loses at most -A x 3 = 6 and no longer pulls (gradient 0); without it, its loss is 24 and its
    gradient the largest of the batch. The k3 KL clamps the log-ratio to +-20 and k3 to [-10, 10]."""
    logp = torch.tensor([[0.0, math.log(12.0), math.log(1.1)]], requires_grad=True)
    old, mask, adv = torch.zeros(1, 3), torch.tensor([[0, 1, 1]]), torch.tensor([-2.0])
    for c, want, grad12 in [(3.0, (6.0 + 2.2) / 2, 0.0), (0.0, (24.0 + 2.2) / 2, 24.0 / 2)]:
        logp.grad = None
        loss, _ = grpo_loss(logp, old, None, adv, mask, Config(kl_coef=0.0, clip_ratio_c=c), 2)
        loss.backward()
        assert loss.item() == pytest.approx(want, abs=1e-5)
        assert logp.grad[0, 1].item() == pytest.approx(grad12, abs=1e-5)  # d(ratio x 2 / 2)/d logp = ratio
    ref = torch.tensor([[0.0, 30.0, -30.0]])  # log-ratios clamped to +-20; k3(+20) ~ 4.9e8 -> 10, k3(-20) = 19 -> 10
    _, st = grpo_loss(torch.zeros(1, 3), old, ref, torch.tensor([1.0]), mask, Config(kl_coef=1.0), 2)
    assert st["kl"] == pytest.approx(20.0, abs=1e-4)


@pytest.mark.parametrize("kw, message", [(dict(group_size=1), "group_size must be at least 2"),
                                         (dict(loss_agg="seq-mean"), "seq-mean-token-mean")])
def test_bad_grpo_settings_stop_before_any_work(needle_data, tmp_path, kw, message):
    """A group of one has no advantage to learn from (verl would silently train on zeros), and a loss_agg that is
    not one of verl's names: a clear error naming the setting, before a model is loaded or --out written."""
    with pytest.raises(SystemExit, match=message):
        train_grpo.train(tiny_cfg(needle_data, tmp_path / "out", **kw))
    assert not (tmp_path / "out").exists()


def test_the_first_global_view_is_decoded_once(needle_data, tmp_path, monkeypatch):
    """train_grpo's budget check decodes the first sample's global view and hands it to the first rollout that plays
    that sample; eval.py does the same for its first batch. Counted by the decodes of each video."""
    import eval as ev
    import rollout as ro
    seen = []
    real = ro.global_view
    monkeypatch.setattr(ro, "global_view", lambda video, *a, **k: seen.append(video) or real(video, *a, **k))
    samples = load_samples(needle_data)
    train_grpo.train(tiny_cfg(needle_data, tmp_path / "g", steps=1, prompts_per_step=len(samples)))
    assert seen.count(samples[0]["video"]) == 1 and set(seen) == {s["video"] for s in samples}
    seen.clear()
    ev.main([f"--data={needle_data}", f"--out={tmp_path / 'e'}", "--model=tiny", "--max_new_tokens=2",
             "--report_samples=0", "--batch_size=2"])
    assert seen.count(samples[0]["video"]) == 1 and len(seen) == len(samples)
