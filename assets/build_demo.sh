#!/usr/bin/env bash
# Rebuilds the shipped demo: corpus (optional, needs apt + PyPI), PRISM bundle and dense twin.
# On 2 CPU cores the two trainings take about 35 minutes each.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${REBUILD_CORPUS:-0}" = 1 ]; then
  prism corpus demo --out assets/corpus
fi
prism train --corpus assets/corpus --out assets/models/demo --preset demo --seed 0 \
  --twin-out assets/models/demo-dense
