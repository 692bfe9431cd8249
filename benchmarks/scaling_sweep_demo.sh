#!/usr/bin/env bash
# The real tiny dense-vs-MoE sweep of spec shared/methods/moe_scaling.md section 5, then the fit (README "Dense vs MoE
# scaling laws"): 4 sizes (d, L) in {(32,2), (48,2), (64,2), (96,3)} x D in {2^18, 2^19, 2^20} tokens x {dense, MoE 8
# experts top-2 active-matched} = 24 train.py runs on the offline mixed corpus, about 20 minutes on 2 CPU cores
# (resumable: run it again to finish an interrupted sweep), then scripts/fit_scaling_laws.py with 200 bootstrap
# replicates and the held-out check (a few minutes).
#   bash benchmarks/scaling_sweep_demo.sh [OUT_DIR]        # default runs/sweep_demo
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/sweep_demo}"
python scripts/scaling_sweep.py --grid configs/scaling/sweep_demo.yaml --out "$OUT" --resume --wandb disabled
python scripts/fit_scaling_laws.py "$OUT/results.csv" --law both --bootstrap 200 --holdout-largest-compute \
    --out "$OUT/fits.json" --plots "$OUT/plots"
