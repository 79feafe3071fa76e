#!/usr/bin/env bash
# The whole pipeline on the example data in data/: build the databases, train the
# default model for a bounded number of steps, segment the held-out images and
# score them. `make demo` runs this after setting up .venv.
#   DEMO_OUTPUT=folder (default demo_output)   DEMO_STEPS=n (default 400)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${DEMO_OUTPUT:-demo_output}
STEPS=${DEMO_STEPS:-400}
# TensorFlow's start-up noise is silenced by the stages themselves (--verbose 1 shows it).

rm -rf "${OUT}"
mkdir -p "${OUT}/test_images"
while read -r name; do
    case "${name}" in ''|'#'*) continue ;; esac
    ln -s "$(pwd)/data/images/${name}" "${OUT}/test_images/${name}"
done < data/demo_test_files.txt

echo "== 1/3 build_lmdb.py: data/ -> ${OUT}/lmdb (128 px tiles; test images from data/demo_test_files.txt)"
"${PY}" build_lmdb.py --image_folder data/images --mask_folder data/masks \
    --output_folder "${OUT}/lmdb" --dataset_name demo --image_format tif \
    --use_tiling 1 --tile_size 128 --number_classes 3 --test_list data/demo_test_files.txt

echo "== 2/3 train_unet.py: default UNet, ${STEPS} steps -> ${OUT}/model"
"${PY}" train_unet.py --train_database "${OUT}/lmdb/train-demo.lmdb" \
    --test_database "${OUT}/lmdb/test-demo.lmdb" --output_dir "${OUT}/model" \
    --number_classes 3 --batch_size 8 --learning_rate 1e-3 \
    --test_every_n_steps 100 --max_steps "${STEPS}" --use_augmentation 1 --reader_count 1

echo "== 3/3 inference_unet.py: held-out images -> ${OUT}/masks (scored against data/masks)"
"${PY}" inference_unet.py --saved_model_filepath "${OUT}/model/saved_model" \
    --image_folder "${OUT}/test_images" --output_folder "${OUT}/masks" --image_format tif \
    --mask_folder data/masks --overlay 1

echo
echo "Demo finished. Outputs:"
echo "  databases      ${OUT}/lmdb/"
echo "  trained model  ${OUT}/model/saved_model/"
echo "  TensorBoard    $(cd "$(dirname "${PY}")" && pwd)/tensorboard --logdir $(cd "${OUT}/model/logs" && pwd)   (then open http://localhost:6006)"
echo "  masks          ${OUT}/masks/"
echo "  overlays       ${OUT}/masks/overlays/"
echo "  metrics        ${OUT}/masks/metrics.csv"
