"""Copy weights between models by layer name."""

from __future__ import annotations

import keras


def transfer_weights(source: keras.Model, target: keras.Model) -> list[str]:
    """Copy the weights of every layer of ``target`` that ``source`` has under the same name.

    A layer is copied only when all its weight shapes agree; layers that exist in one model only
    (or changed shape) keep their own values. Returns the names of the layers copied.
    """
    copied = []
    source_layers = {layer.name: layer for layer in source.layers}
    for layer in target.layers:
        if not layer.weights or layer.name not in source_layers:
            continue
        values = source_layers[layer.name].get_weights()
        if len(values) != len(layer.weights) or any(
            tuple(v.shape) != tuple(w.shape) for v, w in zip(values, layer.weights)
        ):
            continue
        layer.set_weights(values)
        copied.append(layer.name)
    return copied
