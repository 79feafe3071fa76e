#!/usr/bin/env python
"""Stage 2: train a segmentation model on LMDB databases and export a self-describing SavedModel.

    python train_unet.py --train_database train-x.lmdb --test_database test-x.lmdb --output_dir runs/x \\
        --batch_size 4 --number_classes 2 --learning_rate 1e-4 --test_every_n_steps 1000

README.md, "Stage 2", describes the schedule, outputs, resume, distribution and exit codes; the parts
live in segkit/training/ (README.md, "Development"). This file is the command line: parse, check the
arguments and databases (segkit.training.resolve), and only then import TensorFlow and train.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Sequence

import models
from segkit import cliutil, tfquiet
from segkit.training.checkpoints import RunState, check_resume, keep_chosen_settings  # noqa: F401  (re-exported)
from segkit.training.config import EMA_DEFAULT_DECAY, LOSSES, LR_SCHEDULES, RunConfig  # noqa: F401
from segkit.training.loop import Outcome, StopRequest, TrainingDiverged, stop_reason, train  # noqa: F401
from segkit.training.losses import batch_statistics, loss_from_statistics  # noqa: F401
from segkit.training.resolve import _training_mask_map, parse_class_weights, resolve_config  # noqa: F401
from segkit.training.trainer import Trainer, distribute, learning_rate_at, make_readers  # noqa: F401

EXIT_DIVERGED = 3

# oneDNN's CPU kernels for training unless the user set TF_ENABLE_ONEDNN_OPTS: TensorFlow 2.21 leaves
# them off on CPUs without AVX-512 VNNI (the AMD EPYC development machine), where the default UNet's
# step (batch 8, 256x256) then takes 1.91 s instead of 0.53 s (README.md, "Benchmarks").
ONEDNN_TRAINING = "1"


def build_parser() -> cliutil.ArgumentParser:
    p = cliutil.ArgumentParser(description="Train a UNet / FC-DenseNet on LMDB databases built by build_lmdb.py; "
                               "export the best model as a SavedModel with its metadata.")
    p.add_argument("--train_database", nargs="+", required=True, help="one or more training databases (*.lmdb)")
    p.add_argument("--test_database", required=True, help="test database (*.lmdb); one full pass per evaluation")
    p.add_argument("--output_dir", required=True, help="checkpoints, logs, metrics.csv, config.json and saved_model/ go here")
    p.add_argument("--batch_size", type=int, default=None,
                   help="samples per replica (GPU); global batch = batch_size x replicas (default: chosen from the crop "
                        "size and the machine; the original's was 4)")
    p.add_argument("--number_classes", type=int, default=None,
                   help="classes the model predicts (mask values 0..N-1); default: from the databases (the instance "
                        "target's classes, or the largest class id in the masks + 1, at least 2)")
    p.add_argument("--learning_rate", type=float, default=None,
                   help="Adam learning rate (warm-up at a tenth of it; default: chosen, 1e-3; the original's was 1e-4)")
    p.add_argument("--lr_schedule", choices=LR_SCHEDULES, default="constant",
                   help="after warm-up: 'constant' (the original's) or 'cosine' (decay to a hundredth at --max_steps)")
    p.add_argument("--ema_decay", type=float, default=EMA_DEFAULT_DECAY,
                   help="test, keep and export an exponential moving average of the weights with this decay "
                        "(ramped up as min(decay, (1+step)/(10+step))); 0 = the raw weights, as the original")
    p.add_argument("--clip_norm", type=float, default=None,
                   help="clip each replica's gradient to this global norm (default: chosen, 1; 0 = no clipping, "
                        "as the original)")
    p.add_argument("--test_every_n_steps", type=int, default=None,
                   help="steps between test passes (an 'epoch'; default: chosen from the record count, 50-1000; "
                        "the original's was 1000)")
    p.add_argument("--balance_classes", type=cliutil.str2bool, default=False, metavar="0/1",
                   help="1 = sample a class uniformly, then a record containing it")
    p.add_argument("--use_augmentation", type=cliutil.str2bool, default=True, metavar="0/1", help="augment training samples")
    p.add_argument("--early_stopping", type=int, default=10,
                   help="stop after this many test passes without test-loss improvement (> 1e-4); 0 = never")
    p.add_argument("--reader_count", type=int, default=1, help="reader processes per replica")
    p.add_argument("--model", choices=models.ALL_MODEL_NAMES, default=None,
                   help=f"architecture (default: {models.DEFAULT_MODEL}, or {models.DEFAULT_VOLUME_MODEL} for volume databases)")
    p.add_argument("--depth", type=int, default=None,
        help=f"unet/unet3d only: poolings (default {models.unet.DEFAULTS['depth']})")
    p.add_argument("--base_filters", type=int, default=None,
                   help="unet/unet3d only: filters of the first level (default: chosen from the device, 8 on a CPU, "
                        "32 on GPUs, 16 for unet3d on GPUs)")
    p.add_argument("--dropout", type=float, default=None, help="dropout rate (default: the model's, unet 0, fcdensenet 0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights initialization and of the sample stream")
    p.add_argument("--max_steps", type=int, default=None,
                   help="stop after this many steps (default: chosen from the data unless --max_minutes is given)")
    p.add_argument("--max_minutes", type=float, default=None,
                   help="stop after this many minutes of training (steps and test passes), then test and export")
    p.add_argument("--mixed_precision", type=cliutil.str2bool, default=False, metavar="0/1",
                   help="mixed_float16 on GPUs (ignored with a notice on CPU)")
    p.add_argument("--loss", choices=LOSSES, default=None,
                   help="cross-entropy, soft Dice, both, or focal (gamma 2) (default: chosen: 'ce+dice', nnU-Net's; "
                        "'ce' is the original's)")
    p.add_argument("--class_weights", default="none",
                   help="'none', 'auto' (inverse class frequency of the training databases) or w0,w1,...")
    p.add_argument("--crop_size", type=int, default=None,
                   help="training crop edge, a multiple of the model's size factor (default: chosen from the "
                        "records' size and the machine)")
    p.add_argument("--resume", type=cliutil.str2bool, default=False, metavar="0/1",
                   help="require a checkpoint to continue (a matching one is continued automatically anyway)")
    p.add_argument("--bioimageio", type=cliutil.str2bool, default=True, metavar="0/1",
                   help="also write a bioimage.io model package (bioimageio_model/ and .zip, for deepImageJ, ilastik, "
                        "napari) beside saved_model/; 0 = skip (scripts/export_bioimageio.py builds one later)")
    cliutil.add_verbose_flag(p)
    return p


def _run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    cliutil.setup_logging(args.verbose)
    config = keep_chosen_settings(resolve_config(args))
    resume = check_resume(config, require=args.resume)
    tfquiet.configure(args.verbose)  # before TensorFlow is imported (by train())
    if tfquiet.default_onednn(ONEDNN_TRAINING):
        logging.getLogger("train_unet").info("oneDNN CPU kernels on (TF_ENABLE_ONEDNN_OPTS=%s; set it to 0 for "
                                             "TensorFlow's own choice)", ONEDNN_TRAINING)
    try:  # Ctrl-C / SIGTERM: train() stops between steps, saves, raises KeyboardInterrupt (exit 130 in run_cli)
        outcome = train(config, resume=resume)
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    if args.bioimageio and outcome.saved_model:
        from segkit.training.export import export_bioimageio_package

        export_bioimageio_package(outcome.saved_model, config.output_dir, config.test_database)
    # A reader failure is loop.ReaderFailed, a full disk cliutil.FaultError: run_cli prints either (exit 1).
    print(f"done: {outcome.stopped}; best test loss {outcome.best_loss:.5f} at step {outcome.best_step}; "
          f"model: {outcome.saved_model}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cliutil.run_cli(_run, argv)


if __name__ == "__main__":
    code = main()
    if code == 130:
        # Interrupted inside the input pipeline, TensorFlow's threads can deadlock interpreter shutdown;
        # everything that matters is on disk already (readers closed, checkpoints fsynced).
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)
