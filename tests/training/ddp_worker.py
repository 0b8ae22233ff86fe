"""One rank of the 2-process data-parallel tests (``test_distributed.py`` starts two of these).

``ddp_worker.py data_root out_dir``: a hand-written ``fit`` loop. Environment: RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT (as torchrun sets them). Writes ``out_dir/rank{r}.npz``
(all model variables), ``rank{r}.json`` (samples seen per epoch, history) and, on rank 0,
``model.keras``.

``ddp_worker.py train dump_dir nan train.py-args...``: ``scripts/train.py`` itself (its ``main``
and exit status), watched: every ``fit`` writes ``dump_dir/{start,end}_rank{r}.npz`` (all model
variables when ``fit`` starts, i.e. after a resume's restore and the broadcast, and when it
returns) and ``end_rank{r}.json`` (the history ``fit`` returned). ``nan`` is ``-`` or
``RANK:STEP``: that rank feeds a NaN image batch at its STEP-th training step (from 1), so its
loss, and only its loss, becomes non-finite there.
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras
import numpy as np

from xsight_keras.data import PreparedDataset, SegmentationDataset, make_loader
from xsight_keras.models import attention_unet
from xsight_keras.training.distributed import (
    init_distributed,
    install_data_parallel,
    shutdown_distributed,
)
from xsight_keras.training.losses import HybridLoss
from xsight_keras.training.metrics import segmentation_metrics
from xsight_keras.training.state import SyncLoaderEpoch

SEEN: list = []


class RecordingDataset(SegmentationDataset):
    """Remembers every ``(epoch, index)`` it served (workers = 0: in this process)."""

    def __getitem__(self, key):
        SEEN.append([int(key[0]), int(key[1])])
        return super().__getitem__(key)


def main(data_root, out_dir):
    ctx = init_distributed()
    keras.utils.set_random_seed(100 + ctx.rank)  # different initial weights: broadcast must fix it
    keras.config.set_image_data_format("channels_first")
    split = PreparedDataset(Path(data_root) / "train")
    train = RecordingDataset(split, size=64, level=1, train=True, data_format="channels_first",
                             num_classes=6)
    loader = make_loader(train, 4, rank=ctx.rank, world_size=ctx.world_size)
    model = attention_unet(6, "resnet18", decoder_filters=(32, 16, 16, 8, 8))
    model.compile(optimizer=keras.optimizers.AdamW(3e-3), loss=HybridLoss(data_format="channels_first"),
                  metrics=segmentation_metrics(split.class_names, "channels_first"))
    install_data_parallel(model, ctx)
    # fit draws one batch to build the model before training; count what training reads
    forget_build_batch = keras.callbacks.LambdaCallback(on_train_begin=lambda logs: SEEN.clear())
    history = model.fit(loader, epochs=4, verbose=0,
                        callbacks=[forget_build_batch, SyncLoaderEpoch(loader)]).history
    out = Path(out_dir)
    np.savez(out / f"rank{ctx.rank}.npz", **_variables(model))
    (out / f"rank{ctx.rank}.json").write_text(json.dumps({"seen": SEEN, "history": history}))
    if ctx.is_primary:
        model.save(out / "model.keras")
    shutdown_distributed()


def _variables(model) -> dict:
    return {f"{i}_{v.path}": keras.ops.convert_to_numpy(v) for i, v in enumerate(model.variables)}


def watched_train(dump_dir, nan, *train_args) -> int:
    rank = int(os.environ.get("RANK", "0"))
    dump = Path(dump_dir)
    nan_rank, nan_step = (int(v) for v in nan.split(":")) if nan != "-" else (-1, 0)
    fit, train_step = keras.Model.fit, keras.Model.train_step
    steps = 0

    def watched_fit(model, *args, **kwargs):
        np.savez(dump / f"start_rank{rank}.npz", **_variables(model))
        history = fit(model, *args, **kwargs)
        np.savez(dump / f"end_rank{rank}.npz", **_variables(model))
        (dump / f"end_rank{rank}.json").write_text(json.dumps(history.history))
        return history

    def poisoned_train_step(model, data):
        nonlocal steps
        steps += 1
        if rank == nan_rank and steps == nan_step:
            data = (data[0] * float("nan"), *data[1:])
        return train_step(model, data)

    keras.Model.fit, keras.Model.train_step = watched_fit, poisoned_train_step
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    from train import main as train_main

    return train_main(list(train_args))


if __name__ == "__main__":
    if sys.argv[1] == "train":
        sys.exit(watched_train(*sys.argv[2:]))
    main(*sys.argv[1:3])
