"""Importing xsight_keras changes no global state but the Keras backend, when none was chosen.

Run in a fresh interpreter: the user has picked matplotlib's ``svg`` backend and a
``keras.json`` with ``channels_first`` and no backend. After importing the package and every
submodule, and drawing figures through it, the matplotlib backend, Keras' data format and dtype
policy and the environment are as before (``KERAS_BACKEND=torch`` added), pyplot holds no
figure (Keras itself imports pyplot) and glibc's malloc settings were not touched.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

_CHILD = r"""
import json, os, pkgutil, sys
import matplotlib
matplotlib.use("svg")
import cv2  # opencv's own loader prepends its library folder to LD_LIBRARY_PATH on import
environ = dict(os.environ)

import xsight_keras

for module in pkgutil.walk_packages(xsight_keras.__path__, "xsight_keras."):
    __import__(module.name)

import keras
from xsight_keras.training.callbacks import plot_history
from xsight_keras.training.host_memory import malloc_tuning_applied
from xsight_keras.viz import plot_confusion_matrix

out = sys.argv[1]
with open(os.path.join(out, "history.csv"), "w") as f:
    f.write("epoch,loss,val_loss,lr\n0,1.0,1.2,0.001\n1,0.8,1.0,0.0005\n")
plot_history(os.path.join(out, "history.csv"), os.path.join(out, "curves.png"))
plot_confusion_matrix([[5, 1], [2, 7]], ["background", "nucleus"], os.path.join(out, "cm.png"))

added = {k: v for k, v in os.environ.items() if environ.get(k) != v}
removed = sorted(set(environ) - set(os.environ))
print(json.dumps({
    "backend": matplotlib.get_backend(),
    "pyplot_figures": sys.modules["matplotlib.pyplot"].get_fignums()
    if "matplotlib.pyplot" in sys.modules else [],
    "keras_backend": keras.backend.backend(), "data_format": keras.config.image_data_format(),
    "policy": keras.config.dtype_policy().name, "floatx": keras.config.floatx(),
    "env_added": added, "env_removed": removed, "malloc": malloc_tuning_applied(),
    "modules": sum(m.startswith("xsight_keras.") for m in sys.modules),
}))
"""


def test_import_changes_no_global_state(tmp_path):
    keras_home = tmp_path / "keras_home"
    keras_home.mkdir()
    (keras_home / "keras.json").write_text(json.dumps({"image_data_format": "channels_first"}))
    env = {k: v for k, v in os.environ.items() if k not in ("KERAS_BACKEND", "MPLBACKEND")}
    env["KERAS_HOME"] = str(keras_home)
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads(proc.stdout.strip().splitlines()[-1])
    assert state["modules"] > 30  # every submodule was imported
    assert state["backend"] == "svg", "importing or plotting switched the matplotlib backend"
    assert state["pyplot_figures"] == [], "figures were left open in pyplot's global state"
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert (tmp_path / "cm.png").stat().st_size > 1000
    assert state["keras_backend"] == "torch"
    assert state["data_format"] == "channels_first", "the import changed Keras' image_data_format"
    assert state["policy"] == "float32" and state["floatx"] == "float32", "dtype policy changed"
    assert state["env_added"] == {"KERAS_BACKEND": "torch"}, state["env_added"]
    assert state["env_removed"] == []
    assert state["malloc"] is False, "glibc malloc settings were changed on import"
