"""Inference stage, one module per step: settings, regions (reading), writers, predictor, folder.

``inference_unet.py`` is the command line over :func:`segkit.inference.folder.segment_folder`;
see README.md, "Stage 3".
"""
