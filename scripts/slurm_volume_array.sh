#!/bin/bash
# Segment ONE large volume (or a folder of them) with a Slurm array job, block by block:
# task i of N predicts the i-th of N contiguous runs of blocks of each OME-Zarr output (inference_unet.py
# reads SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT), then a dependent job closes the outputs
# (--finalize 1: checks every block, writes the multiscale levels, instance labels, metrics).
# Run it on the login node:   bash scripts/slurm_volume_array.sh
# Resubmitting after a failure (or a requeued task) skips the finished blocks.
# README.md, "One volume across a cluster".
set -euo pipefail

SHARDS=${SHARDS:-8}                        # array tasks; of B blocks, task i owns b with b * SHARDS // B == i
MODEL=${MODEL:-/path/to/runs/my-experiment/saved_model}
IMAGES=${IMAGES:-/path/to/volumes}         # a folder holding the volume(s): .zarr, .h5 or TIFF stacks
OUTPUT=${OUTPUT:-/path/to/segmentation}
IMAGE_FORMAT=${IMAGE_FORMAT:-zarr}
# The same flags for every task and for the closing step (a shard refuses an output planned otherwise).
FLAGS=(--saved_model_filepath "$MODEL" --image_folder "$IMAGES" --output_folder "$OUTPUT"
       --image_format "$IMAGE_FORMAT" --output_format zarr --tile_size 64,256,256 --save_probabilities 0)
RESOURCES=(--nodes=1 --ntasks=1 --cpus-per-task=4 --mem=16G --requeue)

cd "${SLURM_SUBMIT_DIR:-$PWD}"
shards=$(sbatch --parsable --job-name=unet-blocks --array=0-$((SHARDS - 1)) "${RESOURCES[@]}" \
    --gres=gpu:1 --time=04:00:00 --output=%x-%A_%a.out \
    --wrap="source .venv/bin/activate && python inference_unet.py ${FLAGS[*]@Q}")
# afterok: only when every task succeeded; if one failed, resubmit this script (finished blocks are skipped).
# The last task to finish usually closes the outputs already; --finalize 1 then only checks and writes metrics.
closing=$(sbatch --parsable --job-name=unet-blocks-finalize --dependency=afterok:"${shards%%;*}" "${RESOURCES[@]}" \
    --time=01:00:00 --output=%x-%j.out \
    --wrap="source .venv/bin/activate && python inference_unet.py ${FLAGS[*]@Q} --finalize 1")
echo "shards: job ${shards} (array of ${SHARDS}); closing step: job ${closing} (after all succeed)"
