"""The package outside a clone: presets as package data, console commands, and a wheel that
installs and trains from any working directory.

The wheel is built offline from a copy of the sources (nothing is written into the checkout)
and installed, not editable, into a fresh venv. That venv then reuses this environment's
installed packages through a ``.pth`` line, which adds the folder to ``sys.path`` after the
venv's own and does not run the ``.pth`` files in it, so an editable install of xsight-keras
there (``make setup`` makes one) stays inactive. The commands run without PYTHONPATH from a
temporary folder, and the test checks that ``xsight_keras`` is found inside the venv.
"""

import ast
import configparser
import importlib
import importlib.util
import json
import os
import pkgutil
import shutil
import site
import subprocess
import sys
import zipfile
from argparse import ArgumentParser
from pathlib import Path

import pytest

import xsight_keras.cli
from tests.helpers import ROOT, SCRIPTS
from xsight_keras.config import available_presets
from xsight_keras.data import write_demo_dataset

PACKAGE = ROOT / "xsight_keras"
COMMANDS = sorted(m.name for m in pkgutil.iter_modules(xsight_keras.cli.__path__))
PRESETS = sorted(p.name for p in (PACKAGE / "configs").glob("*.yaml"))
needs_pip = pytest.mark.skipif(importlib.util.find_spec("pip") is None
                               or importlib.util.find_spec("venv") is None,
                               reason="pip or venv is not available")


def test_presets_are_package_data_and_the_top_level_configs_folder_is_the_same():
    assert available_presets() == [name.removesuffix(".yaml") for name in PRESETS]
    assert {"demo.yaml", "pannuke.yaml"} <= set(PRESETS)
    for name in PRESETS:  # people who edit configs/pannuke.yaml in a clone edit the preset
        assert (ROOT / "configs" / name).resolve() == (PACKAGE / "configs" / name).resolve()


def test_every_command_has_a_parser_a_main_and_a_script_wrapper():
    assert {"train", "evaluate", "predict", "prepare_data"} <= set(COMMANDS)
    for name in COMMANDS:
        module = importlib.import_module(f"xsight_keras.cli.{name}")
        assert isinstance(module.build_parser(), ArgumentParser), name
        assert callable(module.main), name
        assert f"from xsight_keras.cli.{name} import main" in (SCRIPTS / f"{name}.py").read_text()


def test_the_library_never_imports_the_commands():
    for path in PACKAGE.rglob("*.py"):
        if path.is_relative_to(PACKAGE / "cli"):
            continue
        package = list(path.relative_to(ROOT).parent.parts)  # what relative imports start from
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                base = package[:len(package) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                names = [module] + [f"{module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            assert not any(n == "xsight_keras.cli" or n.startswith("xsight_keras.cli.")
                           for n in names), f"{path}:{node.lineno} imports the commands"


def _pip(*args, cwd=None) -> None:
    """``pip args...`` of this environment, offline; fails the test with pip's output."""
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
           "PIP_NO_INPUT": "1"}
    proc = subprocess.run([sys.executable, "-m", "pip", *map(str, args)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The package's wheel, built offline from a copy of pyproject.toml, README.md and the
    package (pip builds in the source folder: build/ and *.egg-info land in the copy)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(PACKAGE, src / "xsight_keras",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    _pip("wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir", "-q", "-w", tmp / "dist",
         src)
    wheels = list((tmp / "dist").glob("xsight_keras-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@needs_pip
def test_the_wheel_holds_the_presets_and_a_console_command_per_cli_module(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        entry_points = configparser.ConfigParser()
        entry_points.read_string(archive.read(info).decode())
    assert {f"xsight_keras/configs/{name}" for name in PRESETS} <= names
    assert {f"xsight_keras/cli/{name}.py" for name in COMMANDS} <= names
    expected = {f"xsight-{name.replace('_', '-')}": f"xsight_keras.cli.{name}:main"
                for name in COMMANDS}
    assert dict(entry_points["console_scripts"]) == expected
    assert not any(n.startswith(("tests/", "scripts/", "configs/")) for n in names)


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> dict:
    """A fresh venv with the wheel installed (not editable) and this environment's packages
    visible; returns its ``bin`` folder, a working directory outside the checkout and the
    environment for its commands (no PYTHONPATH, no KERAS_BACKEND, a fresh KERAS_HOME)."""
    tmp = tmp_path_factory.mktemp("venv")
    prefix = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", prefix], check=True,
                   timeout=120)
    python = prefix / "bin" / "python"
    # installed before the .pth exists: pip sees an empty venv (no editable install to replace)
    _pip("--python", python, "install", "--no-deps", "--no-cache-dir", "-q", wheel)
    code = "import sysconfig; print(sysconfig.get_path('purelib'))"
    purelib = Path(subprocess.run([python, "-c", code], check=True, capture_output=True,
                                  text=True).stdout.strip())
    (purelib / "_parent_environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "KERAS_BACKEND", "VIRTUAL_ENV")}
    env.update(KERAS_HOME=str(tmp / "keras_home"),
               PATH=f"{prefix / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    work = tmp / "work"
    work.mkdir()
    return {"prefix": prefix, "bin": prefix / "bin", "work": work, "env": env}


def _run(venv, *args, timeout=300) -> subprocess.CompletedProcess:
    """``args`` in the venv's working directory and environment; asserts exit status 0."""
    proc = subprocess.run([str(a) for a in args], cwd=venv["work"], env=venv["env"],
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@needs_pip
def test_console_commands_run_from_any_folder_on_the_installed_wheel(venv):
    """``xsight-train --help``, then one tiny epoch of the demo preset: the preset's relative
    ``data_root`` and ``output_dir`` are read from the working directory, and the backend is
    PyTorch without KERAS_BACKEND."""
    code = "import importlib.util; print(importlib.util.find_spec('xsight_keras').origin)"
    where = Path(_run(venv, venv["bin"] / "python", "-c", code).stdout.strip())
    assert where.resolve().is_relative_to(venv["prefix"].resolve()), where  # not this checkout
    assert sorted(p.name for p in (where.parent / "configs").glob("*.yaml")) == PRESETS
    for name in COMMANDS:
        assert (venv["bin"] / f"xsight-{name.replace('_', '-')}").is_file(), name
    usage = _run(venv, venv["bin"] / "xsight-train", "--help").stdout
    assert "--preset" in usage and "'demo'" in usage and "--resume" in usage
    # a small demo set where the preset's relative data_root points (the preset would write
    # 288 tiles there: seconds better spent elsewhere)
    write_demo_dataset(venv["work"] / "data" / "demo", {"train": 8, "valid": 4}, seed=0)
    (venv["work"] / "tiny.yaml").write_text("val_size: 32\ndecoder_filters: [8, 8, 8, 8, 8]\n"
                                            "tensorboard_images: 0\n")
    _run(venv, venv["bin"] / "xsight-train", "--preset", "demo", "--config", "tiny.yaml",
         "--epochs", 1, "--batch_size", 4, "--input_size", 32, "--steps_per_epoch", 1)
    assert sorted(p.name for p in venv["work"].iterdir()) == ["data", "outputs", "tiny.yaml"]
    run = venv["work"] / "outputs" / "demo"
    assert (run / "final.keras").is_file()
    config = json.loads((run / "config.json").read_text())
    assert config["input_size"] == 32 and config["data_root"] == "data/demo"
    assert config["keras_backend"] == "torch"
