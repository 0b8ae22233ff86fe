"""Build the project's models, print their parameter counts and run one forward pass.

    xsight-describe-models                 # table of every model family
    xsight-describe-models --summary attention_unet
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from xsight_keras.heads import as_output_dict, output_names, primary_class_map
from xsight_keras.models import attention_unet, describe_model, progressive_unet

MODELS = {
    "attention_unet": lambda: attention_unet(6, encoder="resnet34"),
    "attention_unet_resnet18": lambda: attention_unet(6, encoder="resnet18"),
    "attention_unet_resnet50": lambda: attention_unet(6, encoder="resnet50"),
    "attention_unet_convnext_tiny": lambda: attention_unet(6, encoder="convnext_tiny"),
    **{
        f"progressive_unet_stage{k}": (lambda k=k: progressive_unet(k, in_channels=3, num_classes=1))
        for k in (1, 2, 3, 4)
    },
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summary", choices=sorted(MODELS), help="print one model's Keras summary")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.summary:
        MODELS[args.summary]().summary(line_length=120)
        return 0
    print(f"{'model':32s} {'parameters':>12s} {'input':>10s} {'output':>16s} {'forward s':>10s}")
    for name, build in MODELS.items():
        model = build()
        size = 32 * 2 ** (int(name[-1]) - 1) if "stage" in name else 256  # native size
        info = describe_model(model)
        first = info["data_format"] == "channels_first"
        channels = model.inputs[0].shape[1 if first else -1]
        shape = (1, channels, size, size) if first else (1, size, size, channels)
        x = np.random.default_rng(0).normal(size=shape).astype("float32")
        start = time.perf_counter()
        out = model.predict(x, verbose=0)
        elapsed = time.perf_counter() - start
        out = as_output_dict(model, out)[primary_class_map(output_names(model))]
        print(f"{name:32s} {model.count_params():>12,d} {(size, size)!s:>10s} "
              f"{out.shape[1:]!s:>16s} {elapsed:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
