"""The command-line programs, one module per command; each has ``build_parser()`` and
``main(argv=None) -> int`` (the exit status: 0 done, 1 done with skipped inputs, 2 bad input,
3 non-finite training loss).

Installed as console commands (``[project.scripts]`` in pyproject.toml), ``xsight-<name>`` with
``_`` spelled ``-``:

    xsight-train                  train from a preset, a YAML file and flags; --resume
    xsight-evaluate               a run's checkpoint on a split: JSON + Markdown reports
    xsight-predict                label maps, overlays, nuclei and GeoJSON for new images
    xsight-predict-wsi            every nucleus of whole-slide images: GeoJSON, Parquet, overlays
    xsight-prepare-data           downloaded datasets (or the demo set) → prepared arrays
    xsight-tune-postprocessing    the watershed settings of a run, on its validation split
    xsight-visualize-dataset      class distribution and a sample grid of a prepared split
    xsight-visualize-predictions  image | truth | prediction | overlay grid of a run
    xsight-compare-runs           training curves and per-class Dice of several runs
    xsight-describe-models        parameter counts and a forward pass of every model

From a clone, ``python scripts/<name>.py`` runs the same ``main``. This package sits on top
of the library: the library never imports it, and the commands only parse arguments, call
library functions and turn their errors into messages and exit statuses.
"""
