from pathlib import Path

import keras
import numpy as np
import pytest

from tests.helpers import assert_same_weights, numpy_weights
from xsight_keras.training.callbacks import (
    BestCheckpoint,
    EpochCheckpoint,
    ExponentialMovingAverage,
    StochasticWeightAveraging,
    save_model_atomically,
    update_batch_norm,
)


def tiny_model():
    inputs = keras.Input((8, 8, 2))
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    outputs = keras.layers.Conv2D(1, 1, name="head")(x)
    return keras.Model(inputs, outputs)


def data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8, 8, 2)).astype("float32")
    return x, (x[..., :1] * 2 - x[..., 1:] + 0.5).astype("float32")


class RecordValidationWeights(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seen = []

    def on_test_begin(self, logs=None):
        self.seen.append(self.model.get_layer("conv").get_weights()[0].copy())


class RecordTrainingWeights(keras.callbacks.Callback):
    """Per fit: every variable of the model at its first training step's start (``at_start``)
    and after its last training step (``at_end``), before any validation swaps weights in."""

    def __init__(self):
        super().__init__()
        self.at_start, self.at_end = [], []

    def on_train_begin(self, logs=None):
        self.at_start.append(None)
        self.at_end.append(None)

    def on_train_batch_begin(self, batch, logs=None):
        if self.at_start[-1] is None:
            self.at_start[-1] = numpy_weights(self.model)

    def on_train_batch_end(self, batch, logs=None):
        self.at_end[-1] = numpy_weights(self.model)


def test_ema_weights_are_validated_and_training_continues_on_raw_weights():
    keras.utils.set_random_seed(0)
    model = tiny_model()
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    x, y = data()
    ema = ExponentialMovingAverage(decay=0.9)
    recorder = RecordValidationWeights()
    weights = RecordTrainingWeights()
    model.fit(x, y, batch_size=8, epochs=2, validation_data=(x, y),
              callbacks=[weights, ema, recorder], verbose=0)
    raw = weights.at_end[0]  # the raw weights after the last training step
    conv = [v.path for v in model.weights].index("conv/kernel")
    averaged = ema.ema_weights()[0]
    assert not np.allclose(raw[conv], averaged)  # the average lags behind the raw weights
    np.testing.assert_allclose(recorder.seen[-1], averaged, rtol=1e-6)  # validation used the EMA
    # after fit the model holds the raw weights (not the EMA of the last validation) ...
    assert_same_weights(numpy_weights(model), raw, what="weights after fit")
    # ... and a second fit starts from exactly them
    model.fit(x, y, batch_size=8, epochs=1, callbacks=[weights, ema], verbose=0)
    assert len(weights.at_start) == 2
    assert_same_weights(weights.at_start[1], raw, what="weights at the second fit's first step")


def test_ema_equals_the_recurrence_by_hand():
    keras.utils.set_random_seed(1)
    model = tiny_model()
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    x, y = data(16)
    ema = ExponentialMovingAverage(decay=0.5)
    snapshots = []

    class Snap(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            snapshots.append(keras.ops.convert_to_numpy(self.model.trainable_weights[0]).copy())

    initial = keras.ops.convert_to_numpy(model.trainable_weights[0]).copy()
    model.fit(x, y, batch_size=8, epochs=1, callbacks=[Snap(), ema], verbose=0, shuffle=False)
    expected = initial
    for n, w in enumerate(snapshots):
        d = min(0.5, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * w
    np.testing.assert_allclose(ema.ema_weights()[0], expected, rtol=1e-5)


def test_swa_average_is_the_mean_of_epoch_snapshots_and_bn_is_reestimated():
    keras.utils.set_random_seed(2)
    model = tiny_model()
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    x, y = data()
    snapshots = []

    class Snap(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch >= 2:
                snapshots.append(self.model.get_layer("head").get_weights()[0].copy())

    swa = StochasticWeightAveraging(start_epoch=2)
    model.fit(x, y, batch_size=8, epochs=5, callbacks=[Snap(), swa], verbose=0)
    assert swa.count == 3
    averaged = swa.averaged_model()
    np.testing.assert_allclose(averaged.get_layer("head").get_weights()[0], np.mean(snapshots, 0), rtol=1e-5)
    batches = [x[i:i + 8] for i in range(0, 32, 8)]
    assert update_batch_norm(averaged, batches) == 4
    conv = keras.Model(averaged.inputs, averaged.get_layer("conv").output)
    batch_means = [conv.predict(b, verbose=0).mean(axis=(0, 1, 2)) for b in batches]
    moving_mean = keras.ops.convert_to_numpy(averaged.get_layer("bn").moving_mean)
    np.testing.assert_allclose(moving_mean, np.mean(batch_means, 0), rtol=1e-4, atol=1e-5)


def test_checkpoint_never_saves_non_finite_weights(tmp_path):
    model = tiny_model()
    path = tmp_path / "best.keras"
    save_model_atomically(model, path)
    good = path.read_bytes()
    model.get_layer("head").set_weights([np.full((1, 1, 4, 1), np.nan, "float32"), np.zeros(1, "float32")])
    with pytest.raises(ValueError, match="NaN"):
        save_model_atomically(model, path)
    assert path.read_bytes() == good
    checkpoint = BestCheckpoint(path, monitor="val_score", mode="max", verbose=False)
    checkpoint.set_model(model)
    checkpoint.on_epoch_end(0, {"val_score": 0.9})  # improved, but NaN weights: keep the old file
    assert path.read_bytes() == good and checkpoint.best_epoch is None


def test_epoch_checkpoints_hold_the_ema_weights_every_nth_epoch(tmp_path):
    model = tiny_model()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    ema = ExponentialMovingAverage(decay=0.9)
    keep = EpochCheckpoint(lambda n: tmp_path / f"epoch_{n:03d}.keras", every=2, ema=ema)
    x, y = data()
    model.fit(x, y, batch_size=8, epochs=4, callbacks=[ema, keep], verbose=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_002.keras", "epoch_004.keras"]
    saved = keras.models.load_model(tmp_path / "epoch_004.keras")
    kernel = saved.get_layer("conv").get_weights()[0]
    shadow = keras.ops.convert_to_numpy(ema.shadow[0])  # conv kernel: the first trainable weight
    np.testing.assert_allclose(kernel, shadow, rtol=1e-6)
    assert not np.allclose(kernel, model.get_layer("conv").get_weights()[0])  # not the raw ones
    model.get_layer("head").set_weights([np.full((1, 1, 4, 1), np.nan, "float32"), np.zeros(1, "float32")])
    broken = EpochCheckpoint(lambda n: tmp_path / "nan.keras")
    broken.set_model(model)
    broken.on_epoch_end(0)  # warns, writes nothing
    assert not (tmp_path / "nan.keras").exists()


def test_an_interrupted_checkpoint_write_leaves_the_previous_file(tmp_path, monkeypatch):
    model = tiny_model()
    path = tmp_path / "best.keras"
    save_model_atomically(model, path)
    good = path.read_bytes()

    def dies_half_way(self, filepath, *args, **kwargs):
        Path(filepath).write_bytes(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # e.g. Ctrl-C or the job scheduler's SIGINT mid-write

    monkeypatch.setattr(keras.Model, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_model_atomically(model, path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["best.keras"]  # no partial file left


def test_atomic_text_write_survives_an_interruption(tmp_path, monkeypatch):
    import os

    from xsight_keras.files import atomic_write_text

    target = tmp_path / "config.json"
    atomic_write_text(target, '{"good": true}')

    def no_rename(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(target, '{"half":')
    assert target.read_text() == '{"good": true}' and len(list(tmp_path.iterdir())) == 1


class ArraySamples:
    """The part of a SegmentationDataset that PreciseBatchNorm reads: ``len`` and ``sample``."""

    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def sample(self, epoch, index):
        return self.x[index], None


@pytest.mark.parametrize("precise", [False, True])
def test_precise_batch_norm_makes_inference_compute_what_training_computes(precise):
    """A BatchNorm whose inputs have variance ~0.01: after four steps the moving variance (from
    1, momentum 0.1) is still far off, so inference-mode outputs differ from training-mode ones;
    re-estimated before validation they agree (the PGU-Net's Pap-smear collapse, in small)."""
    from xsight_keras.models.fused_layers import FusedBatchNormalization
    from xsight_keras.training.callbacks import PreciseBatchNorm

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(0.5, 0.1, (32, 8, 8, 2)).astype("float32")
    y = (x[..., :1] > 0.5).astype("float32")
    inputs = keras.Input((8, 8, 2))
    h = keras.layers.Conv2D(4, 3, padding="same", kernel_initializer=keras.initializers.RandomNormal(
        stddev=0.05), name="conv")(inputs)
    h = FusedBatchNormalization(momentum=0.9, name="bn")(h)
    model = keras.Model(inputs, keras.layers.Conv2D(1, 1, name="head")(h))
    model.compile(keras.optimizers.SGD(0.01), "mse")
    callbacks = [PreciseBatchNorm(ArraySamples(x), batch_size=8, batches=4)] if precise else []
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, validation_data=(x[:8], y[:8]),
              callbacks=callbacks, verbose=0)
    inference = keras.ops.convert_to_numpy(model(x, training=False))
    training = keras.ops.convert_to_numpy(model(x, training=True))  # statistics of all 32 = the 4 batches'
    gap = np.abs(inference - training).max() / np.abs(training).max()
    if precise:
        assert gap < 1e-3, gap
    else:
        assert gap > 0.1, gap
    if precise:  # a user's evaluate() outside fit leaves the statistics alone
        before = keras.ops.convert_to_numpy(model.get_layer("bn").moving_variance)
        model.evaluate(x, y, verbose=0, callbacks=callbacks)
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(model.get_layer("bn").moving_variance), before)
