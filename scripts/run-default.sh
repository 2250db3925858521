#!/usr/bin/env bash
# The main job on the embedded default: prune the shipped tiny teacher (BK-SDM Small), bilevel fine-tune with ESD
# (alternating solver), compare with the baselines, and write the report under runs/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-env.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/bilevel run --pruner bk-sdm --unlearner esd --solver alternating "$@"
