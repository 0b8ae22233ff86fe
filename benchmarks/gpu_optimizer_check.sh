#!/usr/bin/env bash
# A short prepared run on a lent CUDA machine (see the README's Performance section): the layer
# and optimizer tests on the GPU, then the Attention U-Net train step at batch 16 in float32 and
# mixed_float16 with FusedAdamW (with the inference figures) and with Keras' own AdamW. Wheels
# for what the machine lacks come from .whl/ as in gpu_check.sh. JSON lines go to $OUT/models.jsonl.
set -u; OUT=${OUT:-gpu_out}; mkdir -p $OUT
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD KERAS_BACKEND=torch PYTHONUNBUFFERED=1
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/models/test_fused_layers.py tests/training/test_optimizers.py 2>&1 | tail -3
for pol in float32 mixed_float16; do
  timeout 75 python3 scripts/benchmark.py model --batch 16 --policy $pol --repeats 5 --quiet | tail -1 | tee -a $OUT/models.jsonl
  timeout 60 python3 scripts/benchmark.py model --batch 16 --policy $pol --repeats 5 --train_only --optimizer keras_adamw --quiet | tail -1 | tee -a $OUT/models.jsonl
done
