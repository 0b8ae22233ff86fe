#!/usr/bin/env python
"""``xsight-predict-wsi`` from a clone, without installing the package (the command is
``xsight_keras/cli/predict_wsi.py``); the PyTorch backend unless KERAS_BACKEND is set."""

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "torch")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from xsight_keras.cli.predict_wsi import main

if __name__ == "__main__":
    sys.exit(main())
