"""Train a nucleus-segmentation model from a preset, a config file and command-line overrides.

    xsight-train --preset demo
    xsight-train --preset pannuke --data_root data/pannuke --experiment_name pannuke_r1
    xsight-train --preset papsmear --epochs_per_stage 20 --batch_sizes 32:64,64:32,128:16,256:8

    xsight-train --resume outputs/pannuke_r1      # after a crash or a kill

Every flag overrides the preset's value; the resolved configuration is written to
outputs/<experiment_name>/config.json. Exit statuses: 0 done; 2 missing data, bad settings, or a
run directory another live run holds; 3 a NaN or infinite loss; 4 a write the disk refused (full,
over quota: the previous checkpoint and resume point are kept); 128 + N when stopped by signal N
after writing a resume point (143 SIGTERM, 130 SIGINT, 138 SIGUSR1; --resume continues it).
"""

from __future__ import annotations

import argparse
import sys

from xsight_keras.config import available_presets, load_config, load_run_config

# flag -> type; booleans take an optional value (--use_swa, --use_swa false)
FLAGS = {
    "epochs": int, "batch_size": int, "lr": float, "dropout": float, "weight_decay": float,
    "warmup_epochs": int, "min_lr_factor": float, "early_stopping_patience": int,
    "grad_clip_val": float, "use_mixed_precision": bool, "use_swa": bool, "swa_start_epoch": int,
    "data_root": str, "progressive": bool, "epochs_per_stage": int, "batch_sizes": str,
    "output_dir": str, "experiment_name": str, "use_augmented": bool, "num_workers": int,
    "device": str, "seed": int, "use_ema": bool, "mixup_alpha": float, "encoder": str,
    "encoder_weights": str, "input_size": int, "size_schedule": str, "aug_schedule": str,
    "loss": str, "lr_schedule": str, "optimizer": str, "steps_per_epoch": int,
    "data_format": str, "overwrite": bool, "jit_compile": bool, "tta_val": bool,
    "instance_head": bool, "heads": str, "samples_per_epoch": int, "crops_per_image": float,
    "lr_scaling": str, "cpu_malloc_tuning": bool, "head_branch_stages": int,
    "instance_loss_weight": float, "hover_loss_weight": float, "save_every_epochs": int,
    "precise_bn_batches": int, "fade_in_epochs": float, "grown_lr_factor": float,
    "checkpoint_every_minutes": float, "mpp": float, "mixed_precision_dtype": str,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", help=f"one of {available_presets()}")
    parser.add_argument("--config", help="a YAML file of settings (applied after the preset)")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue an interrupted run from its last complete epoch (its own "
                             "config.json; flags such as --epochs still override)")
    for flag, kind in FLAGS.items():
        if kind is bool:
            parser.add_argument(f"--{flag}", nargs="?", const="true", default=None, metavar="BOOL")
        else:
            # read as text: the configuration converts it (and takes none/null for "unset")
            parser.add_argument(f"--{flag}", default=None, metavar=kind.__name__.upper())
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k in FLAGS and v is not None}
    from xsight_keras.files import WRITE_ERRNOS, write_failure
    from xsight_keras.training.callbacks import NonFiniteLossError
    from xsight_keras.training.preemption import TrainingStopped
    from xsight_keras.training.run import DataNotFoundError, train
    from xsight_keras.training.run_lock import RunDirectoryInUse

    try:
        if args.resume:
            if args.preset or args.config:
                raise ValueError("--resume takes the run's own config.json; drop --preset/--config")
            moved = [f"--{k}" for k in ("output_dir", "experiment_name") if k in overrides]
            if moved:
                raise ValueError(f"--resume continues in the folder it is given; drop "
                                 f"{'/'.join(moved)} (move or copy the run folder instead)")
            config = load_run_config(args.resume, overrides)
        else:
            config = load_config(args.preset, args.config, overrides)
        result = train(config, resume=bool(args.resume))
    except TrainingStopped as exc:
        print(str(exc), file=sys.stderr)
        return exc.exit_status
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except (DataNotFoundError, FileNotFoundError, FileExistsError, PermissionError, ValueError,
            RunDirectoryInUse) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in WRITE_ERRNOS:
            raise
        failure = write_failure(exc.filename or config.run_dir, exc)  # e.g. from Keras' CSVLogger
        print(f"error: {failure}. Free some space, then continue with --resume "
              f"{config.run_dir}", file=sys.stderr)
        return 4
    print(f"run directory: {result.run_dir} ({result.seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
