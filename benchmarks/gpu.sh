#!/usr/bin/env bash
# The GPU run behind benchmarks/results/<gpu>/: one script for a lent, timed GPU
# machine (15 device-minutes a lease, its start and the wheel transfers included:
# one call of about 6 minutes, no rerun). Stages in priority order, each with a time
# limit and its own log; a failed or cut stage is reported and the next one runs.
# The suites rewrite their JSON after every measurement, so a stage cut short by its
# limit still leaves what it measured (settings.complete: false).
#
#   bash benchmarks/gpu.sh RESULTS_DIR VIDEOS_DIR [STAGES]
#
# Default STAGES, in priority order, with their limits (400 s in all):
#   shards  60 s  the real videos played to 300 frames (Kinetics-length), x32, packed
#                 as H.264 (fragmented MP4, window-cut tables): 160 members
#   decode 130 s  DALI mixed (NVDEC) decode-only and full graph on them, cut to the
#                 window vs the whole member, num_threads 4/8/16, GPU and decoder
#                 utilisation sampled during each (nvidia-smi -q -d UTILIZATION);
#                 PyNvVideoCodec decode-only on the same members (skipped with a note
#                 where it does not import); the window's position on a 1200-frame member
#   e2e    130 s  R18/R50 bf16 + channels_last_3d steps fed by DALI, by PyAV workers
#                 (16 cores and 8), R18 compiled fed by DALI, against synthetic input;
#                 the Kinetics-400 hours on 8 GPUs
#   tests   80 s  pytest -m gpu (tests/test_gpu.py: NVDEC decode of cut H.264 members)
# Optional stages (name them in STAGES): step 200 s (fp32 / fp32_strict / bf16 /
# channels_last_3d / compile), loader 150 s (every loader side by side), loss 45 s.
#
# VIDEOS_DIR: the original videos (tests/data/videos: they travel with the repository).
# RESULTS_DIR gets <suite>.json/.png, <stage>.log, stages.txt and machine.txt;
# RESULTS_DIR.tar is rewritten after every stage (for machines that return few files).
# The machine needs the project's packages with DALI (`pip install -e ".[dev,dali]"`)
# and, for the NVDEC reference, pynvvideocodec (`pip install pynvvideocodec==2.2.4`).
# On a machine without internet: `pip download --no-deps --only-binary=:all:
# --python-version X.Y` the wheels (nvidia-dali-cuda120, pynvvideocodec) where there is,
# copy them over, `pip install --no-deps --target .site WHEEL`, and run with PYTHONPATH=.site.
set -uo pipefail
out=${1:?usage: benchmarks/gpu.sh RESULTS_DIR VIDEOS_DIR [STAGES]}
videos=${2:?usage: benchmarks/gpu.sh RESULTS_DIR VIDEOS_DIR [STAGES]}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

stages=" ${3:-shards decode e2e tests} "
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
  nproc
  $py -c "import torch, nvidia.dali, av; print('torch', torch.__version__, 'dali', nvidia.dali.__version__, 'av', av.__version__)"
  $py -c "import PyNvVideoCodec as n; print('PyNvVideoCodec', n.__version__)" || true
} >"$out/machine.txt" 2>&1

stage shards 60 $py -c "
import sys
from pathlib import Path
from benchmarks.common import lengthened, replicate
from shard_tools.make_shards import pack
src = lengthened(Path('$videos'), Path('$work/kinetics_300'), 300)
replicate(src[0].parent, Path('$work/src'), 32)
sys.exit(1 if pack('$work/src', '$work/shards', quiet=True, samples_per_shard=32)['failed'] else 0)"
stage decode 130 $py -m benchmarks.run --suite decode --device cuda --videos "$videos" --shards "$work/shards" --out "$out"
stage e2e 130 $py -m benchmarks.run --suite e2e --device cuda --shards "$work/shards" --out "$out"
stage tests 80 env VTHCL_TEST_VIDEOS="$videos" $py -m pytest -q -m gpu -rs -p no:cacheprovider tests/test_gpu.py
stage step 200 $py -m benchmarks.run --suite step --device cuda --out "$out"  # torch.compile takes a while
stage loader 150 $py -m benchmarks.run --suite loader --device cuda --videos "$videos" --shards "$work/shards" --out "$out"
stage loss 45 $py -m benchmarks.run --suite loss --device cuda --out "$out"
cat "$out/stages.txt"
