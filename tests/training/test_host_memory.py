"""keep_freed_memory_in_process: freed activations stay in the process for reuse."""

import platform
import subprocess
import sys

import pytest

from xsight_keras.training import host_memory

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc malloc only")

_CHILD = """
import importlib.util, os, sys
import numpy as np
spec = importlib.util.spec_from_file_location("host_memory", sys.argv[2])  # without keras/torch
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
keep_freed_memory_in_process = module.keep_freed_memory_in_process
def resident_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
if sys.argv[1] == "keep":
    assert keep_freed_memory_in_process()
base = resident_mb()
a = np.empty(12 * 2**20, dtype=np.float32)  # a 48 MB activation, written, then freed
a.fill(1.0)
del a
print(resident_mb() - base)
"""


def _resident_after_free_mb(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode, host_memory.__file__], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def test_freed_buffers_stay_in_the_process():
    # glibc's defaults hand a freed 48 MB buffer back to the kernel (the next step faults it in
    # again, zero-filled); with the setting it stays for the next allocation
    assert _resident_after_free_mb("default") < 8
    assert _resident_after_free_mb("keep") > 40


@pytest.mark.parametrize("asked", [False, True])
def test_training_changes_malloc_only_when_the_setting_asks(monkeypatch, asked):
    from xsight_keras.config import RunConfig
    from xsight_keras.training import run

    calls = []

    class Stop(Exception):
        pass

    def stop():
        raise Stop

    monkeypatch.setattr(run, "keep_freed_memory_in_process", lambda: calls.append(1))
    monkeypatch.setattr(run, "init_distributed", stop)  # the step right after the allocator's
    with pytest.raises(Stop):
        run.train(RunConfig(device="cpu", cpu_malloc_tuning=asked))
    assert calls == ([1] if asked else [])
