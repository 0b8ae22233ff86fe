#!/usr/bin/env bash
# Issue #19's GPU checks in one prepared run (about 8 minutes on an H100 or H200; each step has
# its own time limit and the order is by importance, so a cut-short run still reports the first
# figures). What each line should show: benchmarks/gpu_speed_check.md.
#
#   1. the fast paths' equivalence tests on the GPU (lean graph executor, device loss scaling,
#      fused layers and optimizers, device-side blending);
#   2. host overhead: a training-mode forward pass and a train step at 32 px, batch 2, against
#      the plain-PyTorch twin (ratios, GPU busy share);
#   3. the Attention U-Net (ResNet34, 256 px, batch 16) in float32, mixed_float16 and
#      mixed_bfloat16, channels_first (train img/s against the twin, inference, TTA, the 1000²
#      sliding window against plain batches, GPU busy share), then channels_last and the
#      PGU-Net train step;
#   4. the demo trained under mixed_float16 and evaluated, and the PGU-Net preset on the real
#      Pap-smear set (160 steps, as the README's CPU row) trained and evaluated: the quality to
#      compare with the CPU figures in gpu_speed_check.md.
#
# Prepare on the development machine (nothing can be fetched on the GPU machine; its image has
# torch, numpy, scipy, opencv, scikit-image, matplotlib, pyyaml, tqdm but not the rest):
#   bash benchmarks/gpu_wheels.sh                       # .whl/, about 11 MB
#   mkdir -p .gpu_data && cp -r ../shared/data/papsmear .gpu_data/   # about 20 MB
# then two device runs (one command may take 10 minutes; together about 11 of the 15 a session
# has), both with carry [".whl", ".gpu_data"]:
#   OUT=$OUT bash benchmarks/gpu_speed_check.sh speed   (steps 1-3, timeout_s 420)
#   OUT=$OUT bash benchmarks/gpu_speed_check.sh runs    (step 4 and torch.compile, timeout_s 420)
# Each brings back at most 8 files in $OUT (the device tool's limit): gpu.txt, log.txt,
# results.jsonl, smi.csv. Save them here between the two runs (the second empties $OUT).
set -u
source benchmarks/gpu_env.sh
LOG=$OUT/log.txt; RES=$OUT/results.jsonl
python3 -c "import torch, keras; print('torch', torch.__version__, 'keras', keras.__version__, torch.cuda.get_device_name(0), 'bf16', torch.cuda.is_bf16_supported())" | tee -a "$OUT/gpu.txt"
step() { local t=$1; shift; echo "== $* (limit ${t}s)" | tee -a "$LOG"; local s=$SECONDS; timeout "$t" "$@" >>"$LOG" 2>&1; echo "== rc=$? in $((SECONDS - s)) s" | tee -a "$LOG"; }
bench() {  # one benchmark; its JSON as one line of results.jsonl
  local t=$1; shift; rm -f /tmp/b.json
  step "$t" python3 scripts/benchmark.py --json /tmp/b.json "$@" --quiet
  [ -s /tmp/b.json ] && python3 -c "import json; print(json.dumps(json.load(open('/tmp/b.json'))))" | tee -a "$RES"
}
# GPU utilisation sampled every 200 ms for the whole run (its mean is a second busy figure)
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -lms 200 > "$OUT/smi.csv" 2>/dev/null &
SMI=$!

PART=${1:-all}
if [ "$PART" != runs ]; then
step 120 python3 -m pytest -q -p no:cacheprovider -x tests/models/test_lean_graph.py \
  tests/training/test_optimizers.py tests/models/test_fused_layers.py \
  "tests/evaluation/test_inference_and_reports.py::test_blending_on_the_device_equals_blending_in_numpy"
tail -3 "$LOG"
bench 90 host-overhead --repeats 30
for policy in float32 mixed_float16 mixed_bfloat16; do
  bench 100 model --batch 16 --policy $policy --repeats 5
done
for policy in float32 mixed_float16; do
  bench 60 model --batch 16 --policy $policy --repeats 5 --data_format channels_last --train_only
  bench 60 model --batch 16 --policy $policy --repeats 5 --model progressive_unet --train_only
done
fi
if [ "$PART" != speed ]; then
step 150 python3 scripts/train.py --preset demo --use_mixed_precision true --num_workers 4 \
  --data_root /tmp/demo_data --output_dir /tmp/runs --experiment_name demo_gpu
grep -E "epoch|val_mean_fg_dice|seconds|steps" "$LOG" | tail -6
step 60 python3 scripts/evaluate.py --run /tmp/runs/demo_gpu
if [ -d .gpu_data/papsmear ]; then
  step 60 python3 scripts/prepare_data.py folders --src .gpu_data/papsmear --out /tmp/papsmear
  step 150 python3 scripts/train.py --preset papsmear --data_root /tmp/papsmear --output_dir /tmp/runs \
    --experiment_name pgu_gpu --epochs_per_stage 2 --steps_per_epoch 20 --num_workers 4
  step 60 python3 scripts/evaluate.py --run /tmp/runs/pgu_gpu --split valid
fi
python3 - <<'PY' | tee -a "$RES"
import json, pathlib
out = {"benchmark": "gpu-runs"}
for name in ("demo_gpu", "pgu_gpu"):
    run = pathlib.Path("/tmp/runs") / name
    summary = run / "summary.json"
    out[name] = json.loads(summary.read_text()) if summary.exists() else None
    reports = sorted(run.glob("**/evaluation*.json")) + sorted(run.glob("**/report*.json"))
    out[name + "_evaluation"] = [json.loads(p.read_text()) for p in reports[:2]]
print(json.dumps(out, default=str))
PY
bench 150 host-overhead --repeats 20 --compile_mode reduce-overhead
bench 150 host-overhead --repeats 10 --batch 16 --size 256 --compile_mode reduce-overhead
fi
kill $SMI 2>/dev/null
python3 -c "
import csv; rows = [r for r in csv.reader(open('$OUT/smi.csv')) if len(r) > 1]
u = [float(r[1].strip().split()[0]) for r in rows if r[1].strip()[0].isdigit()]
print('nvidia-smi utilization.gpu: mean', round(sum(u) / max(len(u), 1), 1), '% over', len(u), 'samples')" | tee -a "$OUT/gpu.txt"
