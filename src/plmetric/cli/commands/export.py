"""``plmetric export``: a checkpoint's embedding model -> ONNX or TorchScript, checked against PyTorch,
its preprocessing in a JSON sidecar."""

from __future__ import annotations

import argparse
from typing import Any

from plmetric.core.files import require_regular_file
from plmetric.cli.common import add_command, check_output, image_side
from plmetric.core.names import shown


def add_parser(subparsers: Any) -> None:
    ex = add_command(
        subparsers, "export", "a checkpoint's embedding model -> ONNX or TorchScript, its preprocessing in the metadata"
    )
    ex.add_argument("checkpoint", help="a .safetensors model written by 'plmetric train' (it names its backbone)")
    ex.add_argument(
        "--format", required=True, choices=["onnx", "torchscript"], help="onnx (.onnx) or torchscript (.pt)"
    )
    ex.add_argument(
        "--out", required=True, help="output file: .onnx, or .pt/.torchscript; the metadata also goes to OUT.json"
    )
    ex.add_argument("--image-size", type=image_side, default=224, help="input side when the checkpoint records none")
    ex.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from plmetric.retrieval.export import FORMATS, export_model, is_export, read_sidecar, require_backend, sidecar_path

    inputs = (args.checkpoint,)
    out = check_output(args.out, "--out", FORMATS[args.format], inputs, is_export)
    check_output(sidecar_path(out), "--out", (".json",), inputs, lambda p: read_sidecar(p) is not None)
    require_regular_file(args.checkpoint, "checkpoint")
    require_backend(args.format)
    meta = export_model(args.checkpoint, out, args.format, image_size=args.image_size)
    print(
        f"wrote {shown(out)} ({args.format}: {meta['backbone']}, {meta['image_size']} px input, "
        f"{meta['output_dim']}-d L2-normalised output; max |diff| to PyTorch {meta['check']['max_abs_diff']:.1e}) "
        f"and {shown(sidecar_path(out))}"
    )
    return 0
