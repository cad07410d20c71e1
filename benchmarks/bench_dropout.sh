#!/usr/bin/env bash
# Does a moderate FedLoDrop rate narrow the generalization gap? A dropout sweep on real SST-2.
#
# Small training shards and several local epochs make the fine-tune overfit, which is where a
# regulariser can show: 3 devices share 300 SST-2 training examples, 3 local epochs a round,
# 4 rounds, MiniLM, FedEx, persistent masks; validation on 400 dev examples; 2 seeds per rate.
# Prints the sweep table (final/best validation accuracy, train accuracy, gap = train - validation,
# bytes per round) and writes sweep.csv, sweep_runs.csv and sweep.png into $OUT.
#
#   GLUE=../shared/data/glue OUT=bench_out/dropout-sst2 bash benchmarks/bench_dropout.sh
set -euo pipefail
GLUE=${GLUE:-../shared/data/glue}
OUT=${OUT:-bench_out/dropout-sst2}
RATES=${RATES:-0,0.3,0.5,0.7}
SEEDS=${SEEDS:-2}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
fedlodrop sweep --config configs/cpu/sst2.yaml --rates "$RATES" --seeds "$SEEDS" --out "$OUT" --quiet \
  --set data.glue_dir="$GLUE" \
  --set data.max_train_samples=300 \
  --set data.max_eval_samples=400 \
  --set data.train_eval_samples=300 \
  --set federation.local_epochs=3 \
  --set federation.rounds=4 \
  --set train.batch_size=16 \
  --set train.lr=3e-3 \
  ${THREADS:+--set train.threads=$THREADS}
