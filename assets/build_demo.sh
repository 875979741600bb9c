#!/usr/bin/env bash
# Rebuilds the shipped demo: corpus (optional, needs apt + PyPI), PRISM bundle, dense twin and
# the bundle's index (neighbourhoods, labels, atlas).
# On 2 CPU cores: PRISM about 68 minutes (4,052 s, measured on shared cores; the preset anneals k
# from 64 to 12, so the first steps are the slower), the twin about 30, the index about 10.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${REBUILD_CORPUS:-0}" = 1 ]; then
  prism corpus demo --out assets/corpus
fi
# Weight files of at most 10 MB each: the repository takes no file over 20 MiB.
prism train --corpus assets/corpus --out assets/models/demo --preset demo --seed 0 \
  --twin-out assets/models/demo-dense --max-shard-size 10MB
# The shipped index: neighbourhoods, usage, snippets, labels and atlas. The influence store
# (about 3.3 GB on the demo corpus) and the span index (about 80 MB) are too large to ship;
# `prism index` without these two flags builds them on the user's machine.
prism index --model assets/models/demo --corpus assets/corpus --no-influence --no-spans
