"""The three-stage pipeline end to end, shrunken (tiny data, a few steps per stage), in a subprocess."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pipeline_shrunken(tmp_path):
    runs, data = tmp_path / "runs", tmp_path / "data"
    env = dict(os.environ, PY=sys.executable, RUNS=str(runs), DATA=str(data), OMP_NUM_THREADS="1",
               DATA_ARGS="--num_train=4 --num_eval=2 --num_eval_short=1 --min_duration=60 --max_duration=80 --eval_min_duration=60 "
                         "--eval_max_duration=80",
               WARMUP_ARGS="--steps=2", SFT_ARGS="--steps=2 --batch_size=2 --micro_batch_size=2",
               GRPO_ARGS="--steps=2 --prompts_per_step=2 --group_size=2 --max_new_tokens=16 --eval_every=0 "
                         "--save_every=0 --micro_batch=2",
               RFT_ARGS="--steps=1 --batch_size=1 --micro_batch_size=1",
               EVAL_ARGS="--max_new_tokens=16 --max_turns=2 --report_samples=1")
    p = subprocess.run(["bash", "needle_pipeline.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert "skill warm-up: 2 steps" in p.stdout
    for stage in ("warmup", "sft", "grpo", "rft"):
        assert (runs / stage / "model.safetensors").exists() and (runs / stage / "config.json").exists()
        assert stage == "warmup" or (runs / stage / "trainer_state.pt").exists()
    for d in ("sft/eval", "grpo/eval", "rft/eval", "rft/eval_notool"):
        s = json.loads((runs / d / "summary.json").read_text())
        assert s["n"] == 2 and 0 <= s["accuracy"] <= 1
    for d in ("sft/eval_short", "grpo/eval_short", "rft/eval_short"):
        assert json.loads((runs / d / "summary.json").read_text())["n"] == 1
    assert json.loads((runs / "rft/eval_notool/summary.json").read_text())["tool_calls_per_episode"] == 0
    assert (runs / "grpo" / "reward_curve.svg").read_text().lstrip().startswith("<svg")
    table = (runs / "results.md").read_text()
    assert all(name in table for name in ("no-tool baseline", "SFT", "GRPO", "RFT"))
    assert table.count("| SFT |") == 2 and "of the training lengths" in table and "chance" in table
    assert table.count("GRPO - SFT on the same") == 2 and (runs / "results.svg").read_text().startswith("<svg")


def test_pipeline_stops_at_a_failed_stage(tmp_path):
    """A stage that fails (here SFT, on a batch size that does not divide) ends the pipeline with its exit status;
    the next stage never starts on a missing checkpoint."""
    env = dict(os.environ, PY=sys.executable, RUNS=str(tmp_path / "runs"), DATA=str(tmp_path / "data"),
               OMP_NUM_THREADS="1",
               DATA_ARGS="--num_train=2 --num_eval=1 --num_eval_short=0 --min_duration=60 --max_duration=60 "
                         "--eval_min_duration=60 --eval_max_duration=60",
               WARMUP_ARGS="--steps=1", SFT_ARGS="--steps=1 --batch_size=3 --micro_batch_size=2")
    p = subprocess.run(["bash", "needle_pipeline.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert "stage 1: SFT" in p.stdout and "stage 2" not in p.stdout
    assert not (tmp_path / "runs" / "sft" / "done").exists()
