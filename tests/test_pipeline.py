"""The three-stage pipeline end to end, shrunken (tiny data, a few steps per stage), in a subprocess."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


SHRUNKEN = dict(  # every stage a few steps on tiny data (the pipeline's *_ARGS)
    DATA_ARGS="--num_train=4 --num_eval=2 --num_eval_short=1 --min_duration=60 --max_duration=80 --eval_min_duration=60 "
              "--eval_max_duration=80",
    WARMUP_ARGS="--steps=2", SFT_ARGS="--steps=2 --batch_size=2 --micro_batch_size=2",
    GRPO_ARGS="--steps=2 --prompts_per_step=2 --group_size=2 --max_new_tokens=16 --eval_every=0 --save_every=0 "
              "--micro_batch=2",
    RFT_ARGS="--steps=1 --batch_size=1 --micro_batch_size=1",
    EVAL_ARGS="--max_new_tokens=16 --max_turns=2 --report_samples=1")


def readme_stage_commands():
    """The commands of the README's "The recipe, stage by stage" block, one string each (continuations joined,
    comments dropped)."""
    text = open(os.path.join(ROOT, "README.md")).read()
    block = text.split("## The recipe, stage by stage")[1].split("```bash")[1].split("```")[0]
    commands, cur = [], ""
    for line in block.splitlines():
        line = line.split("  #")[0].rstrip()
        cur += " " + line.rstrip("\\").strip()
        if not line.endswith("\\"):
            commands.append(cur.strip()) if cur.strip() else None
            cur = ""
    return commands


def test_pipeline_shrunken(tmp_path):
    runs, data = tmp_path / "runs", tmp_path / "data"
    env = dict(os.environ, PY=sys.executable, RUNS=str(runs), DATA=str(data), OMP_NUM_THREADS="1", **SHRUNKEN)
    p = subprocess.run(["bash", "needle_pipeline.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert "skill warm-up: 2 steps" in p.stdout
    for stage in ("warmup", "sft", "grpo", "rft"):
        assert (runs / stage / "model.safetensors").exists() and (runs / stage / "config.json").exists()
        assert stage == "warmup" or (runs / stage / "trainer_state.pt").exists()
    for d in ("rft/eval", "rft/eval_notool"):  # the longer videos: the final model and its no-tool baseline
        s = json.loads((runs / d / "summary.json").read_text())
        assert s["n"] == 2 and 0 <= s["accuracy"] <= 1
    for d in ("sft/eval_short", "grpo/eval_short", "rft/eval_short", "rft/eval_notool_short"):  # the gate: every stage
        assert json.loads((runs / d / "summary.json").read_text())["n"] == 1
    assert json.loads((runs / "rft/eval_notool/summary.json").read_text())["tool_calls_per_episode"] == 0
    assert (runs / "grpo" / "reward_curve.svg").read_text().lstrip().startswith("<svg")
    table = (runs / "results.md").read_text()
    assert all(name in table for name in ("no-tool baseline", "SFT", "GRPO", "RFT"))
    assert table.count("| SFT |") == 1 and table.count("| RFT |") == 2 and "of the training lengths" in table
    assert table.count("GRPO - SFT on the same") == 1 and "chance" in table
    assert (runs / "results.svg").read_text().startswith("<svg")

    # The README's stage commands, with no flag beyond paths (and the same shrinking flags), give the pipeline's
    # checkpoints bit for bit: the pipeline passes nothing the README does not say.
    mine = tmp_path / "mine"
    args = {"needle_warmup.py": SHRUNKEN["WARMUP_ARGS"], "train_sft.py": SHRUNKEN["SFT_ARGS"],
            "train_grpo.py": SHRUNKEN["GRPO_ARGS"], "eval.py": SHRUNKEN["EVAL_ARGS"]}
    ran = []
    for cmd in readme_stage_commands():
        script = next(w for w in cmd.split() if w.endswith(".py"))
        if script == "needle.py" or "--init=runs/grpo" in cmd or ("eval.py" in cmd and "--export_rft" not in cmd):
            continue  # the data is the pipeline's; RFT on these few rows is a copy there; evals change no weights
        cmd = cmd.replace("runs/", f"{mine}/").replace("data/needle", str(data))
        cmd = cmd.replace("python ", f"{sys.executable} ", 1) if cmd.startswith("python ") else \
            cmd.replace("torchrun", f"{sys.executable} -m torch.distributed.run", 1)
        cmd += {"needle_warmup.py": f" --data={data} --out={mine}/warmup",  # the default paths, given
                "train_sft.py": f" --data={data}/sft.jsonl --out={mine}/sft",
                "train_grpo.py": f" --init={mine}/sft --out={mine}/grpo --data={data}/rl.jsonl "
                                 f"--eval_data={data}/eval.jsonl"}.get(script, "")
        r = subprocess.run(cmd + " " + args[script], shell=True, cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, (cmd, r.stdout[-2000:] + r.stderr[-2000:])
        ran.append(script)
    assert ran == ["needle_warmup.py", "train_sft.py", "train_grpo.py", "eval.py"]
    for stage in ("warmup", "sft", "grpo"):
        assert (mine / stage / "model.safetensors").read_bytes() == (runs / stage / "model.safetensors").read_bytes()
    assert (mine / "rft.jsonl").read_text() == (runs / "rft.jsonl").read_text()


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
