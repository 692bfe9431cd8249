#!/usr/bin/env bash
# The batch-size / learning-rate demo of spec shared/methods/moe_scaling.md sections 3.5 and 5: dense and MoE at
# d 48, D = 2^19 tokens, batch {8, 16, 32} x lr {1e-3, 3e-3, 1e-2} = 18 train.py runs (about 10 minutes on 2 CPU
# cores), then the per-group optimum (parabola rule) and the MoE-vs-dense direction (printed, not asserted: seed noise
# at this scale is 0.01-0.03 nats, pitfall 8).
#   bash benchmarks/scaling_hparams_demo.sh [OUT_DIR]      # default runs/hparams_demo
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/hparams_demo}"
python scripts/scaling_sweep.py --grid configs/scaling/hparams_demo.yaml --out "$OUT" --resume --wandb disabled
python scripts/fit_scaling_laws.py "$OUT/results.csv" --hparam-law --opt-rule parabola --out "$OUT/hparams.json" \
    --plots "$OUT/plots"
