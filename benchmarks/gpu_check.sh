#!/usr/bin/env bash
# One prepared run on a lent CUDA machine (see the README's Performance section): the fused
# layers' and optimizers' tests on the GPU, the demo trained under mixed_float16 and evaluated, and
# `benchmark.py all` (float32 and mixed_float16, both layouts, twin ratios). Wheels for what the
# machine lacks travel in .whl/ (pip download ... --python-version 3.12, see the README).
# Results and logs go to $OUT (or ./gpu_out).
set -u
source benchmarks/gpu_env.sh
python3 -c "import torch, keras; print('torch', torch.__version__, 'keras', keras.__version__, torch.cuda.get_device_name(0))" | tee -a "$OUT/gpu.txt"
step() { local t=$1; shift; echo "== $* (limit ${t}s)"; local s=$SECONDS; timeout "$t" "$@"; echo "== rc=$? in $((SECONDS - s)) s"; }
step 60 python3 -m pytest -q -p no:cacheprovider tests/models/test_fused_layers.py tests/training/test_optimizers.py 2>&1 | tail -3
step 150 python3 scripts/train.py --preset demo --use_mixed_precision true --num_workers 4 \
  --data_root /tmp/demo_data --output_dir /tmp/runs --experiment_name demo_gpu > "$OUT/demo_train.log" 2>&1
tail -14 "$OUT/demo_train.log"
if [ -z "${SKIP_EVAL:-}" ]; then  # SKIP_EVAL=1 saves ~40 s of device time
  step 40 python3 scripts/evaluate.py --run /tmp/runs/demo_gpu --tta > "$OUT/demo_eval.log" 2>&1; tail -6 "$OUT/demo_eval.log"
fi
step 230 python3 scripts/benchmark.py --json "$OUT/benchmark_all.json" all --batch ${BATCH:-16} --tiles 0 --repeats 5 --data_formats ${FORMATS:-channels_first channels_last} 2>&1 | grep -v '^{' | tee "$OUT/benchmark_all.txt"
