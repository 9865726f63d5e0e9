"""Every bad input to every command: exit status 2, one line naming the file or option and what was
expected, no traceback, and no existing file changed (nothing new written either).

One shared workspace holds the good inputs (photos, a checkpoint, an index, a finished run) and the
bad ones; each case runs ``plmetric.cli.main`` in-process and compares the workspace before/after.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from plmetric.manifold.ann import faiss_available
from plmetric.core.checkpoint import save_model
from plmetric.cli import main
from plmetric.config.schema import Config, save_config
from plmetric.data.backbones import create_model
from plmetric.retrieval.index import (
    index_identity,
    load_embeddings,
    read_index_metadata,
    save_embeddings,
    write_index,
)
from plmetric.retrieval.tables import PARQUET_KEY, TableWriter, header_line

HAS_PYARROW = importlib.util.find_spec("pyarrow") is not None


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG header that declares a huge image (a decompression bomb) with almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    )


class Evil:
    """Pickles to a call of os.system: a checkpoint that would run code if loaded unsafely."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# checkpoint metadata whose sizes are absurd, of the wrong type or not those of its tensors (16-d layer)
RECORDED_SIZES: dict[str, dict] = {
    "500k": {"embedding_dim": 500_000},
    "1e8": {"embedding_dim": 100_000_000},
    "output_huge": {"output_dim": 10**12},
    "negative": {"embedding_dim": -16},
    "bool": {"embedding_dim": True},
    "text": {"embedding_dim": "16"},
    "mismatch": {"embedding_dim": 32},
    "output_mismatch": {"output_dim": 1280},
}
# what the one error line says of each (besides the file's name)
RECORDED_SIZE_ERRORS: dict[str, list[str]] = {
    "500k": ["'embedding_dim'", "<= 16384", "500000"],
    "1e8": ["'embedding_dim'", "<= 16384", "100000000"],
    "output_huge": ["'output_dim'", "<= 16384", "1000000000000"],
    "negative": ["'embedding_dim'", ">= 0", "-16"],
    "bool": ["a valid 'embedding_dim'"],
    "text": ["a valid 'embedding_dim'"],
    "mismatch": ["does not match its own metadata", "[32, 1280]", "[16, 1280]"],
    "output_mismatch": ["'output_dim' is 1280", "outputs 16"],
}


def _index_like(source: Path, path: Path, checkpoint: Path | None = None, **recorded) -> Path:
    """A copy of the index ``source`` whose metadata names ``checkpoint`` (with its SHA-256) or records
    other sizes: ``count``, ``dim`` or the model's ``output_dim``."""
    from safetensors import safe_open

    from plmetric.core.checkpoint import file_sha256

    with safe_open(str(source), framework="pt") as handle:
        meta = json.loads(handle.metadata()["plmetric_index"])
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    if checkpoint is not None:
        meta["model"].update(checkpoint=str(checkpoint), checkpoint_sha256=file_sha256(checkpoint))
    if "output_dim" in recorded:
        meta["model"]["output_dim"] = recorded.pop("output_dim")
    meta.update(recorded)
    save_file(tensors, str(path), metadata={"plmetric_index": json.dumps(meta)})
    return path


def _checkpoint(path: Path, seed: int = 0, dim: int = 16) -> Path:
    torch.manual_seed(seed)
    model = create_model("efficientnet_lite0", embedding_dim=dim, pretrained=False)
    return save_model(path, model, {"backbone": "efficientnet_lite0", "embedding_dim": dim, "image_size": 32})


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad_input")
    rng = np.random.default_rng(0)
    photos = root / "photos"
    photos.mkdir()
    for i in range(5):
        pixels = np.clip(rng.integers(0, 256, 3) + rng.normal(0, 20, (40, 40, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(photos / f"p{i}.png")
    (root / "empty").mkdir()
    ckpt = _checkpoint(root / "model.safetensors")
    changing = _checkpoint(root / "changing.safetensors", seed=1)
    small = ["--image-size", "32", "--no-progress", "--num-workers", "0"]
    assert (
        main(["index", str(photos), "--checkpoint", str(ckpt), "--out", str(root / "index.safetensors"), *small]) == 0
    )
    assert (
        main(["index", str(photos), "--checkpoint", str(changing), "--out", str(root / "stale.safetensors"), *small])
        == 0
    )
    _checkpoint(changing, seed=2)  # rewritten after indexing, as a run's model.safetensors is every epoch
    _damaged_shards(root, root / "index.safetensors")
    # an index whose faiss file is not the one it was written with (or, without faiss, one it cannot read)
    tampered = root / "tampered.safetensors"
    if faiss_available():
        assert main(["index", str(photos), "--out", str(tampered), "--faiss", "flat", *small]) == 0
        (root / read_index_metadata(tampered)["ann"]["file"]).write_bytes(b"another faiss file")
    else:
        emb, labels, paths, model = load_embeddings(root / "index.safetensors")
        ann = {"kind": "flat", "params": {}, "file": "tampered.000000000000.faiss", "sha256": "0" * 64}
        save_embeddings(tampered, emb, labels, paths, model, ann=ann)

    # model files that are not what they claim
    (root / "garbage.safetensors").write_bytes(b"\xff\xfe\x00 definitely not safetensors" * 4)
    tensors = {"w": torch.zeros(2)}
    save_file(tensors, str(root / "badmeta.safetensors"), metadata={"plmetric": "{not json"})
    wrong = create_model("efficientnet_lite0", embedding_dim=32, pretrained=False)
    meta = {"plmetric": json.dumps({"backbone": "efficientnet_lite0", "embedding_dim": 16})}
    save_file(
        {k: v.contiguous() for k, v in wrong.state_dict().items()}, str(root / "wrongshape.safetensors"), metadata=meta
    )
    (root / "notweights.pth").write_bytes(b"PK\x03\x04 not a zip")

    # images that are not images
    (root / "text.jpg").write_text("not an image\n")
    (root / "foreign.csv").write_text("name,value\na,1\n")  # a user's table: never replaced by a pile tool
    # serve's tables (issue 30): a 200,000-character field; a table of the same photos recorded from another
    # index (the stale one: another model); millions of dictionary-encoded rows in a few hundred KB
    (root / "longfield.csv").write_text(f'{header_line("groups")}\n1,2,"{"x" * 200_000}",1,0.9\n')
    stale_embeddings, _, stale_paths, _ = load_embeddings(root / "stale.safetensors")
    count = len(stale_paths)
    with TableWriter(root / "otherindex.csv", "groups", index_id=index_identity(stale_embeddings, stale_paths)) as table:
        table.write([[1] * count, [count] * count, stale_paths, [1] * count, [0.9] * count])
        table.commit()
    if HAS_PYARROW:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = 2_000_000
        ones = pa.array(np.ones(rows, np.int64))
        paths = pa.DictionaryArray.from_arrays(pa.array(np.zeros(rows, np.int32)), pa.array([str(photos / "p0.png")]))
        columns = {"group": ones, "size": ones, "path": paths, "best_score": pa.array(np.ones(rows, np.float32))}
        pq.write_table(pa.table(columns).replace_schema_metadata({PARQUET_KEY: b"duplicates"}), root / "rows.parquet")
    (root / "bomb.png").write_bytes(_png_claiming(40000, 40000))
    # image decoding and the folder walk: over plmetric's pixel limit (121 MP), a FIFO named .jpg
    (root / "huge.png").write_bytes(_png_claiming(11000, 11000))
    if hasattr(os, "mkfifo"):
        os.mkfifo(root / "fifo.jpg")
    # data and config files that are not what they claim
    cub = root / "cub_latin1" / "CUB_200_2011"
    (cub / "images").mkdir(parents=True)
    (cub / "images.txt").write_bytes("1 001.Caf\xe9/a.jpg\n".encode("latin-1"))
    (cub / "image_class_labels.txt").write_text("1 1\n")
    (root / "notyaml.yaml").write_text("train: [epochs: 3\n")
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "latin1.yaml").write_bytes("data:\n  root: caf\xe9\n".encode("latin-1"))
    (root / "a_file").write_text("I am a file, not a folder\n")
    np.save(root / "features.npy", rng.normal(size=(10, 4)).astype(np.float32))
    np.save(root / "labels.npy", np.arange(10) % 2)

    # configs, checkpoint metadata and small piles (issue 21: config and metadata)
    laughs = "".join(
        f"{n}: &{n} [{', '.join([f'*{p}'] * 9) if p else ', '.join(['lol'] * 9)}]\n"
        for p, n in zip([None, *"abcdefgh"], "abcdefghi")
    )
    (root / "laughs.yaml").write_text(laughs)  # "billion laughs": 9**9 strings if the aliases were expanded
    (root / "intkey.yaml").write_text("train:\n  1: x\n")
    (root / "nullkey.yaml").write_text("null: x\n")
    lite = create_model("efficientnet_lite0", embedding_dim=16, pretrained=False)
    good_state = {k: v.contiguous() for k, v in lite.state_dict().items()}
    for name, size in (("true", True), ("one", 1), ("huge", 3000), ("list", [32, 32]), ("text", "32")):
        meta = {"backbone": "efficientnet_lite0", "embedding_dim": 16, "image_size": size}
        save_file(good_state, str(root / f"size_{name}.safetensors"), metadata={"plmetric": json.dumps(meta)})
    # recorded sizes (issue 30): every size a checkpoint or an index records is bounded and checked against
    # its tensors' shapes before a model is built (embedding_dim=500000 took 186 s and 8.8 GB to refuse)
    good_index = root / "index.safetensors"
    for name, fields in RECORDED_SIZES.items():
        meta = {"backbone": "efficientnet_lite0", "embedding_dim": 16, "image_size": 32, **fields}
        bad = root / f"dim_{name}.safetensors"
        save_file(good_state, str(bad), metadata={"plmetric": json.dumps(meta)})
        # an index whose own sizes are right, naming that checkpoint (with its SHA-256: search reaches it)
        _index_like(good_index, root / f"names_dim_{name}.safetensors", checkpoint=bad)
    _index_like(good_index, root / "index_count.safetensors", count=500000)
    _index_like(good_index, root / "index_dim.safetensors", dim=500000)
    _index_like(good_index, root / "index_output_dim.safetensors", output_dim=32)
    # nesting and absurd integers (issue 30): a config value 20,000 levels deep
    (root / "deep.yaml").write_text("data:\n  root: " + "[" * 20_000 + "]" * 20_000 + "\n")
    for name, count, unreadable in (("pile1", 1, 0), ("pile3", 3, 0), ("pile5bad3", 5, 3)):
        (root / name).mkdir()
        for i in range(count):
            if i < unreadable:
                (root / name / f"broken{i}.jpg").write_text("not an image\n")
            else:
                Image.open(photos / f"p{i}.png").save(root / name / f"p{i}.png")

    # run folders: a finished run, and runs whose state.pt is broken in every way
    cfg = Config()
    cfg.data.dataset, cfg.data.root = "images", str(photos)
    cfg.train.batch_size, cfg.plm.num_proxies = 5, 5  # the 5 photos make a batch: errors come from the state
    finished = root / "finished"
    save_config(cfg, finished / "config.yaml")
    (finished / "log.jsonl").write_text("".join(json.dumps({"epoch": e, "loss": 0.1}) + "\n" for e in (1, 2, 3)))
    (finished / "model.safetensors").write_bytes(ckpt.read_bytes())
    states: dict[str, bytes] = {}
    states["corrupt"] = bytes(rng.integers(0, 256, 4096, dtype=np.uint8))
    import io

    buffer = io.BytesIO()
    torch.save({"epoch": 0, "student": {"w": torch.zeros(1000)}}, buffer)
    states["truncated"] = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    buffer = io.BytesIO()
    torch.save({"epoch": 0, "payload": Evil(root / "PWNED")}, buffer)
    states["crafted"] = buffer.getvalue()
    buffer = io.BytesIO()
    fake = dict.fromkeys(("teacher", "objective", "optimizer", "scheduler", "bank", "rng"), {})
    fake.update(epoch=0, config_json=json.dumps(cfg.to_dict()), history_json="[]", start_metrics_json="null")
    fake.update(best_json=json.dumps({"epoch": None, "metrics": None}), student={"embedding.weight": torch.zeros(3, 3)})
    torch.save(fake, buffer)
    states["shapes"] = buffer.getvalue()
    for name, data in states.items():
        save_config(cfg, root / f"run_{name}" / "config.yaml")
        (root / f"run_{name}" / "state.pt").write_bytes(data)
    return {
        "root": root,
        "photos": photos,
        "photo": photos / "p0.png",
        "ckpt": ckpt,
        "index": root / "index.safetensors",
    }


SHARD_FAULTS = {
    "missing": "is missing",
    "truncated": "bytes, the index recorded",
    "link": "is a link",
    "foreign": "is not the shard the index recorded",
}


def _damaged_shards(root: Path, good: Path) -> None:
    """Sharded copies of ``good`` (issue 31), each in its own folder ``shard_<fault>``, whose second shard
    is missing, truncated, a link to an intact copy, or the same rows' shard of another index."""
    emb, labels, paths, model = load_embeddings(good)
    built = {}
    for name in ("other", *SHARD_FAULTS):
        (root / f"shard_{name}").mkdir()
        index = root / f"shard_{name}" / "index.safetensors"
        write_index(index, emb, labels, paths, model, dtype="float16", rows_per_shard=2)
        built[name] = sorted(index.parent.glob("*.shard.safetensors"), key=lambda p: p.stat().st_mtime_ns)
    for fault in SHARD_FAULTS:
        second = next(s for s in built[fault] if open_index_meta(s)["first"] == 2)
        data = second.read_bytes()
        if fault == "missing":
            second.unlink()
        elif fault == "truncated":
            second.write_bytes(data[:-64])
        elif fault == "link":
            second.unlink()
            (root / "shard_link" / "copy.bin").write_bytes(data)
            second.symlink_to(root / "shard_link" / "copy.bin")
        else:
            second.write_bytes(next(s for s in built["other"] if open_index_meta(s)["first"] == 2).read_bytes())


def open_index_meta(shard: Path) -> dict:
    """A shard's own metadata (its header)."""
    from safetensors import safe_open

    with safe_open(str(shard), framework="np") as handle:
        return json.loads(handle.metadata()["plmetric_index_shard"])


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# (case id, argv with {placeholders} from the workspace, substrings the one error line must contain)
CASES: list[tuple[str, list[str], list[str]]] = [
    # eval
    ("eval-missing-root", ["eval", "--dataset", "cub200", "--data-root", "{root}/nowhere"], ["nowhere", "not found"]),
    (
        "eval-latin1-index-file",
        ["eval", "--dataset", "cub200", "--data-root", "{root}/cub_latin1"],
        ["images.txt", "not UTF-8"],
    ),
    (
        "eval-missing-checkpoint",
        ["eval", "--dataset", "digits", "--checkpoint", "{root}/none.safetensors"],
        ["none.safetensors", "not found"],
    ),
    (
        "eval-garbage-checkpoint",
        ["eval", "--dataset", "digits", "--checkpoint", "{root}/garbage.safetensors"],
        ["garbage.safetensors", "not a readable"],
    ),
    (
        "eval-metadata-not-json",
        ["eval", "--dataset", "digits", "--checkpoint", "{root}/badmeta.safetensors"],
        ["badmeta.safetensors", "not valid JSON"],
    ),
    (
        "eval-wrong-shapes",
        ["eval", "--dataset", "digits", "--checkpoint", "{root}/wrongshape.safetensors"],
        ["wrongshape.safetensors", "does not match"],
    ),
    ("eval-bad-ks", ["eval", "--dataset", "digits", "--ks", "0,1"], ["--ks", "positive integers"]),
    (
        "eval-bad-weights",
        ["eval", "--dataset", "digits", "--weights", "{root}/notweights.pth"],
        ["notweights.pth", "weights"],
    ),
    ("eval-json-suffix", ["eval", "--dataset", "digits", "--json", "{root}/metrics.txt"], ["--json", ".json"]),
    ("eval-unknown-dataset", ["eval", "--dataset", "mnist"], ["--dataset", "invalid choice"]),
    ("eval-image-size-0", ["eval", "--dataset", "digits", "--image-size", "0"], ["--image-size", "from 8 to 1024"]),
    # a command-line image side is bounded as a config's or a checkpoint's (a huge side only exhausts memory)
    ("index-image-size-huge", ["index", "{photos}", "--image-size", "100000", "--out", "{root}/i.safetensors"], ["--image-size", "from 8 to 1024", "100000"]),
    ("embed-image-size-huge", ["embed", "--images", "{photos}", "--image-size", "4096", "--out", "{root}/e.npy"], ["--image-size", "from 8 to 1024"]),
    ("export-image-size-huge", ["export", "{ckpt}", "--image-size", "2000", "--out", "{root}/m.onnx"], ["--image-size", "from 8 to 1024"]),
    ("eval-image-size-text", ["eval", "--dataset", "digits", "--image-size", "big"], ["--image-size", "from 8 to 1024", "big"]),
    # train: configs and overrides
    (
        "train-missing-config",
        ["train", "--out", "{root}/r", "--config", "{root}/none.yaml"],
        ["none.yaml", "not found"],
    ),
    (
        "train-config-not-yaml",
        ["train", "--out", "{root}/r", "--config", "{root}/notyaml.yaml"],
        ["notyaml.yaml", "not valid YAML"],
    ),
    ("train-config-a-list", ["train", "--out", "{root}/r", "--config", "{root}/list.yaml"], ["list.yaml", "mapping"]),
    (
        "train-config-latin1",
        ["train", "--out", "{root}/r", "--config", "{root}/latin1.yaml"],
        ["latin1.yaml", "not UTF-8"],
    ),
    ("train-unknown-key", ["train", "--out", "{root}/r", "--set", "train.epoch=1"], ["train.epoch", "train.epochs"]),
    ("train-wrong-type", ["train", "--out", "{root}/r", "--set", "train.epochs=abc"], ["train.epochs", "expected int"]),
    (
        "train-bool-for-int",
        ["train", "--out", "{root}/r", "--set", "train.epochs=true"],
        ["train.epochs", "expected int"],
    ),
    ("train-set-no-equals", ["train", "--out", "{root}/r", "--set", "train.epochs"], ["train.epochs", "key=value"]),
    ("train-set-bad-yaml", ["train", "--out", "{root}/r", "--set", "data.root=[x"], ["data.root", "not valid YAML"]),
    (
        "train-unknown-backbone",
        ["train", "--out", "{root}/r", "--set", "model.backbone=vgg"],
        ["model.backbone", "vgg"],
    ),
    (
        "train-batch-not-divisible",
        ["train", "--out", "{root}/r", "--set", "train.batch_size=7"],
        ["train.batch_size", "divisible"],
    ),
    ("train-stop-after-0", ["train", "--out", "{root}/r", "--stop-after", "0"], ["--stop-after", ">= 1"]),
    # train: data
    (
        "train-missing-images",
        ["train", "--out", "{root}/r", "--images", "{root}/nowhere"],
        ["nowhere", "image folder not found"],
    ),
    ("train-empty-images", ["train", "--out", "{root}/r", "--images", "{root}/empty"], ["empty", "holds no images"]),
    ("train-images-is-a-file", ["train", "--out", "{root}/r", "--images", "{root}/a_file"], ["a_file", "is a file"]),
    (
        "train-missing-data-root",
        ["train", "--out", "{root}/r", "--set", "data.dataset=cub200", "--data-root", "{root}/nowhere"],
        ["nowhere", "CUB-200-2011"],
    ),
    # train: run folders
    (
        "train-over-finished-run",
        ["train", "--out", "{root}/finished", "--images", "{photos}"],
        ["finished", "--overwrite"],
    ),
    ("train-out-is-a-file", ["train", "--out", "{root}/a_file", "--images", "{photos}"], ["a_file", "is a file"]),
    ("train-resume-nothing", ["train", "--out", "{root}/nothing", "--resume"], ["nothing", "no run to resume"]),
    (
        "train-resume-and-overwrite",
        ["train", "--out", "{root}/finished", "--resume", "--overwrite"],
        ["--resume", "--overwrite"],
    ),
    (
        "train-resume-no-state",
        ["train", "--out", "{root}/finished", "--resume", "--set", "train.epochs=5"],
        ["finished", "no training state"],
    ),
    (
        "train-state-corrupt",
        ["train", "--out", "{root}/run_corrupt", "--resume"],
        ["run_corrupt", "not a plmetric training state"],
    ),
    (
        "train-state-truncated",
        ["train", "--out", "{root}/run_truncated", "--resume"],
        ["run_truncated", "not a plmetric training state"],
    ),
    (
        "train-state-crafted",
        ["train", "--out", "{root}/run_crafted", "--resume"],
        ["run_crafted", "not a plmetric training state"],
    ),
    (
        "train-state-shapes",
        ["train", "--out", "{root}/run_shapes", "--resume"],
        ["run_shapes", "does not fit this run"],
    ),
    (
        "train-resume-other-config",
        ["train", "--out", "{root}/run_shapes", "--resume", "--set", "plm.n_alpha=3"],
        ["plm.n_alpha", "exact resumption"],
    ),
    # embed / index
    ("embed-out-suffix", ["embed", "--images", "{photos}", "--out", "{root}/e.npz"], ["--out", ".safetensors"]),
    ("embed-no-source", ["embed", "--out", "{root}/e.safetensors"], ["--images", "--dataset"]),
    (
        "embed-missing-paths-file",
        ["embed", "--paths-file", "{root}/none.txt", "--out", "{root}/e.npy"],
        ["--paths-file", "none.txt"],
    ),
    (
        "embed-missing-image",
        ["embed", "--images", "{root}/gone.jpg", "--out", "{root}/e.npy"],
        ["gone.jpg", "not found"],
    ),
    (
        "embed-images-and-dataset",
        ["embed", "--images", "{photos}", "--dataset", "cub200", "--out", "{root}/e.parquet"],
        ["--dataset", "not both"],
    ),
    (
        "embed-over-a-model",
        ["embed", "--images", "{photos}", "--out", "{root}/changing.safetensors"],
        ["changing.safetensors", "not a file this command writes"],
    ),
    ("index-missing-folder", ["index", "{root}/nowhere", "--out", "{root}/i.safetensors"], ["nowhere", "not found"]),
    (
        "index-out-is-checkpoint",
        ["index", "{photos}", "--checkpoint", "{ckpt}", "--out", "{ckpt}"],
        ["model.safetensors", "also an input"],
    ),
    (
        "index-random-head",
        ["index", "{photos}", "--embedding-dim", "128", "--out", "{root}/i.safetensors"],
        ["--embedding-dim 128", "--checkpoint"],
    ),
    ("index-out-suffix", ["index", "{photos}", "--out", "{root}/i.txt"], ["--out", ".safetensors"]),
    (
        "index-negative-batch",
        ["index", "{photos}", "--out", "{root}/i.safetensors", "--batch-size", "-1"],
        ["--batch-size", ">= 1"],
    ),
    ("index-no-out", ["index", "{photos}"], ["--out", "--add-to"]),
    ("index-unknown-faiss", ["index", "{photos}", "--out", "{root}/i.safetensors", "--faiss", "lsh"], ["--faiss"]),
    (
        "index-nlist-without-ivf",
        ["index", "{photos}", "--out", "{root}/i.safetensors", "--nlist", "4"],
        ["--nlist", "--faiss ivf"],
    ),
    (
        "index-nlist-above-n",
        ["index", "{photos}", "--out", "{root}/i.safetensors", "--faiss", "ivf", "--nlist", "50"],
        ["--nlist 50", "the index has 5"],
    ),
    (
        "index-hnsw-m-one",
        ["index", "{photos}", "--out", "{root}/i.safetensors", "--faiss", "hnsw", "--hnsw-m", "1"],
        ["--hnsw-m", ">= 2"],
    ),
    (
        "index-memory-budget-zero",
        ["index", "{photos}", "--out", "{root}/i.safetensors", "--faiss", "ivfpq", "--memory-budget", "0"],
        ["--memory-budget", ">= 1"],
    ),
    (
        "index-memory-budget-without-ivfpq",
        ["index", "{photos}", "--out", "{root}/i.safetensors", "--faiss", "hnsw", "--memory-budget", "100"],
        ["--memory-budget", "--faiss auto or ivfpq"],
    ),
    (
        "index-pq-m-not-dividing",
        ["index", "{photos}", "--out", "{root}/i.safetensors", "--faiss", "ivfpq", "--pq-m", "7"],
        ["--pq-m 7", "must divide the embedding dimension"],
    ),
    (
        "index-ivfpq-too-few-images",
        ["index", "{photos}", "--out", "{root}/i.safetensors", "--faiss", "ivfpq"],
        ["--faiss ivfpq needs at least 16 vectors", "the index has 5"],
    ),
    (
        "index-pq-m-huge",
        ["index", "{photos}", "--out", "{root}/i.safetensors", "--faiss", "ivfpq", "--pq-m", "100000"],
        ["--pq-m", "<= 256"],
    ),
    ("index-add-to-missing", ["index", "{photos}", "--add-to", "{root}/none.safetensors"], ["none.safetensors"]),
    ("index-add-to-model", ["index", "{photos}", "--add-to", "{ckpt}"], ["model.safetensors", "not a plmetric index"]),
    (
        "index-add-to-other-checkpoint",
        ["index", "{photos}", "--add-to", "{index}", "--checkpoint", "{root}/changing.safetensors"],
        ["changing.safetensors", "model.safetensors", "is not the model"],
    ),
    (
        "index-add-to-stale-checkpoint",
        ["index", "{photos}", "--add-to", "{root}/stale.safetensors"],
        ["changing.safetensors", "has changed"],
    ),
    (
        "index-add-to-out-is-checkpoint",
        ["index", "{photos}", "--add-to", "{index}", "--out", "{ckpt}"],
        ["--out", "also an input"],
    ),
    (
        "index-add-to-new-kind",
        ["index", "{photos}", "--add-to", "{index}", "--faiss", "hnsw"],
        ["--faiss", "--add-to keeps"],
    ),
    (
        "index-add-to-pq-m",
        ["index", "{photos}", "--add-to", "{index}", "--pq-m", "8"],
        ["--pq-m", "--add-to keeps"],
    ),
    (
        "index-add-to-tampered-faiss",
        ["index", "{photos}", "--add-to", "{root}/tampered.safetensors"],
        ["tampered", "--exact"],
    ),
    # search
    (
        "search-tampered-faiss",
        ["search", "{photo}", "--index", "{root}/tampered.safetensors", "--out", "{root}/g.png"],
        ["tampered", "--exact"],
    ),
    (
        "search-missing-index",
        ["search", "{photo}", "--index", "{root}/none.safetensors", "--out", "{root}/g.png"],
        ["none.safetensors", "not found"],
    ),
    (
        "search-model-as-index",
        ["search", "{photo}", "--index", "{ckpt}", "--out", "{root}/g.png"],
        ["model.safetensors", "not a plmetric index"],
    ),
    (
        "search-binary-index",
        ["search", "{photo}", "--index", "{root}/garbage.safetensors", "--out", "{root}/g.png"],
        ["garbage.safetensors", "not a plmetric index"],
    ),
    (
        "search-text-as-index",
        ["search", "{photo}", "--index", "{root}/notyaml.yaml", "--out", "{root}/g.png"],
        ["notyaml.yaml", "not a plmetric index"],
    ),
    (
        "search-missing-query",
        ["search", "{root}/none.jpg", "--index", "{index}", "--out", "{root}/g.png"],
        ["none.jpg", "not found"],
    ),
    (
        "search-text-query",
        ["search", "{root}/text.jpg", "--index", "{index}", "--out", "{root}/g.png"],
        ["text.jpg", "cannot read query image"],
    ),
    (
        "search-bomb-query",
        ["search", "{root}/bomb.png", "--index", "{index}", "--out", "{root}/g.png"],
        ["bomb.png", "too large"],
    ),
    ("search-top-k-negative", ["search", "{photo}", "--index", "{index}", "--top-k", "-3"], ["--top-k", ">= 1"]),
    ("search-top-k-zero", ["search", "{photo}", "--index", "{index}", "--top-k", "0"], ["--top-k", ">= 1"]),
    ("search-out-suffix", ["search", "{photo}", "--index", "{index}", "--out", "{root}/g.jpg"], ["--out", ".png"]),
    (
        "search-out-is-query",
        ["search", "{photo}", "--index", "{index}", "--out", "{photo}"],
        ["p0.png", "also an input"],
    ),
    (
        "search-stale-index",
        ["search", "{photo}", "--index", "{root}/stale.safetensors", "--out", "{root}/g.png"],
        ["changing.safetensors", "has changed"],
    ),
    # export
    (
        "export-missing-checkpoint",
        ["export", "--format", "onnx", "{root}/none.safetensors", "--out", "{root}/m.onnx"],
        ["none.safetensors", "not found"],
    ),
    (
        "export-garbage-checkpoint",
        ["export", "--format", "torchscript", "{root}/garbage.safetensors", "--out", "{root}/m.pt"],
        ["garbage.safetensors", "not a readable"],
    ),
    ("export-out-suffix", ["export", "--format", "onnx", "{ckpt}", "--out", "{root}/m.pt"], ["--out", ".onnx"]),
    ("export-out-is-checkpoint", ["export", "--format", "onnx", "{ckpt}", "--out", "{ckpt}"], ["--out", ".onnx"]),
    (
        "export-unknown-format",
        ["export", "--format", "tflite", "{ckpt}", "--out", "{root}/m.onnx"],
        ["--format", "invalid choice"],
    ),
    # serve: every bad input is refused before anything listens
    ("serve-missing-index", ["serve", "{root}/none.safetensors"], ["none.safetensors", "not found"]),
    ("serve-model-as-index", ["serve", "{ckpt}"], ["model.safetensors", "not a plmetric index"]),
    ("serve-binary-index", ["serve", "{root}/garbage.safetensors"], ["garbage.safetensors", "not a plmetric index"]),
    ("serve-stale-index", ["serve", "{root}/stale.safetensors"], ["changing.safetensors", "has changed"]),
    ("serve-port-text", ["serve", "{index}", "--port", "http"], ["--port", "1 to 65535", "'http'"]),
    ("serve-port-zero", ["serve", "{index}", "--port", "0"], ["--port", "1 to 65535"]),
    ("serve-port-too-large", ["serve", "{index}", "--port", "70000"], ["--port", "1 to 65535"]),
    ("serve-top-k-zero", ["serve", "{index}", "--top-k", "0"], ["--top-k", ">= 1"]),
    ("serve-top-k-text", ["serve", "{index}", "--top-k", "many"], ["--top-k", "'many'"]),
    # neighbours, duplicates, groups (issue 22, pile tools): a missing or foreign index, k < 1, a threshold
    # outside (-1, 1], an output that is not theirs
    ("neighbours-missing-index", ["neighbours", "{root}/none.safetensors", "--out", "{root}/n.csv"], ["none.safetensors", "not found"]),
    ("neighbours-model-as-index", ["neighbours", "{ckpt}", "--out", "{root}/n.csv"], ["model.safetensors", "not a plmetric index"]),
    ("neighbours-text-as-index", ["neighbours", "{root}/notyaml.yaml", "--out", "{root}/n.csv"], ["notyaml.yaml", "not a plmetric index"]),
    ("neighbours-k-zero", ["neighbours", "{index}", "--k", "0", "--out", "{root}/n.csv"], ["--k", ">= 1"]),
    ("neighbours-out-suffix", ["neighbours", "{index}", "--out", "{root}/n.txt"], ["--out", ".csv or .parquet"]),
    ("neighbours-out-is-index", ["neighbours", "{index}", "--out", "{index}"], ["--out", ".csv or .parquet"]),
    ("neighbours-out-foreign", ["neighbours", "{index}", "--out", "{root}/foreign.csv"], ["--out", "not a file this command writes"]),
    ("duplicates-missing-index", ["duplicates", "{root}/none.safetensors", "--out", "{root}/d.csv"], ["none.safetensors", "not found"]),
    ("duplicates-threshold-high", ["duplicates", "{index}", "--threshold", "1.5", "--out", "{root}/d.csv"], ["--threshold", "(-1, 1]"]),
    ("duplicates-threshold-minus-one", ["duplicates", "{index}", "--threshold", "-1", "--out", "{root}/d.csv"], ["--threshold", "(-1, 1]"]),
    ("duplicates-threshold-nan", ["duplicates", "{index}", "--threshold", "nan", "--out", "{root}/d.csv"], ["--threshold", "(-1, 1]"]),
    ("duplicates-threshold-text", ["duplicates", "{index}", "--threshold", "high", "--out", "{root}/d.csv"], ["--threshold", "(-1, 1]"]),
    ("duplicates-candidates-above-threshold", ["duplicates", "{index}", "--check-crops", "--candidates", "0.9", "--threshold", "0.8", "--out", "{root}/d.csv"], ["--candidates 0.9", "--threshold 0.8"]),
    ("duplicates-candidates-outside", ["duplicates", "{index}", "--check-crops", "--candidates", "-1", "--out", "{root}/d.csv"], ["--candidates", "(-1, 1]"]),
    ("duplicates-out-foreign", ["duplicates", "{index}", "--out", "{root}/foreign.csv"], ["--out", "not a file this command writes"]),
    ("duplicates-grid-is-an-image", ["duplicates", "{index}", "--out", "{root}/d.csv", "--grid", "{photo}"], ["--grid", "not a file this command writes"]),
    ("duplicates-hash-distance-high", ["duplicates", "{index}", "--hash-distance", "65", "--out", "{root}/d.csv"], ["--hash-distance", "0..64"]),
    ("duplicates-hash-distance-text", ["duplicates", "{index}", "--hash-distance", "near", "--out", "{root}/d.csv"], ["--hash-distance", "0..64, or off"]),
    ("duplicates-pairs-is-out", ["duplicates", "{index}", "--out", "{root}/d.csv", "--pairs", "{root}/d.csv"], ["--pairs", "also --out"]),
    ("duplicates-pairs-foreign", ["duplicates", "{index}", "--out", "{root}/d.csv", "--pairs", "{root}/foreign.csv"], ["--pairs", "not a file this command writes"]),
    ("groups-missing-index", ["groups", "{root}/none.safetensors", "--out", "{root}/g.csv"], ["none.safetensors", "not found"]),
    ("groups-model-as-index", ["groups", "{ckpt}", "--out", "{root}/g.csv"], ["not a plmetric index"]),
    ("groups-min-size-one", ["groups", "{index}", "--min-size", "1", "--out", "{root}/g.csv"], ["--min-size", ">= 2"]),
    ("groups-more-groups-than-images", ["groups", "{index}", "--groups", "99", "--out", "{root}/g.csv"], ["--groups 99", "5 images"]),
    ("groups-out-foreign", ["groups", "{index}", "--out", "{root}/foreign.csv"], ["--out", "not a file this command writes"]),
    # serve --groups/--duplicates (issue 22, search & serve): a missing or foreign table, before anything listens
    (
        "serve-groups-missing",
        ["serve", "{index}", "--groups", "{root}/none.csv"],
        ["--groups", "none.csv", "not found"],
    ),
    (
        "serve-groups-foreign",
        ["serve", "{index}", "--groups", "{root}/a_file"],
        ["--groups", "a_file", "not a table written by plmetric groups"],
    ),
    (
        "serve-duplicates-missing",
        ["serve", "{index}", "--duplicates", "{root}/none.parquet"],
        ["--duplicates", "none.parquet", "not found"],
    ),
    (
        "serve-duplicates-foreign",
        ["serve", "{index}", "--duplicates", "{root}/notyaml.yaml"],
        ["--duplicates", "notyaml.yaml", "not a table written by plmetric duplicates"],
    ),
    # serve's tables as an attack (issue 30): bounded before they are decoded; another index's table
    (
        "serve-groups-long-field",
        ["serve", "{index}", "--groups", "{root}/longfield.csv"],
        ["--groups", "longfield.csv", "line 2", "longer than"],
    ),
    (
        "serve-groups-of-another-index",
        ["serve", "{index}", "--groups", "{root}/otherindex.csv"],
        ["--groups", "otherindex.csv", "another index", "plmetric groups", "index.safetensors --out FILE"],
    ),
    *(
        [
            (
                "serve-duplicates-millions-of-rows",
                ["serve", "{index}", "--duplicates", "{root}/rows.parquet"],
                ["--duplicates", "rows.parquet", "2,000,000 rows", "expected at most 5"],
            )
        ]
        if HAS_PYARROW
        else []
    ),
    # demo, similarity study
    (
        "demo-unknown-key",
        ["demo", "--out", "{root}/d", "--set", "train.epoch=1"],
        ["train.epoch", "unknown config key"],
    ),
    ("demo-missing-config", ["demo", "--out", "{root}/d", "--config", "{root}/none.yaml"], ["none.yaml", "not found"]),
    ("study-no-input", ["similarity-study"], ["--dataset", "--features"]),
    (
        "study-unknown-estimator",
        [
            "similarity-study",
            "--features",
            "{root}/features.npy",
            "--labels",
            "{root}/labels.npy",
            "--estimators",
            "nope",
        ],
        ["nope", "estimator"],
    ),
    (
        "study-missing-features",
        ["similarity-study", "--features", "{root}/none.npy", "--labels", "{root}/labels.npy"],
        ["none.npy", "not found"],
    ),
    # configs and --set: no YAML anchors/aliases (alias bombs), string keys, finite numbers (issue 21)
    (
        "train-config-alias-bomb",
        ["train", "--out", "{root}/r", "--config", "{root}/laughs.yaml"],
        ["laughs.yaml", "anchors", "line 1"],
    ),
    (
        "train-set-alias-bomb",
        ["train", "--out", "{root}/r", "--set", "data.root=[&a [x, x], [*a, *a], [*a, *a]]"],
        ["--set data.root", "anchors (&a)"],
    ),
    ("train-set-alias", ["train", "--out", "{root}/r", "--set", "data.root=*a"], ["--set data.root", "aliases (*a)"]),
    (
        "train-config-int-key",
        ["train", "--out", "{root}/r", "--config", "{root}/intkey.yaml"],
        ["intkey.yaml", "keys must be strings", "line 2"],
    ),
    (
        "train-config-null-key",
        ["train", "--out", "{root}/r", "--config", "{root}/nullkey.yaml"],
        ["nullkey.yaml", "keys must be strings"],
    ),
    (
        "train-set-int-key",
        ["train", "--out", "{root}/r", "--set", "train.epochs={{1: 2}}"],
        ["--set train.epochs", "keys must be strings"],
    ),
    (
        "train-set-nan-lr",
        ["train", "--out", "{root}/r", "--set", "train.lr_backbone=.nan"],
        ["train.lr_backbone", "finite"],
    ),
    (
        "train-set-inf-lr",
        ["train", "--out", "{root}/r", "--set", "train.lr_embedding=.inf"],
        ["train.lr_embedding", "finite"],
    ),
    ("train-set-minus-inf-tau", ["train", "--out", "{root}/r", "--set", "plm.tau=-.inf"], ["plm.tau", "finite"]),
    (
        "train-set-nan-clip",
        ["train", "--out", "{root}/r", "--set", "train.grad_clip=.nan"],
        ["train.grad_clip", "finite"],
    ),
    (
        "train-image-size-huge",
        ["train", "--out", "{root}/r", "--set", "data.image_size=3000"],
        ["data.image_size", "1024"],
    ),
    # the folder preset on piles too small to train (issue 21): how many readable images, the minimum
    (
        "train-pile-of-one",
        ["train", "--out", "{root}/r", "--images", "{root}/pile1"],
        ["pile1", "1 readable image", "at least 5"],
    ),
    (
        "train-pile-of-three",
        ["train", "--out", "{root}/r", "--images", "{root}/pile3"],
        ["pile3", "3 readable image", "at least 5"],
    ),
    (
        "train-pile-mostly-unreadable",
        ["train", "--out", "{root}/r", "--images", "{root}/pile5bad3"],
        ["pile5bad3", "2 readable image", "3 of 5 files unreadable", "at least 5"],
    ),
    # checkpoint metadata is checked like the config, naming the file and the field (issue 21)
    *[
        (
            f"{command}-checkpoint-image-size-{name}",
            [*argv, "{root}/" + f"size_{name}.safetensors", *rest],
            [f"size_{name}.safetensors", "'image_size'", "8 to 1024"],
        )
        for name in ("true", "one", "huge", "list", "text")
        for command, argv, rest in (
            ("index", ["index", "{photos}", "--checkpoint"], ["--out", "{root}/i.safetensors"]),
            ("eval", ["eval", "--dataset", "digits", "--checkpoint"], []),
            ("export", ["export", "--format", "torchscript"], ["--out", "{root}/m.pt"]),
        )
    ],
    # recorded sizes (issue 30): checked against the tensors and a bound before a model is built
    *[
        (
            f"{command}-recorded-size-{name}",
            [a.replace("CKPT", f"{{root}}/dim_{name}.safetensors").replace("INDEX", f"{{root}}/names_dim_{name}.safetensors") for a in argv],
            [f"dim_{name}.safetensors", *RECORDED_SIZE_ERRORS[name]],
        )
        for name in RECORDED_SIZES
        for command, argv in (
            ("export", ["export", "CKPT", "--format", "torchscript", "--out", "{root}/m.pt"]),
            ("index", ["index", "{photos}", "--checkpoint", "CKPT", "--out", "{root}/i.safetensors"]),
            ("embed", ["embed", "--images", "{photos}", "--checkpoint", "CKPT", "--out", "{root}/e.safetensors"]),
            ("search", ["search", "{photo}", "--index", "INDEX", "--out", "{root}/g.png"]),
        )
    ],
    *[
        (
            f"{command}-index-records-{name}",
            [*argv[:index_at], f"{{root}}/index_{name}.safetensors", *argv[index_at:]],
            [f"index_{name}.safetensors", *words, "[5, 16]"],
        )
        for name, words in (("count", ["count 500000"]), ("dim", ["dim 500000"]), ("output_dim", ["'output_dim' 32"]))
        for command, argv, index_at in (
            ("search", ["search", "{photo}", "--index", "--out", "{root}/g.png"], 3),
            ("serve", ["serve"], 1),
            ("neighbours", ["neighbours", "--out", "{root}/n.csv"], 1),
            ("index-add-to", ["index", "{photos}", "--add-to"], 3),
        )
    ],
    # nesting and absurd integers (issue 30): configs, --set values and count options are bounded
    (
        "train-config-nested-20000-deep",
        ["train", "--out", "{root}/r", "--config", "{root}/deep.yaml"],
        ["deep.yaml", "nested deeper than 32 levels", "line 2"],
    ),
    (
        "train-set-nested-20000-deep",
        ["train", "--out", "{root}/r", "--set", "data.root=" + "[" * 20_000 + "]" * 20_000],
        ["--set data.root", "nested deeper than 32 levels"],
    ),
    (
        "train-epochs-absurd",
        ["train", "--out", "{root}/r", "--set", "train.epochs=99999999999999999999999"],
        ["train.epochs", ">= 1 and <= 10000", "99999999999999999999999"],
    ),
    (
        "train-proxies-absurd",
        ["train", "--out", "{root}/r", "--set", "plm.num_proxies=10000000000"],
        ["plm.num_proxies", ">= 0 and <= 100000", "10000000000"],
    ),
    (
        "train-embedding-dim-500000",
        ["train", "--out", "{root}/r", "--set", "model.embedding_dim=500000"],
        ["model.embedding_dim", "<= 16384", "500000"],
    ),
    (
        "train-stop-after-absurd",
        ["train", "--out", "{root}/r", "--stop-after", "99999999999999999999999"],
        ["--stop-after", "<= 10000", "99999999999999999999999"],
    ),
    (
        "search-top-k-absurd",
        ["search", "{photo}", "--index", "{index}", "--top-k", "99999999999999999999999"],
        ["--top-k", ">= 1 and <= 100000", "99999999999999999999999"],
    ),
    ("serve-top-k-absurd", ["serve", "{index}", "--top-k", "1000000000"], ["--top-k", "<= 100000", "1000000000"]),
    (
        "neighbours-k-absurd",
        ["neighbours", "{index}", "--k", "10000000000", "--out", "{root}/n.csv"],
        ["--k", "<= 100000", "10000000000"],
    ),
    (
        "groups-groups-absurd",
        ["groups", "{index}", "--groups", "99999999999999999999999", "--out", "{root}/g.csv"],
        ["--groups", "<= 1000000000", "99999999999999999999999"],
    ),
    (
        "groups-min-size-absurd",
        ["groups", "{index}", "--min-size", "99999999999999999999999", "--out", "{root}/g.csv"],
        ["--min-size", ">= 2 and <= 1000000000"],
    ),
    (
        "groups-seed-over-32-bits",
        ["groups", "{index}", "--seed", "4294967296", "--out", "{root}/g.csv"],
        ["--seed", "<= 4294967295", "4294967296"],
    ),
    (
        "index-batch-size-absurd",
        ["index", "{photos}", "--out", "{root}/i.safetensors", "--batch-size", "1000000000"],
        ["--batch-size", "<= 16384", "1000000000"],
    ),
    (
        "embed-num-workers-absurd",
        ["embed", "--images", "{photos}", "--out", "{root}/e.npy", "--num-workers", "100000"],
        ["--num-workers", ">= 0 and <= 256", "100000"],
    ),
    (
        "index-nlist-absurd",
        ["index", "{photos}", "--out", "{root}/i.safetensors", "--faiss", "ivf", "--nlist", "99999999999999999999"],
        ["--nlist", "<= 16777216"],
    ),
    (
        "index-embedding-dim-absurd",
        ["index", "{photos}", "--out", "{root}/i.safetensors", "--embedding-dim", "500000"],
        ["--embedding-dim", "<= 16384", "500000"],
    ),
    ("eval-ks-absurd", ["eval", "--dataset", "digits", "--ks", "1,99999999999999999999"], ["--ks", "<= 100000"]),
    (
        "study-batches-absurd",
        ["similarity-study", "--features", "{root}/features.npy", "--labels", "{root}/labels.npy", "--batches", "1" + "0" * 30],
        ["--batches", "<= 10000000"],
    ),
    # backbones: timm:NAME must name a model timm knows (issue 21, backbones)
    (
        "train-unknown-timm-backbone",
        ["train", "--out", "{root}/r", "--set", "model.backbone=timm:no_such_net"],
        ["model.backbone", "timm:no_such_net", "timm knows no model"],
    ),
    (
        "train-timm-bad-pretrained-tag",
        ["train", "--out", "{root}/r", "--set", "model.backbone=timm:resnet10t.no_such_tag"],
        ["model.backbone", "resnet10t.no_such_tag", "timm.list_pretrained()"],
    ),
    (
        "embed-unknown-timm-backbone",
        ["embed", "--images", "{photos}", "--backbone", "timm:no_such_net", "--out", "{root}/e.safetensors"],
        ["timm:no_such_net", "timm knows no model"],
    ),
    # a huge name is echoed cut to its first characters and its length, not as a 200 KB line (issue 30)
    (
        "embed-backbone-name-huge",
        ["embed", "--images", "{photos}", "--backbone", "x" * 100_000, "--out", "{root}/e.safetensors"],
        ["unknown backbone", "'" + "x" * 60 + "'... (100,000 characters)"],
    ),
    (
        "train-timm-name-huge",
        ["train", "--out", "{root}/r", "--set", "model.backbone=timm:" + "y" * 100_000],
        ["model.backbone", "timm knows no model", "(100,000 characters)"],
    ),
    ("eval-dataset-huge", ["eval", "--dataset", "z" * 100_000], ["--dataset", "(100,000 characters)"]),
    (
        "train-set-epochs-huge",
        ["train", "--out", "{root}/r", "--set", "train.epochs=" + "9x" * 50_000],
        ["train.epochs", "expected int", "(100,000 characters)"],
    ),
    (
        "train-set-method-huge",
        ["train", "--out", "{root}/r", "--set", "train.method=" + "m" * 100_000],
        ["train.method", "(100,000 characters)"],
    ),
    # a weights path that is no regular file says what it is (and a FIFO is never opened: it would hang)
    (
        "embed-weights-folder",
        ["embed", "--images", "{photos}", "--weights", "{root}/empty", "--out", "{root}/e.safetensors"],
        ["weights file", "empty", "is a folder"],
    ),
    (
        "eval-weights-device",
        ["eval", "--dataset", "digits", "--weights", os.devnull],
        ["weights file", os.devnull, "is a device, not a regular file"],
    ),
    *(
        [
            (
                "index-weights-fifo",
                ["index", "{photos}", "--weights", "{root}/fifo.jpg", "--out", "{root}/i.safetensors"],
                ["weights file", "fifo.jpg", "is a FIFO, not a regular file"],
            )
        ]
        if hasattr(os, "mkfifo")
        else []
    ),
    # image decoding and the folder walk (one pixel limit for every command; regular files only)
    (
        "search-query-over-pixel-limit",
        ["search", "{root}/huge.png", "--index", "{index}", "--out", "{root}/g.png"],
        ["huge.png", "too large to decode", "121,000,000 pixels", "120,000,000"],
    ),
    *(
        [
            (
                "search-fifo-query",
                ["search", "{root}/fifo.jpg", "--index", "{index}", "--out", "{root}/g.png"],
                ["fifo.jpg", "is a FIFO, not a regular file"],
            ),
            (
                "embed-fifo-image",
                ["embed", "--images", "{root}/fifo.jpg", "--out", "{root}/e.safetensors"],
                ["fifo.jpg", "is a FIFO, not a regular file"],
            ),
            # every file a command reads says what a FIFO is, never "not found" (and never opens it)
            ("train-fifo-config", ["train", "--out", "{root}/r", "--config", "{root}/fifo.jpg"], ["config file", "fifo.jpg", "is a FIFO"]),
            ("index-fifo-checkpoint", ["index", "{photos}", "--checkpoint", "{root}/fifo.jpg", "--out", "{root}/i.safetensors"], ["checkpoint", "fifo.jpg", "is a FIFO"]),
            ("search-fifo-index", ["search", "{photo}", "--index", "{root}/fifo.jpg", "--out", "{root}/g.png"], ["index/embeddings file", "fifo.jpg", "is a FIFO"]),
            ("neighbours-fifo-index", ["neighbours", "{root}/fifo.jpg", "--out", "{root}/n.csv"], ["fifo.jpg", "is a FIFO"]),
            ("serve-fifo-index", ["serve", "{root}/fifo.jpg"], ["index file", "fifo.jpg", "is a FIFO"]),
            ("serve-fifo-groups", ["serve", "{index}", "--groups", "{root}/fifo.jpg"], ["--groups", "fifo.jpg", "is a FIFO"]),
            ("study-fifo-features", ["similarity-study", "--features", "{root}/fifo.jpg", "--labels", "{root}/labels.npy"], ["features file", "fifo.jpg", "is a FIFO"]),
            ("export-fifo-checkpoint", ["export", "{root}/fifo.jpg", "--format", "onnx", "--out", "{root}/m.onnx"], ["checkpoint", "fifo.jpg", "is a FIFO"]),
        ]
        if hasattr(os, "mkfifo")
        else []
    ),
]


# a damaged sharded index (issue 31), through every command that opens one
SHARD_CASES: list[tuple[str, list[str], list[str]]] = [
    (f"{command}-shard-{fault}", [*argv_of(f"{{root}}/shard_{fault}/index.safetensors")], [f"shard_{fault}", message])
    for fault, message in SHARD_FAULTS.items()
    for command, argv_of in (
        ("search", lambda ix: ["search", "{photo}", "--index", ix, "--out", "{root}/g.png"]),
        ("add-to", lambda ix: ["index", "{photos}", "--add-to", ix, "--image-size", "32", "--no-progress"]),
        ("neighbours", lambda ix: ["neighbours", ix, "--out", "{root}/n.csv", "--no-progress"]),
        ("duplicates", lambda ix: ["duplicates", ix, "--out", "{root}/d.csv", "--no-progress"]),
        ("groups", lambda ix: ["groups", ix, "--out", "{root}/gr.csv"]),
        ("serve", lambda ix: ["serve", ix]),
    )
]


def test_every_bad_input_is_one_clear_line_with_exit_status_2(ws, capsys):
    failures = _bad_input_failures(ws, capsys, CASES)
    assert not (ws["root"] / "PWNED").exists(), "a crafted state.pt ran code"
    commands = "eval, train, embed, index, search, neighbours, duplicates, groups, export, serve, demo, similarity-study"
    print(f"\ntried {len(CASES)} bad inputs across {commands}")
    assert not failures, "\n".join(failures)
    assert len(CASES) >= 30


def test_a_damaged_shard_is_one_line_naming_it_with_exit_status_2(ws, capsys):
    failures = _bad_input_failures(ws, capsys, SHARD_CASES)
    assert not failures, "\n".join(failures)


def _bad_input_failures(ws, capsys, cases: list[tuple[str, list[str], list[str]]]) -> list[str]:
    """Run each case; what went wrong with each (exit status, lines, message, files changed)."""
    root = ws["root"]
    fill = {k: str(v) for k, v in ws.items()}
    failures = []
    for case, argv, expected in cases:
        args = [a.format(**fill) for a in argv]
        before = _snapshot(root)
        capsys.readouterr()
        code = main(args)
        out, err = capsys.readouterr()
        lines = [line for line in err.splitlines() if line.strip()]
        problems = []
        if code != 2:
            problems.append(f"exit status {code}")
        if len(lines) != 1:
            problems.append(f"{len(lines)} lines on stderr")
        if len(err) > 4200:  # the longest line plmetric prints (4,000 characters and the prefix)
            problems.append(f"{len(err):,} characters on stderr")
        if "Traceback" in err + out:
            problems.append("a traceback")
        missing = [s for s in expected if s not in err]
        if missing:
            problems.append(f"message lacks {missing}")
        after = _snapshot(root)
        changed = sorted(k for k in before if after.get(k) != before[k])
        created = sorted(set(after) - set(before))
        if changed or created:
            problems.append(f"changed {changed} created {created}")
        if problems:
            failures.append(f"{case}: {'; '.join(problems)}: {err.strip()[:300]!r}")
    return failures


def test_unavailable_googlenet_weights_name_the_train_option(tmp_path, monkeypatch, capsys):
    import torch.hub

    def refuse(*args, **kwargs):
        raise OSError("no network in this test")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    args = [
        "train",
        "--out",
        str(tmp_path / "run"),
        "--set",
        "data.dataset=digits",
        "--set",
        "model.backbone=googlenet",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--set model.weights=PATH" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX links and FIFOs")
def test_index_of_a_hostile_folder_ends_and_stores_each_image_once(ws, tmp_path):
    """Image decoding and the folder walk: a link cycle, a self-link, a second link to a folder, a
    FIFO named .jpg, a broken link and an image over the pixel limit. ``index`` (in a subprocess
    with a timeout: a hang fails the test, it does not stop the suite) finishes, stores each image
    once, and names what it left out."""
    import subprocess
    import sys

    from image_trees import make_hostile_tree

    images, _ = make_hostile_tree(tmp_path / "pile", np.random.default_rng(0))
    (tmp_path / "pile" / "a" / "huge.png").write_bytes(_png_claiming(11000, 11000))
    out = tmp_path / "pile.safetensors"
    argv = ["index", str(tmp_path / "pile"), "--checkpoint", str(ws["ckpt"]), "--out", str(out)]
    argv += ["--image-size", "32", "--no-progress", "--num-workers", "0"]
    done = subprocess.run(
        [sys.executable, "-m", "plmetric.cli", *argv], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    _, _, paths, _ = load_embeddings(out)
    assert sorted(paths) == sorted(str(p.resolve()) for p in images)
    warned = [line for line in done.stderr.splitlines() if line.strip()]
    walk = [line for line in warned if "left out 6 entries" in line]
    assert len(walk) == 1 and all(name in walk[0] for name in ("fifo.jpg", "self", "again", "a/b/up", "twin.jpg"))
    assert any("huge.png" in line and "too large to decode" in line for line in warned)
    assert "left out 1 unreadable image(s)" in done.stdout


def test_unavailable_timm_weights_name_the_model_and_the_train_option(tmp_path, monkeypatch, capsys):
    """No network: timm's download (Hugging Face Hub, URLs) raises; one line naming the model, that its
    weights must be downloaded once, and --set model.weights=FILE; exit 2; nothing written (issue 21)."""
    import timm.models._builder as builder
    import timm.models._hub as hub
    import torch.hub

    def refuse(*args, **kwargs):
        raise OSError("no network in this test")

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    downloads = ((hub, "hf_hub_download"), (builder, "load_state_dict_from_url"), (builder, "download_cached_file"))
    for module, name in downloads:
        monkeypatch.setattr(module, name, refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    args = ["train", "--out", str(tmp_path / "run"), "--set", "data.dataset=digits"]
    assert main([*args, "--set", "model.backbone=timm:resnet10t"]) == 2
    err = capsys.readouterr().err
    assert "'timm:resnet10t'" in err and "downloaded once" in err and "--set model.weights=FILE" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


_TIMED_MAIN = """
import sys, time
import plmetric.data.backbones  # torch and timm imported before the clock starts
from plmetric.cli import main
start = time.monotonic()
code = main(sys.argv[1:])
print(code, time.monotonic() - start)
"""


@pytest.mark.parametrize(
    ("case", "env", "expected"),
    [
        # connections refused at once: the one look at the Hub fails, no retry
        ("unreachable", {"HF_ENDPOINT": "http://127.0.0.1:9"}, "the Hugging Face Hub did not answer"),
        ("offline", {"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
    ],
)
def test_timm_weights_without_network_are_one_line_at_once(ws, tmp_path, case, env, expected):
    """Issue 32: without network, ``--backbone timm:NAME`` asks the local cache, then makes at most one
    quick attempt (none with HF_HUB_OFFLINE=1): exactly one line on stderr, none of huggingface_hub's
    "Retrying in 1s [Retry 1/5]" lines. Run in a subprocess (the Hub client reads its settings at
    import) with an empty Hugging Face cache."""
    import subprocess
    import sys

    environ = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    environ.update(env, HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"))
    argv = ["embed", "--images", str(ws["photos"]), "--backbone", "timm:resnet10t", "--out", str(tmp_path / "e.npy")]
    done = subprocess.run(
        [sys.executable, "-c", _TIMED_MAIN, *argv], capture_output=True, text=True, env=environ, timeout=300, check=False
    )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert "'timm:resnet10t'" in lines[0] and expected in lines[0] and "--set model.weights=FILE" in lines[0]
    code, seconds = done.stdout.split()
    assert code == "2" and not (tmp_path / "e.npy").exists()
    # A hang guard, not a speed assertion: the Hub client's retries sleep 1+2+4+8+8 s per file name, 46 s
    # for the two it tries; the refusal itself takes no network wait, only building the model's facts.
    assert float(seconds) < 30, f"{case}: the refusal took {float(seconds):.0f} s"


@pytest.mark.parametrize("command", ["export", "index", "embed", "search"])
def test_recorded_sizes_are_refused_before_a_model_is_built(ws, monkeypatch, capsys, command):
    """A checkpoint claiming embedding_dim 500000 (or a 32-d layer over its 16-d tensors) is refused from
    its header: no model is built (building one fails this test), no tensor is read."""
    import plmetric.data.backbones.model as backbones  # where load_model finds them

    def never(*args, **kwargs):
        raise AssertionError("a model was built from unchecked metadata")

    monkeypatch.setattr(backbones, "create_model", never)
    monkeypatch.setattr(backbones, "load_file", never)
    root = ws["root"]
    for name in ("500k", "mismatch"):
        ckpt, index = root / f"dim_{name}.safetensors", root / f"names_dim_{name}.safetensors"
        argv = {
            "export": ["export", str(ckpt), "--format", "torchscript", "--out", str(root / "m.pt")],
            "index": ["index", str(ws["photos"]), "--checkpoint", str(ckpt), "--out", str(root / "i.safetensors")],
            "embed": ["embed", "--images", str(ws["photos"]), "--checkpoint", str(ckpt), "--out", str(root / "e.npy")],
            "search": ["search", str(ws["photo"]), "--index", str(index), "--runtime", "torch", "--out", str(root / "g.png")],
        }[command]
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert ckpt.name in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB (Linux)")
def test_refusing_a_500000_dim_checkpoint_costs_no_more_memory_than_the_imports(ws):
    """Peak RSS of ``plmetric export`` on a checkpoint claiming embedding_dim 500000, against that of a
    process that only imports what ``export`` imports (torch, timm, torchvision, plmetric).

    Bound: building that model needs its 500,000 x 1,280 float32 embedding weight alone, 2.56 GB (its
    orthogonal initialisation more: 8.8 GB were measured), so a refusal that builds nothing stays within
    the imports' peak plus 1 GiB (the message, the header read, allocator slack), and any build exceeds it.
    Each process runs under its own wrapper, so RUSAGE_CHILDREN holds that process's peak only."""
    import subprocess

    wrapper = (
        "import resource, subprocess, sys; done = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
        "sys.stderr.write(done.stderr)"
    )

    def peak(*argv: str) -> tuple[int, int, str]:
        done = subprocess.run(
            [sys.executable, "-c", wrapper, sys.executable, *argv], capture_output=True, text=True, timeout=600, check=True
        )
        code, kib = done.stdout.split()
        return int(code), int(kib) * 1024, done.stderr

    root = ws["root"]
    imports = peak("-c", "import plmetric.cli.dispatch, plmetric.retrieval.export, plmetric.data.backbones")
    assert imports[0] == 0, imports[2]
    code, refused, err = peak(
        "-m", "plmetric.cli", "export", str(root / "dim_500k.safetensors"), "--format", "torchscript",
        "--out", str(root / "m.pt"),
    )
    assert code == 2 and "dim_500k.safetensors" in err and "500000" in err, err
    weight_bytes = 500_000 * 1280 * 4
    assert refused < imports[1] + 2**30 < imports[1] + weight_bytes, (refused, imports[1])
    assert not (root / "m.pt").exists()
