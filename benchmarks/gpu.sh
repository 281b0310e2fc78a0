#!/usr/bin/env bash
# The GPU run behind benchmarks/results/<gpu>/, one script for a (rented, timed)
# GPU machine: the GPU tests (DALI "mixed" decode of H.264 shards, the bf16 train
# step), then the loss, e2e, loader and step suites on cuda. Each stage has a
# time limit and its own log; a failed stage is reported and the next one runs.
#
#   bash benchmarks/gpu.sh RESULTS_DIR VIDEOS_DIR [STAGES]
#
# STAGES (default "tests shards loss e2e loader step") picks stages, e.g. to
# split the run over two calls of a time-limited machine (e2e and loader need
# shards). Worst cases: tests 100 s, shards 60, loss 45, e2e 240, loader 170,
# step 260. The suites rewrite their JSON after every measurement, so a stage cut
# short by its limit still leaves what it measured (settings.complete: false).
# VIDEOS_DIR: the original videos (../shared/data/videos); they are replicated
# 32 times and packed once (H.264, short side 256, GOP 16) for e2e and loader.
# RESULTS_DIR gets <suite>.json/.png, <stage>.log and stages.txt; RESULTS_DIR.tar
# is rewritten after every stage (for machines that return only a few files).
set -uo pipefail
out=${1:?usage: benchmarks/gpu.sh RESULTS_DIR VIDEOS_DIR}
videos=${2:?usage: benchmarks/gpu.sh RESULTS_DIR VIDEOS_DIR}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

stages=" ${3:-tests shards loss e2e loader step} "
stage() {  # stage NAME SECONDS CMD...: run CMD with a time limit, log to $out/NAME.log
  local name=$1 limit=$2 t=$SECONDS rc
  shift 2
  [[ $stages == *" $name "* ]] || return 0
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  rc=$?
  echo "$name: exit $rc after $((SECONDS - t)) s (limit $limit s)" | tee -a "$out/stages.txt"
  tar -cf "$out.tar" -C "$out" .
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $py -c "import torch, nvidia.dali, av; print('torch', torch.__version__, 'dali', nvidia.dali.__version__, 'av', av.__version__)"
} >"$out/machine.txt" 2>&1

stage tests 100 env VTHCL_TEST_VIDEOS="$videos" $py -m pytest -q -m gpu -rs -p no:cacheprovider tests/test_gpu.py
stage shards 60 $py -c "
import sys
from pathlib import Path
from benchmarks.common import replicate
from shard_tools.make_shards import main
replicate(Path('$videos'), Path('$work/src'), 32)
sys.exit(main(['$work/src', '$work/shards', '--quiet', '--samples-per-shard', '32']))"
stage loss 45 $py -m benchmarks.run --suite loss --device cuda --out "$out"
stage e2e 240 $py -m benchmarks.run --suite e2e --device cuda --shards "$work/shards" --out "$out"
stage loader 170 $py -m benchmarks.run --suite loader --device cuda --videos "$videos" --shards "$work/shards" --out "$out"
stage step 260 $py -m benchmarks.run --suite step --device cuda --out "$out"  # last: torch.compile takes a while
cat "$out/stages.txt"
