"""Which accelerators a run was promised and which TensorFlow sees (README: "GPUs").

A Slurm job with a GPU allocation, or a shell with CUDA_VISIBLE_DEVICES naming devices, expects a GPU;
when TensorFlow then sees none (CPU-only wheels, a missing CUDA driver), training would silently run on
the CPU for days. `gpu_expectation` says why a GPU was expected; `missing_gpu_warning` turns that and the
visible GPU count into the one loud line training logs. No TensorFlow here.
"""
from __future__ import annotations

import os
from typing import Mapping

SLURM_GPU_VARIABLES = ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_GPUS", "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE",
                       "SLURM_GPUS_PER_TASK")
GPU_INSTALL_HINT = ("install the CUDA build with 'make setup GPU=1' (pip install 'tensorflow[and-cuda]'), check the driver "
                    "with nvidia-smi, and see README 'GPUs'")


def _names_devices(value: str | None) -> bool:
    """True when a CUDA_VISIBLE_DEVICES-style value names at least one device ('', '-1', 'none' name none)."""
    if value is None:
        return False
    items = [item.strip() for item in value.split(",") if item.strip()]
    return bool(items) and not any(item in ("-1", "none", "NoDevFiles") for item in items)


def gpu_expectation(environ: Mapping[str, str] | None = None) -> str | None:
    """Why this process should have a GPU ('Slurm allocated GPUs (SLURM_JOB_GPUS=0,1)'), or None."""
    environ = os.environ if environ is None else environ
    for key in SLURM_GPU_VARIABLES:
        value = environ.get(key, "").strip()
        if value and value not in ("0", "(null)", "N/A") and _names_devices(value):
            return f"Slurm allocated GPUs ({key}={value})"
    gres = environ.get("SLURM_JOB_GRES", "") or environ.get("SBATCH_GRES", "")
    if "gpu" in gres:
        return f"Slurm allocated GPUs (gres {gres})"
    if _names_devices(environ.get("CUDA_VISIBLE_DEVICES")):
        return f"CUDA_VISIBLE_DEVICES={environ['CUDA_VISIBLE_DEVICES']} is set"
    return None


def missing_gpu_warning(visible_gpus: int, environ: Mapping[str, str] | None = None) -> str | None:
    """The warning to log when a GPU was expected but TensorFlow sees none; None when all is well."""
    if visible_gpus > 0:
        return None
    reason = gpu_expectation(environ)
    if reason is None:
        return None
    return (f"NO GPU VISIBLE TO TENSORFLOW although {reason}: this run trains on the CPU, orders of magnitude "
            f"slower; {GPU_INSTALL_HINT}")
