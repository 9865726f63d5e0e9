"""plmetric export: ONNX and TorchScript files that embed real images as ``plmetric embed`` does, with
their preprocessing in the metadata; and the command's bad inputs."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from plmetric import __version__
from plmetric.core.checkpoint import file_sha256, save_model
from plmetric.cli import build_parser, main
from plmetric.retrieval.export import FORMATS, export_model, read_export_metadata, sidecar_path
from plmetric.data.backbones import build_transform, create_model
from plmetric.retrieval.index import load_embeddings

SIZE, DIM = 64, 16
needs_onnx = pytest.mark.skipif(
    importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime") is None,
    reason='onnx/onnxruntime not installed (pip install "plmetric[export]")',
)
# |ONNX Runtime - PyTorch| on unit-norm embeddings (entries in [-1, 1], so absolute = relative to the
# norm): both compute in float32 (u = 2^-24 ≈ 6e-8) but with their own kernels and summation orders
# (ONNX Runtime also folds BatchNorm into the convolutions). A sum of n terms then differs by about
# sqrt(n)·u relative, n ≤ 1280 here: ≈ 2e-6 per layer; over EfficientNet-Lite0's ~50 layers these add
# up to at most ≈ 1e-4 (ReLU6 and the final normalisation do not amplify them).
ONNX_TOLERANCE = 1e-4
# TorchScript replays PyTorch's own ATen kernels: identical for the same batch, but another batch size
# can pick another convolution blocking (batch 1 against embed's batch of 3): a few float32 ulps of
# the unit-norm entries (≈ 1e-6 seen); 1e-5 bounds that.
TORCHSCRIPT_TOLERANCE = 1e-5


def _one_line_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in out + err, (code, err)
    return lines[0]


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict[str, Path]:
    """A checkpoint: the ImageNet EfficientNet-Lite0 trunk and a 16-d embedding layer, 64 px input."""
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", embedding_dim=DIM, pretrained=True)
    ckpt = save_model(
        root / "model.safetensors", model, {"backbone": "efficientnet_lite0", "embedding_dim": DIM, "image_size": SIZE}
    )
    return {"root": root, "ckpt": ckpt}


@pytest.fixture(scope="module")
def embedded(ws, cub_root, tmp_path_factory) -> Path:
    """``plmetric embed`` of 3 real CUB photos (3 species) with the checkpoint."""
    photos = tmp_path_factory.mktemp("photos")
    for folder in sorted((cub_root / "CUB_200_2011" / "images").iterdir())[:3]:
        image = sorted(folder.iterdir())[0]
        shutil.copy(image, photos / f"{folder.name}_{image.name}")
    out = photos.parent / "embedded.safetensors"
    argv = ["embed", "--images", str(photos), "--checkpoint", str(ws["ckpt"]), "--out", str(out)]
    # PyTorch's own numbers: the TorchScript test compares ATen kernels with ATen kernels (1e-5)
    assert main([*argv, "--no-progress", "--num-workers", "0", "--runtime", "torch"]) == 0
    return out


def _export(ws, fmt: str, name: str) -> Path:
    out = ws["root"] / name
    if not out.exists():
        assert main(["export", "--format", fmt, str(ws["ckpt"]), "--out", str(out)]) == 0
    return out


def _images_and_embeddings(embedded: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The photos as plmetric's eval transform prepares them, and embed's embeddings in the same order."""
    embeddings, _, paths, _ = load_embeddings(embedded)
    transform = build_transform("efficientnet_lite0", image_size=SIZE, train=False)
    images = []
    for path in paths:
        with Image.open(path) as img:
            images.append(transform(img))
    assert len(images) == 3
    return torch.stack(images), embeddings


@needs_onnx
def test_onnx_embeds_real_images_as_embed_does_for_batches_of_1_and_3(ws, embedded):
    import onnxruntime

    images, expected = _images_and_embeddings(embedded)
    session = onnxruntime.InferenceSession(str(_export(ws, "onnx", "model.onnx")), providers=["CPUExecutionProvider"])
    batch = session.run(["embeddings"], {"images": images.numpy()})[0]
    singles = [session.run(["embeddings"], {"images": images[i : i + 1].numpy()})[0] for i in range(3)]
    for got in (torch.from_numpy(batch), torch.cat([torch.from_numpy(s) for s in singles])):
        assert got.shape == (3, DIM) and got.dtype == torch.float32
        diff = float((got - expected).abs().max())
        print(f"onnx max |diff| to embed: {diff:.2e}")
        assert diff <= ONNX_TOLERANCE
        torch.testing.assert_close(got.norm(dim=1), torch.ones(3), atol=1e-5, rtol=0)  # embed's rows are unit


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_torchscript_embeds_real_images_as_embed_does_for_batches_of_1_and_3(ws, embedded):
    images, expected = _images_and_embeddings(embedded)
    model = torch.jit.load(str(_export(ws, "torchscript", "model.pt")), map_location="cpu")
    with torch.no_grad():
        outputs = [model(images), torch.cat([model(images[i : i + 1]) for i in range(3)])]
    for got in outputs:
        assert got.shape == (3, DIM)
        diff = float((got - expected).abs().max())
        print(f"torchscript max |diff| to embed: {diff:.2e}")
        assert diff <= TORCHSCRIPT_TOLERANCE


def _check_description(meta: dict, ws, fmt: str) -> None:
    assert meta["format"] == "plmetric-export" and meta["model_format"] == fmt
    assert meta["backbone"] == "efficientnet_lite0" and meta["image_size"] == SIZE
    assert meta["embedding_dim"] == meta["output_dim"] == DIM
    assert meta["checkpoint"] == "model.safetensors" and meta["checkpoint_sha256"] == file_sha256(ws["ckpt"])
    assert meta["plmetric_version"] == __version__
    prep = meta["preprocessing"]
    assert prep["resize_shorter_side"] == round(SIZE * 256 / 224) and prep["center_crop"] == SIZE
    assert prep["mean"] == prep["std"] == [0.5, 0.5, 0.5] and "[-1, 1]" in prep["scaling"]
    assert meta["input"] == {"name": "images", "dtype": "float32", "layout": "NCHW", "shape": ["batch", 3, SIZE, SIZE]}
    assert meta["output"]["shape"] == ["batch", DIM] and meta["output"]["l2_normalized"] is True


def _check_sidecar(out: Path, inside: dict, ws) -> None:
    sidecar = json.loads(sidecar_path(out).read_text())
    assert sidecar.pop("file") == out.name and sidecar.pop("file_sha256") == file_sha256(out)
    assert sidecar.pop("check")["max_abs_diff"] <= ONNX_TOLERANCE
    assert sidecar == inside


@needs_onnx
def test_the_readme_snippet_reads_the_whole_description_from_the_onnx_file(ws, monkeypatch):
    """The README names the metadata key ``plmetric_export`` with three lines that read it: they run on
    an exported model and give the description that plmetric reads back."""
    import re

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```py(?:thon)?\n(.*?)```", readme, flags=re.S)
    (snippet,) = [block for block in blocks if "plmetric_export" in block]
    out = _export(ws, "onnx", "model.onnx")
    monkeypatch.chdir(out.parent)
    namespace: dict = {}
    exec(snippet, namespace)  # noqa: S102: the repository's own README
    assert namespace["meta"] == read_export_metadata(out) and namespace["meta"]["preprocessing"]["rule"]


def test_onnx_metadata_props_describe_the_preprocessing_and_the_batch_axis_is_dynamic(ws):
    import onnx

    out = _export(ws, "onnx", "model.onnx")
    proto = onnx.load(str(out))
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["backbone"] == "efficientnet_lite0" and json.loads(props["image_size"]) == SIZE
    assert json.loads(props["preprocessing"])["center_crop"] == SIZE
    inside = read_export_metadata(out)
    _check_description(inside, ws, "onnx")
    assert inside["onnx_opset"] >= 17
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    (inp,), (outp,) = proto.graph.input, proto.graph.output
    assert inp.name == "images" and [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == [
        "batch",
        3,
        SIZE,
        SIZE,
    ]
    assert outp.type.tensor_type.shape.dim[0].dim_param == "batch"
    _check_sidecar(out, inside, ws)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_torchscript_extra_file_describes_the_preprocessing(ws):
    out = _export(ws, "torchscript", "model.pt")
    extra = {"plmetric.json": ""}
    torch.jit.load(str(out), _extra_files=extra)
    inside = json.loads(extra["plmetric.json"])
    assert read_export_metadata(out) == inside
    _check_description(inside, ws, "torchscript")
    _check_sidecar(out, inside, ws)


def test_an_export_replaces_its_own_earlier_file_but_no_other(ws, capsys):
    out = _export(ws, "torchscript", "again.torchscript")
    assert main(["export", "--format", "torchscript", str(ws["ckpt"]), "--out", str(out)]) == 0
    foreign = ws["root"] / "foreign.pt"
    foreign.write_bytes(b"someone else's model")
    line = _one_line_error(capsys, ["export", "--format", "torchscript", str(ws["ckpt"]), "--out", str(foreign)])
    assert "--out" in line and "not a file this command writes" in line
    assert foreign.read_bytes() == b"someone else's model" and not sidecar_path(foreign).exists()


def test_a_model_that_disagrees_with_pytorch_is_not_written(ws, monkeypatch):
    import plmetric.retrieval.export

    real = plmetric.retrieval.export.run_exported
    monkeypatch.setattr(plmetric.retrieval.export, "run_exported", lambda *a: real(*a) + 1e-3)
    out = ws["root"] / "wrong.pt"
    with pytest.raises(RuntimeError, match="differs from PyTorch"):
        export_model(ws["ckpt"], out, "torchscript")
    assert not out.exists() and not sidecar_path(out).exists()


def test_bad_inputs_are_one_line_with_exit_status_2_and_write_nothing(ws, capsys):
    root, ckpt = ws["root"], str(ws["ckpt"])
    as_pt = root / "checkpoint.pt"  # a checkpoint is read whatever its name
    as_pt.write_bytes(ws["ckpt"].read_bytes())
    cases = [
        (["--format", "onnx", str(root / "none.safetensors"), "--out", str(root / "x.onnx")], ["none.safetensors"]),
        (["--format", "onnx", ckpt, "--out", str(root / "x.pt")], ["--out", "x.pt", ".onnx"]),
        (["--format", "torchscript", ckpt, "--out", str(root / "x.onnx")], ["--out", ".pt or .torchscript"]),
        (["--format", "onnx", ckpt, "--out", ckpt], ["--out", "model.safetensors", ".onnx"]),
        (["--format", "torchscript", str(as_pt), "--out", str(as_pt)], ["checkpoint.pt", "also an input"]),
        (["--format", "tflite", ckpt, "--out", str(root / "x.onnx")], ["--format", "invalid choice"]),
        (["--format", "torchscript", str(root), "--out", str(root / "x.pt")], [root.name, "is a folder, not a regular file"]),
    ]
    before = sorted(p.name for p in root.iterdir())
    for argv, expected in cases:
        line = _one_line_error(capsys, ["export", *argv])
        assert all(s in line for s in expected), (argv, line)
    assert sorted(p.name for p in root.iterdir()) == before


def test_missing_onnx_says_how_to_install_it(ws, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    line = _one_line_error(capsys, ["export", "--format", "onnx", str(ws["ckpt"]), "--out", str(ws["root"] / "y.onnx")])
    assert 'pip install "plmetric[export]"' in line and "onnxruntime" in line
    assert not (ws["root"] / "y.onnx").exists()


def test_help_shows_every_option_with_its_default_and_the_formats_match():
    parser = build_parser()
    export = parser._subparsers._group_actions[0].choices["export"]
    actions = [a for a in export._actions if a.dest != "help"]
    assert all(a.help for a in actions)
    assert tuple(next(a for a in actions if a.dest == "format").choices) == tuple(FORMATS)
    assert "(default: 224)" in " ".join(export.format_help().split())


# ----------------------------------------------------------------------------------------------
# The preprocessing rule in the metadata, followed literally with Pillow and NumPy only.
# ----------------------------------------------------------------------------------------------

# (width, height): both orientations of an odd aspect ratio, a near-square, an extreme strip.
ODD_SIZES = [(69, 61), (61, 69), (225, 224), (1000, 3)]


def _preprocess_from_metadata(path: Path, meta: dict, longer=int) -> np.ndarray:
    """One image as the metadata's rule says, with Pillow and NumPy alone (no torchvision, no plmetric);
    ``longer`` rounds the longer side (the rule: ``int``, truncation)."""
    prep = meta["preprocessing"]
    resize, crop = prep["resize"], prep["crop"]
    assert resize["side"] == "shorter" and resize["antialias"] is True and prep["channel_order"] == "RGB"
    assert "truncated" in resize["longer_side"] and "halves to even" in crop["rounding"]
    filters = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
    with Image.open(path) as img:
        img = img.convert("RGB")
        w, h = img.size
        r = resize["shorter_side"]
        new_w, new_h = (r, longer(r * h / w)) if w <= h else (longer(r * w / h), r)
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), filters[resize["interpolation"]])
        s = crop["size"]
        top, left = int(round((new_h - s) / 2.0)), int(round((new_w - s) / 2.0))
        pixels = np.asarray(img, dtype=np.uint8)[top : top + s, left : left + s]
    x = pixels.astype(np.float32) / np.float32(255)
    mean, std = np.asarray(prep["mean"], np.float32), np.asarray(prep["std"], np.float32)
    return ((x - mean) / std).transpose(2, 0, 1)  # CHW


@pytest.fixture(scope="module")
def bicubic_ckpt(tmp_path_factory) -> Path:
    """A timm model with a bicubic, ImageNet-statistics preprocessing (random weights), 64 px input."""
    root = tmp_path_factory.mktemp("export_timm")
    torch.manual_seed(0)
    model = create_model("timm:test_efficientnet", embedding_dim=DIM, pretrained=False)
    meta = {"backbone": "timm:test_efficientnet", "embedding_dim": DIM, "image_size": SIZE}
    return save_model(root / "timm.safetensors", model, meta)


@needs_onnx
@pytest.mark.parametrize("which", ["lite0_bilinear", "timm_bicubic"])
def test_metadata_rule_with_pillow_and_numpy_matches_embed_on_odd_sizes(which, ws, bicubic_ckpt, tmp_path):
    """Odd-sized images preprocessed from the ONNX metadata alone, run by ONNX Runtime, give embed's
    embeddings.

    Bound: the rule reproduces torchvision's arithmetic step by step (the same Pillow resize call on
    the same 8-bit image, the same crop, then ``/255``, ``-mean``, ``/std`` each correctly rounded in
    float32), so the input equals the eval transform's up to the rounding of those two float32 steps
    done in another order: ``|Δx| <= 2 eps32 max|x|`` (0 in practice). On that input ONNX Runtime and
    PyTorch differ by at most ONNX_TOLERANCE (derived at the top of this file), which the input's
    few-ulp difference does not change.
    """
    import onnxruntime

    ckpt = ws["ckpt"] if which == "lite0_bilinear" else bicubic_ckpt
    onnx_path = tmp_path / "model.onnx"
    assert main(["export", "--format", "onnx", str(ckpt), "--out", str(onnx_path)]) == 0
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    meta = json.loads(session.get_modelmeta().custom_metadata_map["plmetric_export"])
    assert meta["preprocessing"]["interpolation"] == ("bilinear" if which == "lite0_bilinear" else "bicubic")

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for w, h in ODD_SIZES:
        smooth = rng.integers(0, 256, size=(max(h // 4, 1), max(w // 4, 1), 3), dtype=np.uint8)
        noisy = np.asarray(Image.fromarray(smooth).resize((w, h), Image.Resampling.BILINEAR), dtype=np.int16)
        pixels = np.clip(noisy + rng.integers(-20, 21, size=(h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(photos / f"{w}x{h}.png")  # lossless: every reader sees the same pixels
    out = tmp_path / "embedded.safetensors"
    argv = ["embed", "--images", str(photos), "--checkpoint", str(ckpt), "--out", str(out), "--no-progress"]
    assert main([*argv, "--num-workers", "0"]) == 0
    expected, _, paths, _ = load_embeddings(out)
    assert len(paths) == len(ODD_SIZES)

    inputs = np.stack([_preprocess_from_metadata(Path(p), meta) for p in paths])
    assert inputs.shape == (len(ODD_SIZES), *meta["input"]["shape"][1:]) and inputs.dtype == np.float32
    transform = build_transform(meta["backbone"], image_size=meta["image_size"], train=False)
    reference = []
    for p in paths:
        with Image.open(p) as img:
            reference.append(transform(img).numpy())
    bound = 2 * np.finfo(np.float32).eps * np.abs(inputs).max()
    assert np.abs(inputs - np.stack(reference)).max() <= bound

    got = session.run(["embeddings"], {"images": inputs})[0]
    diff = np.abs(got - expected.numpy()).max()
    print(f"{which}: max |ONNX(rule) - embed| = {diff:.2e}")
    assert diff <= ONNX_TOLERANCE

    # The rule is sharp: rounding the longer side instead of truncating it (the old ambiguity) resizes
    # the 69 x 61 image to 83 px instead of 82.6 -> 82 (at 73 px), and changes its input by far more.
    i = [Path(p).name for p in paths].index("69x61.png")
    alt = _preprocess_from_metadata(Path(paths[i]), meta, longer=round)
    assert np.abs(alt - reference[i]).max() > 1000 * bound


def test_the_metadata_says_inputs_are_expected_upright(tmp_path):
    """Image decoding (issue 21, item 1): every plmetric command applies the EXIF orientation, so an
    exported model's user must too; the metadata says so."""
    from plmetric.retrieval.export import export_metadata
    from plmetric.retrieval.index import load_embedding_model

    torch.manual_seed(0)
    ckpt = save_model(
        tmp_path / "m.safetensors",
        create_model("efficientnet_lite0", embedding_dim=DIM, pretrained=False),
        {"backbone": "efficientnet_lite0", "embedding_dim": DIM, "image_size": SIZE},
    )
    _, description = load_embedding_model(ckpt, "efficientnet_lite0", DIM)
    for fmt in FORMATS:
        orientation = export_metadata(description, fmt)["input_orientation"]
        assert orientation.startswith("upright") and "exif_transpose" in orientation


# ----------------------------------------------------------------------------------------------
# The eval rule travels with the checkpoint: a ``whole`` checkpoint exports the whole-image rule.
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def whole_ckpt(tmp_path_factory) -> Path:
    """The ``ws`` model (pretrained Lite0, a 16-d layer, 64 px) saved as trained with ``data.eval_resize=whole``."""
    root = tmp_path_factory.mktemp("export_whole")
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", embedding_dim=DIM, pretrained=True)
    meta = {"backbone": "efficientnet_lite0", "embedding_dim": DIM, "image_size": SIZE, "eval_resize": "whole"}
    return save_model(root / "whole.safetensors", model, meta)


def _whole_input_from_metadata(path: Path, meta: dict) -> np.ndarray:
    """One image as a whole-rule metadata says, with Pillow and NumPy alone: the whole image resized to
    the recorded width x height, nothing cropped, then normalised."""
    prep = meta["preprocessing"]
    resize = prep["resize"]
    assert resize["side"] == "whole" and resize["antialias"] is True and prep["crop"] is None
    filters = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
    with Image.open(path) as img:
        img = img.convert("RGB")
        if img.size != (resize["width"], resize["height"]):
            img = img.resize((resize["width"], resize["height"]), filters[resize["interpolation"]])
        pixels = np.asarray(img, dtype=np.uint8)
    x = pixels.astype(np.float32) / np.float32(255)
    mean, std = np.asarray(prep["mean"], np.float32), np.asarray(prep["std"], np.float32)
    return ((x - mean) / std).transpose(2, 0, 1)


@needs_onnx
def test_a_whole_checkpoint_exports_the_whole_rule_and_onnx_on_it_gives_embeds_embeddings(whole_ckpt, tmp_path):
    """The sidecar states the whole-image rule (data and words), the export's check ran on inputs made by
    it, and odd-sized images preprocessed from the metadata alone and run by ONNX Runtime give ``embed``'s
    embeddings (``embed`` follows the checkpoint's rule too) within ONNX_TOLERANCE; the centre crop's
    inputs give other embeddings (the comparison can tell the rules apart)."""
    import onnxruntime

    out = tmp_path / "whole.onnx"
    assert main(["export", "--format", "onnx", str(whole_ckpt), "--out", str(out)]) == 0
    sidecar = json.loads(sidecar_path(out).read_text())
    prep = sidecar["preprocessing"]
    assert prep["eval_resize"] == "whole" and prep["resize_to"] == [SIZE, SIZE] and prep["crop"] is None
    assert (prep["resize"]["width"], prep["resize"]["height"]) == (SIZE, SIZE)
    assert "center_crop" not in prep and "resize_shorter_side" not in prep
    assert f"resize the whole image to {SIZE}x{SIZE} (the aspect ratio not kept)" in prep["rule"]
    assert "whole rule" in sidecar["check"]["inputs"] and sidecar["check"]["max_abs_diff"] <= ONNX_TOLERANCE
    meta = read_export_metadata(out)
    assert meta["preprocessing"] == prep

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for w, h in ODD_SIZES:
        smooth = rng.integers(0, 256, size=(max(h // 4, 1), max(w // 4, 1), 3), dtype=np.uint8)
        Image.fromarray(smooth).resize((w, h), Image.Resampling.BILINEAR).save(photos / f"{w}x{h}.png")
    embedded = tmp_path / "embedded.safetensors"
    argv = ["embed", "--images", str(photos), "--checkpoint", str(whole_ckpt), "--out", str(embedded)]
    assert main([*argv, "--no-progress", "--num-workers", "0"]) == 0
    expected, _, paths, _ = load_embeddings(embedded)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    inputs = np.stack([_whole_input_from_metadata(Path(p), meta) for p in paths])
    reference = build_transform("efficientnet_lite0", image_size=SIZE, eval_resize="whole")
    for p, x in zip(paths, inputs, strict=True):
        with Image.open(p) as img:
            assert np.array_equal(x, reference(img).numpy())  # the stated rule is the transform, bit for bit
    diff = np.abs(session.run(["embeddings"], {"images": inputs})[0] - expected.numpy()).max()
    assert diff <= ONNX_TOLERANCE
    crop = build_transform("efficientnet_lite0", image_size=SIZE)
    cropped = []
    for p in paths:
        with Image.open(p) as img:
            cropped.append(crop(img).numpy())
    crop_diff = np.abs(session.run(["embeddings"], {"images": np.stack(cropped)})[0] - expected.numpy()).max()
    assert crop_diff > 100 * ONNX_TOLERANCE, crop_diff


def test_an_old_checkpoint_exports_the_centre_crop(ws):
    """A checkpoint without ``eval_resize`` (made before the choice) states the centre crop, as before."""
    meta = json.loads(sidecar_path(_export(ws, "torchscript", "model.pt")).read_text())
    prep = meta["preprocessing"]
    assert prep["eval_resize"] == "center_crop" and prep["resize"]["side"] == "shorter"
    assert prep["crop"]["size"] == prep["center_crop"] == SIZE and "resize_to" not in prep
    assert "center_crop rule" in meta["check"]["inputs"]


def test_the_export_check_preprocesses_with_the_checkpoints_rule(whole_ckpt):
    """The probe batch is the checkpoint's own transform of seeded noise images; a description whose
    recorded preprocessing is not that transform is refused before anything is exported."""
    from plmetric.data.backbones import description_transform
    from plmetric.retrieval.export import probe_batch
    from plmetric.retrieval.index import load_embedding_model, preprocessing

    _, description = load_embedding_model(whole_ckpt, "", 0)
    assert description["eval_resize"] == "whole"
    probe = probe_batch(description)
    assert probe.shape == (3, 3, SIZE, SIZE) and torch.equal(probe, probe_batch(description))
    rng = np.random.default_rng(0)
    first = Image.fromarray(rng.integers(0, 256, size=(SIZE + 7, 2 * SIZE + 1, 3), dtype=np.uint8))
    assert torch.equal(probe[0], description_transform(description)(first))
    forged = {**description, "preprocessing": preprocessing("efficientnet_lite0", SIZE)}  # the crop's record
    with pytest.raises(RuntimeError, match="recorded preprocessing is not the eval transform"):
        probe_batch(forged)
