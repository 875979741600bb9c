#!/usr/bin/env bash
# Rebuilds the shipped demo: corpus (optional, needs apt + PyPI), PRISM bundle, dense twin and
# the bundle's index (neighbourhoods, labels, atlas, influence factors).
# On 2 CPU cores: PRISM about 31 minutes, the twin about 30, the index about 13.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${REBUILD_CORPUS:-0}" = 1 ]; then
  prism corpus demo --out assets/corpus
fi
prism train --corpus assets/corpus --out assets/models/demo --preset demo --seed 0 \
  --twin-out assets/models/demo-dense
prism index --model assets/models/demo --corpus assets/corpus --influence-tokens 393216
