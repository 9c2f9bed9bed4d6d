#!/usr/bin/env bash
# The three-stage LongVT recipe end to end on the embedded default (synthetic needle videos + tiny model):
#   data (needle.py) -> the tiny model's skill warm-up (needle_warmup.py) -> stage 1 SFT -> stage 2 GRPO (torchrun,
#   2 processes) -> stage 3 RFT (export + SFT from GRPO) -> eval of every stage and of the no-tool baseline on held-out
#   videos as long as the training ones (the gate), and of the final model and the baseline on longer ones -> results
#   tables (needle_results.py). Each stage runs with its script's defaults; only paths and the seed are passed.
#
#   bash needle_pipeline.sh                           # writes runs/ and runs/results.md
#   SEED=1 bash needle_pipeline.sh                    # another seed (data, warm-up, SFT, GRPO, evals): runs_seed1/
#   RUNS=/tmp/r DATA=/tmp/d DATA_ARGS="--num_train=8" SFT_ARGS="--steps=3" bash needle_pipeline.sh   # shrunken
#
# Every stage takes extra --key=value flags from its *_ARGS variable. A stage whose output is complete is not
# run again (delete its dir to redo it), so a pipeline that was stopped continues where it was.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-python}
NPROC=${NPROC:-2}
SEED=${SEED:-0}  # the data's draw and every stage's seed (the tiny model's init stays model.TinyConfig's)
sfx=$([ "$SEED" = 0 ] || echo "_seed$SEED")
RUNS=${RUNS:-runs$sfx}
DATA=${DATA:-data/needle$sfx}
DATA_ARGS=${DATA_ARGS:-}
WARMUP_ARGS=${WARMUP_ARGS:-}
SFT_ARGS=${SFT_ARGS:-}
GRPO_ARGS=${GRPO_ARGS:-}
RFT_ARGS=${RFT_ARGS:-}
EVAL_ARGS=${EVAL_ARGS:-}
RFT_MIN=${RFT_MIN:-8}  # fewer exported trajectories than this: stage 3 keeps the GRPO weights (2 samples x 6 epochs at
                       # lr 1e-3 overfit them: format rate 1.0 -> 0.0 on the held-out sets in one of our runs)
mkdir -p "$RUNS"
start=$(date +%s)
stage() { echo; echo "=== $1 ($(( $(date +%s) - start )) s)"; }

stage "data: $DATA"
[ -f "$DATA/eval.jsonl" ] || $PY needle.py --out="$DATA" --seed="$SEED" $DATA_ARGS

EVAL="--config=configs/needle_eval.json --seed=$SEED $EVAL_ARGS"  # (configs/: the tiny policy's eval settings)
done_() { [ -f "$1/done" ]; }

stage "stage 0: the tiny model's skill warm-up -> $RUNS/warmup"
if ! done_ "$RUNS/warmup"; then  # (an if, not `||`: set -e does not stop on a failure inside an || list)
  $PY needle_warmup.py --data="$DATA" --out="$RUNS/warmup" --threads=2 --seed="$SEED" $WARMUP_ARGS
  touch "$RUNS/warmup/done"
fi

stage "stage 1: SFT cold start -> $RUNS/sft"
if ! done_ "$RUNS/sft"; then
  $PY train_sft.py --init="$RUNS/warmup" --data="$DATA/sft.jsonl" --out="$RUNS/sft" --threads=2 --seed="$SEED" $SFT_ARGS
  touch "$RUNS/sft/done"
fi

stage "stage 2: GRPO with $NPROC processes -> $RUNS/grpo"
if ! done_ "$RUNS/grpo"; then
  $PY -m torch.distributed.run --standalone --nproc_per_node="$NPROC" train_grpo.py \
    --init="$RUNS/sft" --data="$DATA/rl.jsonl" --eval_data="$DATA/eval.jsonl" --out="$RUNS/grpo" --seed="$SEED" $GRPO_ARGS
  touch "$RUNS/grpo/done"
fi

stage "stage 3: RFT data (correct, IoU >= 0.3 trajectories of the GRPO policy on the RL prompts, 2 each)"
[ -f "$RUNS/rft.jsonl" ] || $PY eval.py --model="$RUNS/grpo" --data="$DATA/rl.jsonl" --out="$RUNS/grpo/eval_rl" \
  --export_rft="$RUNS/rft.jsonl" --config=configs/needle_rft_export.json --seed="$SEED" $EVAL_ARGS
n=$(wc -l < "$RUNS/rft.jsonl")
if [ "$n" -ge "$RFT_MIN" ] && [ "$n" -gt 0 ]; then
  stage "stage 3: RFT on $n trajectories from the GRPO checkpoint -> $RUNS/rft"
  $PY train_sft.py --init="$RUNS/grpo" --data="$RUNS/rft.jsonl" --out="$RUNS/rft" --config=configs/rft.json --threads=2 \
    --seed="$SEED" $RFT_ARGS
else
  stage "stage 3: WARNING: the GRPO policy produced $n correct, grounded trajectories (< RFT_MIN=$RFT_MIN); RFT keeps the GRPO weights"
  rm -rf "$RUNS/rft" && mkdir -p "$RUNS/rft" && cp "$RUNS"/grpo/*.* "$RUNS/rft/"
fi

stage "evals, two at a time with one torch thread each (the gate for every stage; the final model on the longer videos)"
logs="$RUNS/eval_logs" && rm -rf "$logs" && mkdir -p "$logs"
ev() {  # ev <model> <set> <out dir> [flags]: one eval, its printout in $logs (shown when both lanes are done)
  OMP_NUM_THREADS=1 $PY eval.py --model="$RUNS/$1" --data="$DATA/$2.jsonl" --out="$RUNS/$3" "${@:4}" $EVAL \
    > "$logs/${3/\//_}.log" 2>&1
}
(ev sft eval_short sft/eval_short && ev rft eval_short rft/eval_short && ev rft eval rft/eval_notool --tools=false) &
lane1=$!
(ev grpo eval_short grpo/eval_short && ev rft eval rft/eval && ev rft eval_short rft/eval_notool_short --tools=false) &
lane2=$!
failed=0
wait $lane1 || failed=1
wait $lane2 || failed=1
for e in sft/eval_short grpo/eval_short rft/eval_short rft/eval rft/eval_notool_short rft/eval_notool; do
  if [ -f "$logs/${e/\//_}.log" ]; then
    echo "--- $RUNS/$e"
    tr '\r' '\n' < "$logs/${e/\//_}.log" | grep -v '^\s*$\|it/s]$\|sample/s]$\|acc=' | tail -n 20 || true
  fi
done
[ $failed = 0 ] || { echo "an eval failed: its log is above"; exit 1; }

stage "results"
$PY needle_results.py "$RUNS" "$(( $(date +%s) - start ))"  # the tables with 95% intervals, runs/results.svg
