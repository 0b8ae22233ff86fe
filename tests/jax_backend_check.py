"""Run under KERAS_BACKEND=jax by ``test_jax_backend.py``: the library's Keras pieces on JAX.

Builds both model families (both data formats for the Attention U-Net), takes jit-compiled
training steps with every loss and the segmentation metrics, checks the schedules, grows a
PGU-Net, and round-trips a model through a ``.keras`` file. Prints ``JAX OK`` at the end.
"""

import sys

import keras
import numpy as np

import xsight_keras  # noqa: F401  (registers the custom objects)
from xsight_keras.models import attention_unet, grow, progressive_unet
from xsight_keras.training import losses
from xsight_keras.training.losses import multiscale_losses
from xsight_keras.training.metrics import segmentation_metrics
from xsight_keras.training.schedules import OneCycle, WarmupCosine

assert keras.backend.backend() == "jax", keras.backend.backend()
rng = np.random.default_rng(0)
CLASSES = ["background", "a", "b", "c", "d", "e"]


def batch(data_format, n=2, size=64, k=6):
    x = rng.normal(size=(n, size, size, 3)).astype("float32")
    y = np.eye(k, dtype="float32")[rng.integers(0, k, (n, size, size))]
    if data_format == "channels_first":
        x, y = x.transpose(0, 3, 1, 2).copy(), y.transpose(0, 3, 1, 2).copy()
    return x, y


for data_format in ("channels_first", "channels_last"):
    keras.config.set_image_data_format(data_format)
    model = attention_unet(6, "resnet18", decoder_filters=(32, 16, 16, 8, 8))
    model.compile(optimizer=keras.optimizers.AdamW(OneCycle(3e-3, 8), global_clipnorm=1.0),
                  loss=losses.HybridLoss(data_format=data_format, boundary_weight=0.5),
                  metrics=segmentation_metrics(CLASSES, data_format))
    x, y = batch(data_format)
    first = model.train_on_batch(x, y, return_dict=True)
    for _ in range(6):
        last = model.train_on_batch(x, y, return_dict=True)
    assert np.isfinite(last["loss"]) and last["loss"] < first["loss"], (first, last)
    assert 0.0 <= last["mean_fg_dice"] <= 1.0
    probs = model.predict_on_batch(x)
    np.testing.assert_allclose(np.asarray(probs).sum(axis=1 if data_format == "channels_first" else -1),
                               1.0, atol=1e-4)
    print(data_format, "attention_unet loss", round(first["loss"], 4), "->", round(last["loss"], 4))

keras.config.set_image_data_format("channels_first")
x, y = batch("channels_first")
probs = 0.7 * y + 0.3 / 6  # valid probabilities, near the targets
for loss in (losses.SoftDiceLoss(data_format="channels_first"),
             losses.SoftDiceLoss([0.5, 1, 1, 2, 1, 1], data_format="channels_first"),
             losses.FocalLoss(data_format="channels_first"),
             losses.BoundaryLoss(data_format="channels_first")):
    value = float(loss(y, probs))
    assert np.isfinite(value) and value >= 0, (loss.name, value)
binary = losses.BCEDiceLoss(data_format="channels_first")(y[:, :1], probs[:, :1])
assert np.isfinite(float(binary))

for schedule in (OneCycle(1e-3, 100), WarmupCosine(1e-3, 100, 10, 0.01)):
    rates = [float(schedule(step)) for step in (0, 10, 50, 99)]
    assert max(rates) <= 1e-3 + 1e-9 and rates[-1] < rates[1], rates

pgu = progressive_unet(1, 3, 6)
pgu = grow(pgu)
names = [n for n in pgu.output_names]
loss, weights = multiscale_losses(losses.HybridLoss(data_format="channels_first"), names)
pgu.compile(optimizer="adam", loss=loss, loss_weights=weights)
px, py = batch("channels_first", size=64)
targets = {"fused": py, **{f"scale_{s}": py[:, :, ::s, ::s] for s in (1, 2) if f"scale_{s}" in names}}
assert np.all(np.isfinite(pgu.train_on_batch(px, targets)))

path = sys.argv[1]
pgu.save(path)
loaded = keras.models.load_model(path)
for name, value in loaded.predict_on_batch(px).items():
    np.testing.assert_allclose(np.asarray(value), np.asarray(pgu.predict_on_batch(px)[name]), atol=1e-6)
print("JAX OK")
