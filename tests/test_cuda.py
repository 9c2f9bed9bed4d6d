"""The CUDA-only code paths against the CPU fp32 reference: bf16 weights and autocast, the KV-cached rollout on the
GPU, both trainers' bf16 steps, eval on the GPU. Skipped without a GPU (CI has none); run on a lent GPU machine with
`python -m pytest tests/test_cuda.py`. Each CPU reference runs in a subprocess with CUDA hidden, or on a CPU copy
of the same weights. TF32 is off for the fp32 comparisons, so fp32 on the GPU differs from the CPU by reduction
order only."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train_grpo
import train_sft
import needle_warmup
from data import Renderer, ViewConfig, collate, global_view, model_vision
from model import load_model, token_logprobs
from needle import NeedleConfig
from rollout import RolloutConfig, rollout
from test_grpo import needle_data, tiny_cfg  # noqa: F401  (fixture)
from test_grpo import metrics as grpo_metrics
from test_rollout import VIEW, full_logprobs, needle_set, scripted  # noqa: F401  (fixtures)
from test_train_sft import args, metrics, sft_file  # noqa: F401  (fixture)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU = torch.device("cuda", 0)


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def on_cpu(cmd, **kw):
    """A subprocess with CUDA hidden: the trainers pick the CPU, as on a machine without a GPU."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="4")
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, **kw)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def prompt_batch(model, proc, sample):
    r = Renderer(proc, VIEW).prompt(sample, *global_view(sample["video"], VIEW, sample["duration"]))
    return collate(model, [r], proc.tokenizer.pad_token_id)


def logprobs(model, b, device):
    with torch.no_grad():
        lp, _ = token_logprobs(model, b["input_ids"].to(device), b["attention_mask"].to(device),
                               b["position_ids"].to(device), **model_vision(b["vision"], device))
    return lp[0].float().cpu()


def test_load_defaults_bf16_and_forward_tracks_cpu(needle_set):
    """load_model on CUDA: bf16 weights, flash-attn when installed (else SDPA); the same init as on the CPU. The
    fp32 GPU forward equals the CPU's to 1e-4; the bf16 one stays within bf16 rounding of it."""
    ref, proc = load_model("tiny")
    gpu, _ = load_model("tiny", GPU)
    try:
        import flash_attn  # noqa: F401
        want = "flash_attention_2"
    except ImportError:
        want = "sdpa"
    assert gpu.dtype == torch.bfloat16 and gpu.config._attn_implementation == want
    sd = ref.state_dict()
    assert all(torch.equal(v.cpu(), sd[k].to(v.dtype)) for k, v in gpu.state_dict().items())
    b = prompt_batch(ref, proc, needle_set["train"][0])
    want_lp = logprobs(ref.eval(), b, "cpu")
    fp32 = copy.deepcopy(ref).to(GPU).eval()
    assert (logprobs(fp32, b, GPU) - want_lp).abs().max() < 1e-4
    bf16 = (logprobs(gpu.eval(), b, GPU) - want_lp).abs()
    assert bf16.max() < 0.15 and bf16.mean() < 0.03, (bf16.max(), bf16.mean())


def test_rollout_on_gpu_matches_generate_and_full_forward(needle_set, scripted):
    """The hand-written KV-cached loop on CUDA: greedy ids == HF generate's (fp32); sampled log-probs with tool
    observations and their frames appended == a full forward pass (fp32 to 1e-4, bf16 to bf16 rounding)."""
    model, proc, rows, _ = scripted
    gpu = copy.deepcopy(model).to(GPU).eval()
    cpu_trajs = rollout(model, proc, rows, 1, RolloutConfig(temperature=0, max_new_tokens=80, max_turns=2), VIEW)
    gpu_trajs = rollout(gpu, proc, rows, 1, RolloutConfig(temperature=0, max_new_tokens=80, max_turns=2), VIEW)
    assert [t.input_ids for t in gpu_trajs] == [t.input_ids for t in cpu_trajs]  # replays the same calls
    assert sum(t.num_tool_calls for t in gpu_trajs) >= 3
    trajs = rollout(gpu, proc, rows, 2, RolloutConfig(temperature=1.0, max_new_tokens=80, max_turns=2, seed=1), VIEW)
    assert sum(t.num_tool_calls for t in trajs) >= 4
    for t, ref in zip(trajs, full_logprobs(gpu, proc, trajs)):
        mask = torch.tensor(t.policy_mask, dtype=torch.bool)
        assert (torch.tensor(t.logprobs)[mask] - ref[mask]).abs().max() < 1e-4
    half = copy.deepcopy(model).to(GPU, torch.bfloat16).eval()
    trajs = rollout(half, proc, rows, 2, RolloutConfig(temperature=1.0, max_new_tokens=80, max_turns=2, seed=1), VIEW)
    for t, ref in zip(trajs, full_logprobs(half, proc, trajs)):
        mask = torch.tensor(t.policy_mask, dtype=torch.bool)
        err = (torch.tensor(t.logprobs)[mask] - ref[mask]).abs()
        assert err.mean() < 0.05, err.max()


def test_warmup_runs_on_gpu_and_tracks_cpu():
    """needle_warmup's skill warm-up on a model on the GPU: the same losses as on the CPU (the same init), to fp32
    reduction order."""
    view = ViewConfig(global_frames=8, crop_max_frames=8)
    losses = {}
    for dev in ("cpu", GPU):
        torch.manual_seed(0)
        model, proc = load_model("tiny", dev, dtype=torch.float32)
        losses[str(dev)] = needle_warmup.skill_warmup(model, proc, view, 2, needle_warmup.kinds(view, NeedleConfig()))
    assert len(losses["cpu"]) == 2
    for a, b in zip(losses["cpu"], losses[str(GPU)], strict=True):
        assert b == pytest.approx(a, rel=1e-4)


@pytest.mark.parametrize("bf16", [True, False])
def test_train_sft_on_gpu_tracks_cpu(sft_file, tmp_path, bf16):
    """train_sft on CUDA (bf16 autocast on fp32 weights, or plain fp32) against the same run on the CPU: the same
    batches and token counts, losses within bf16 (2e-2) or reduction-order (1e-4) error; fp32 weights saved."""
    kw = dict(steps=4, batch_size=2, micro_batch_size=2, bf16=str(bf16).lower())
    cpu, gpu = str(tmp_path / "cpu"), str(tmp_path / "gpu")
    on_cpu([sys.executable, "train_sft.py", *args(sft_file, cpu, **kw)])
    train_sft.main(args(sft_file, gpu, **kw))
    rel = 2e-2 if bf16 else 1e-4
    for a, b in zip(metrics(cpu), metrics(gpu), strict=True):
        assert a["tokens"] == b["tokens"] and a["policy_tokens"] == b["policy_tokens"]
        assert b["loss"] == pytest.approx(a["loss"], rel=rel)
    pg, pc = load_file(os.path.join(gpu, "model.safetensors")), load_file(os.path.join(cpu, "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in pg.values()) and pg.keys() == pc.keys()
    assert max((pg[k] - pc[k]).abs().max().item() for k in pg) < (5e-3 if bf16 else 1e-4)


def test_train_grpo_on_gpu_and_eval(needle_data, tmp_path, monkeypatch):
    """train_grpo on CUDA (bf16 rollouts, bf16-autocast update on fp32 weights and AdamW, a bf16 reference model
    for the KL), then eval.py on the GPU over its checkpoint. A toy reward with variance (odd token ids), so the
    update moves the weights. Old log-probs are recomputed in the update's own forward, so the ratio of the first
    mini-batch is exactly 1 on the GPU too."""
    monkeypatch.setattr(train_grpo, "reward_batch", lambda s, trajs, *a: [
        (float(sum(x % 2 for turn in t.turn_ids for x in turn)), {}) for t in trajs])
    out = tmp_path / "g"
    train_grpo.train(tiny_cfg(needle_data, out, steps=3, save_every=3, log_rollouts_every=1, max_new_tokens=8,
                              prompts_per_step=2, mini_batches=2, ppo_epochs=2, lr=1e-3, kl_coef=1e-3))
    ms = grpo_metrics(out)
    assert len(ms) == 3 and ms[0]["ratio_err"] == 0.0 and ms[-1]["kl"] > 0
    assert all(m["nonfinite"] == 0 and torch.isfinite(torch.tensor([m["reward"], m["grad_norm"], m["entropy"]])).all()
               for m in ms)
    w = load_file(out / "model.safetensors")
    assert all(v.dtype == torch.float32 for v in w.values())
    init, trained = load_model("tiny")[0].state_dict(), load_model(str(out))[0].state_dict()  # both on the CPU
    assert init.keys() == trained.keys() and any(not torch.equal(init[k], trained[k]) for k in init)  # weights moved
    ev = tmp_path / "ev"
    subprocess.run([sys.executable, "eval.py", f"--model={out}", f"--data={needle_data}", f"--out={ev}",
                    "--max_new_tokens=16", "--max_turns=2"], cwd=ROOT, check=True, timeout=600)
    s = json.loads((ev / "summary.json").read_text())
    assert s["n"] == 6 and 0 <= s["accuracy"] <= 1


def test_a_random_7b_on_one_gpu_stays_within_the_dry_runs_peaks(tmp_path):
    """A random-weights Qwen2.5-VL-7B (built from its config, bf16, flash-attn when installed): one rollout of 4 rows
    with the LongVT view (128 frames at 224x224 here, to fit one GPU beside the update) at --max_rows=2, then one
    update micro-batch of one episode with gradient checkpointing and the vision tower frozen (no optimizer: one GPU
    cannot hold the fp32 shards and AdamW of 8B parameters). torch.cuda.max_memory_allocated of each, above the
    weights, against memory.py's terms for the same settings: within them, and not below 60% of them."""
    import memory
    from test_eval import QWEN25_VL_7B
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from model import build_tiny_processor, pick_attention
    from needle import generate
    generate(NeedleConfig(out=str(tmp_path), num_train=1, num_rl=0, num_eval=1, num_eval_short=0, size=224,
                          eval_min_duration=300, eval_max_duration=310, workers=1))
    sample = dict(__import__("readers").load_samples(str(tmp_path / "eval.jsonl"))[0])
    proc = build_tiny_processor()
    ids = proc.tokenizer.convert_tokens_to_ids
    cfg = Qwen2_5_VLConfig(**QWEN25_VL_7B, image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                           vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    cfg.text_config.eos_token_id = ids("<|im_end|>")
    cfg._attn_implementation = pick_attention(GPU)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(GPU):
            model = Qwen2_5_VLForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    model.eval()
    view = ViewConfig(visual_format="images", timestamps=False, protocol="longvt", time_grid=0.0, global_frames=128,
                      global_fps=1.0, max_pixels=50176, crop_max_frames=32, crop_min_frames=1, crop_max_pixels=50176)
    rc = RolloutConfig(max_turns=2, max_new_tokens=64, max_total_tokens=16384, max_rows=2, temperature=1.0)
    weights = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    trajs = rollout(model, proc, [sample, sample], 2, rc, view)
    rollout_peak = torch.cuda.max_memory_allocated() - weights
    counts, ep = memory.param_counts(cfg), memory.episode(proc, cfg, sample, view, rc)
    est = memory.estimate(cfg, counts, ep, rc, rows=4, gpus=1, attn=cfg._attn_implementation)
    want = est["kv"] + est["transient"]
    assert 0.6 * want <= rollout_peak <= want, (rollout_peak, want)
    # the update: one episode, gradient checkpointing, the tower frozen
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    model.model.visual.requires_grad_(False)
    t = max(trajs, key=lambda t: len(t.input_ids))
    b = collate(model, [t.rendered()], proc.tokenizer.pad_token_id)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    lp, _ = token_logprobs(model, b["input_ids"].to(GPU), b["attention_mask"].to(GPU), b["position_ids"].to(GPU),
                           mask=b["policy_mask"].to(GPU), **model_vision(b["vision"], GPU))
    lp.sum().backward()
    update_peak = torch.cuda.max_memory_allocated() - base
    T, patches = len(t.input_ids), len(b["vision"].get("pixel_values", []))
    want = memory.update_saved(cfg, T, sum(t.policy_mask), patches, True) + memory.update_recompute(cfg, T, patches,
                                                                                                  True) \
        + 2 * (counts["total"] - counts["vision"])  # the bf16 gradients (no FSDP shards here)
    assert 0.6 * want <= update_peak <= want, (update_peak, want)
