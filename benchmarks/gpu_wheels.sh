#!/usr/bin/env bash
# Wheels for the lent GPU machines (Python 3.12, x86_64; nothing can be fetched there): only what
# their image lacks (benchmarks/gpu_speed_check.sh lists the rest as present). Into .whl/
# (ignored by git; name it in the device tool's `carry`). Versions as in this checkout's venv.
set -eu
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q -d .whl --only-binary=:all: --no-deps --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --implementation cp \
  keras==3.15.1 namex==0.1.0 optree==0.20.0 albumentations==2.0.8 albucore==0.0.24 \
  simsimd==6.5.16 stringzilla==5.3.2 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types \
  typing-inspection==0.4.5 tensorboardX==2.6.5
du -sh .whl && ls .whl
