"""A cached mode's caching pass interrupted (Ctrl-C or SIGKILL: before any chunk, mid-way, mid-write,
after the last chunk) leaves a run folder from which ``--resume`` keeps the chunks done, computes only
the rest, and ends with the uninterrupted run's cache (bit for bit), log and weights; ``train`` without
``--resume`` refuses the folder. The chunk store itself: a chunk is reused only while it fits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from image_trees import make_tree
from safetensors.torch import load_file, save_file

import plmetric
from plmetric.data.backbones import build_transform
from plmetric.data.datasets import load_dataset
from plmetric.training.cached import PooledTrunk
from plmetric.training.view_cache import SeededViews, SplitCache, setup_key

TESTS = Path(__file__).resolve().parents[1]
SOURCE = Path(plmetric.__file__).resolve().parents[1]  # the subprocesses import the plmetric under test
CHUNK = 4  # images per chunk in the subprocesses: the pile's 24 images make 6 chunks
CHUNKS = 6
SMALL = [
    "data.image_size=32",
    "model.embedding_dim=8",
    "train.epochs=1",
    "train.views=2",
    "train.min_steps=2",
    "train.select_k=3",
    "train.runtime=torch",
]


def plmetric_run(pile: Path, out: Path, *flags: str, fault: str | None = None, sent: str = "SIGKILL",
                 workers: int = 0) -> subprocess.CompletedProcess:
    """``plmetric train --images PILE --out OUT`` in its own process group (as a terminal runs it: a Ctrl-C
    reaches the DataLoader's workers too), with cache chunks of :data:`CHUNK` images."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(SOURCE)]), "OMP_NUM_THREADS": "1"}
    env.pop("PLMETRIC_FAULT", None)
    env.pop("PLMETRIC_FAULT_SIGNAL", None)
    if fault:
        env.update(PLMETRIC_FAULT=fault, PLMETRIC_FAULT_SIGNAL=sent)
    sets = [f"--set={item}" for item in [*SMALL, f"data.num_workers={workers}"]]
    argv = ["train", "--images", str(pile), "--out", str(out), "--no-progress", *sets, *flags]
    return subprocess.run(
        [sys.executable, str(TESTS / "cache_worker.py"), str(CHUNK), *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        start_new_session=True,
    )


def chunk_files(run: Path) -> dict[str, Path]:
    return {path.name: path for path in sorted((run / "view-cache").glob("train-*.safetensors"))}


def identity(path: Path) -> tuple[int, int, bytes]:
    """What changes when a file is written again: its inode, its modification time, its bytes."""
    info = path.stat()
    return info.st_ino, info.st_mtime_ns, path.read_bytes()


def log(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_second")} for r in records]


@pytest.fixture(scope="module")
def pile(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pile") / "pile"
    make_tree("images", root, classes=3, per_class=8, bad=1)  # class_01/img_0.jpg unreadable: chunk 0 holds 3
    return root


@pytest.fixture(scope="module")
def reference(pile, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "uninterrupted"
    done = plmetric_run(pile, out)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(chunk_files(out)) == CHUNKS
    return out


# (fault point, signal, chunks on disk after it, DataLoader workers of the interrupted run)
POINTS = {
    "ctrl-c-before-any-chunk": ("cache", "SIGINT", 0, 1),
    "kill-before-any-chunk": ("cache", "SIGKILL", 0, 0),
    "ctrl-c-mid-way": ("cache-chunk@3", "SIGINT", 3, 1),
    "kill-mid-way": ("cache-chunk@3", "SIGKILL", 3, 0),
    "kill-writing-chunk-4": ("write:train-00003.safetensors@1", "SIGKILL", 3, 0),
    "ctrl-c-after-caching": ("cached", "SIGINT", CHUNKS, 1),
    "kill-after-caching": ("cached", "SIGKILL", CHUNKS, 0),
}


@pytest.mark.slow
@pytest.mark.parametrize("point", list(POINTS))
def test_an_interrupted_caching_pass_resumes_to_the_uninterrupted_run(pile, reference, tmp_path, point):
    fault, sent, kept, workers = POINTS[point]
    run = tmp_path / "run"
    stopped = plmetric_run(pile, run, fault=fault, sent=sent, workers=workers)
    if sent == "SIGINT":  # Ctrl-C: exit 130, one line saying what is kept and how to go on, no traceback
        assert stopped.returncode == 130, (stopped.returncode, stopped.stderr[-2000:])
        assert "Traceback" not in stopped.stderr + stopped.stdout
        said = [line for line in stopped.stderr.splitlines() if line.strip()]
        assert said[-1].startswith("plmetric: interrupted: ") and f"plmetric train --out {run} --resume" in said[-1]
        assert sum(line.startswith("plmetric: interrupted") for line in said) == 1
        if kept < CHUNKS:
            assert f"{kept} of {CHUNKS} chunks kept" in said[-1], said[-1]
    else:
        assert stopped.returncode == -signal.SIGKILL, (stopped.returncode, stopped.stderr[-2000:])
    # (a) the run folder exists: its config, the caching marker and the chunks done, none other
    assert (run / "config.yaml").is_file()
    progress = json.loads((run / "caching.json").read_text())
    assert progress["splits"]["train"]["chunks"] == CHUNKS
    assert progress["splits"]["train"]["chunks_done"] == kept
    assert progress["stage"] == ("cached" if kept == CHUNKS else "caching")
    before = {name: identity(path) for name, path in chunk_files(run).items()}
    assert sorted(before) == [f"train-{c:05d}.safetensors" for c in range(kept)]
    if fault.startswith("write:"):  # killed mid-write: a temporary file, never a chunk under its name
        assert list((run / "view-cache").glob(".train-00003.safetensors.*.tmp"))
    # train without --resume refuses the unfinished run, and leaves it as it was
    if point in ("ctrl-c-mid-way", "kill-after-caching"):
        refused = plmetric_run(pile, run)
        assert refused.returncode == 2, refused.stderr[-2000:]
        lines = [line for line in refused.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "--resume" in lines[0] and "--overwrite" in lines[0], lines
        assert {name: identity(path) for name, path in chunk_files(run).items()} == before
    resumed = plmetric_run(pile, run, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # (b) the chunks done before are loaded, not computed again (nor written again)
    if kept:
        kept_images = 4 * kept
        assert (
            f"caching views (train): {kept} of {CHUNKS} chunks kept from before ({kept_images} of 24 images"
            in resumed.stdout
        ), resumed.stdout
        assert f"computing the other {24 - kept_images} images" in resumed.stdout
    else:
        assert "kept from before" not in resumed.stdout
    after = {name: identity(path) for name, path in chunk_files(run).items()}
    assert all(after[name] == value for name, value in before.items())
    # (c) the cache is the uninterrupted run's, bit for bit (same per-image seeds, same batches, same kernels)
    assert sorted(after) == sorted(chunk_files(reference))
    for name, path in chunk_files(reference).items():
        assert after[name][2] == path.read_bytes(), name
    # (d) the run completes as the uninterrupted one did
    assert log(run) == log(reference)
    got, want = load_file(str(run / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[key], want[key]) for key in want)
    assert json.loads((run / "summary.json").read_text()) == json.loads((reference / "summary.json").read_text())
    assert json.loads((run / "caching.json").read_text())["stage"] == "cached"
    assert not list(run.rglob(".*.tmp")), list(run.rglob(".*"))


@pytest.mark.slow
def test_a_resumed_run_reuses_every_cached_chunk(pile, tmp_path):
    """--stop-after, then --resume: the views come from the run folder, the pass decodes nothing."""
    run = tmp_path / "run"
    first = plmetric_run(pile, run, "--set=train.epochs=2", "--stop-after", "1")
    assert first.returncode == 0, first.stderr[-2000:]
    before = {name: identity(path) for name, path in chunk_files(run).items()}
    resumed = plmetric_run(pile, run, "--set=train.epochs=2", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{CHUNKS} of {CHUNKS} chunks kept from before (24 of 24 images" in resumed.stdout
    assert "computing the other 0 images" in resumed.stdout
    assert {name: identity(path) for name, path in chunk_files(run).items()} == before
    assert [record["epoch"] for record in log(run)] == [1, 2]


# ----------------------------------------------------------------------------- the chunk store, in process


def _store(root: Path, folder: Path, size: int = 16, seed: int = 0) -> SplitCache:
    """A two-view cache of the pile's images in chunks of 5 through a tiny network (no backbone download)."""
    from tiny import tiny_model

    dataset = load_dataset("images", str(root), verbose=False).train
    net = PooledTrunk(tiny_model()).eval()
    transforms = [build_transform("efficientnet_lite0", size), build_transform("efficientnet_lite0", size, train=True)]
    with torch.no_grad():
        out_shape = tuple(net(torch.zeros(1, 3, size, size)).shape[1:])
    key = setup_key({"net": "tiny", "seed": seed}, transforms)
    return SplitCache(net, dataset, transforms, out_shape, batch_images=3, seed=seed, store_dtype=torch.float32,
                      folder=folder, split="train", key=key)


@pytest.fixture
def small_pile(tmp_path) -> Path:
    root = tmp_path / "pile"
    make_tree("images", root, classes=2, per_class=7, bad=1)  # 14 images, the first unreadable
    return root


def test_chunks_are_reused_only_while_they_fit(small_pile, tmp_path, monkeypatch):
    import plmetric.training.view_cache as view_cache

    monkeypatch.setattr(view_cache, "CHUNK_IMAGES", 5)  # 14 images: chunks [0, 5), [5, 10), [10, 14)
    folder = tmp_path / "view-cache"
    first = _store(small_pile, folder)
    assert (first.kept_chunks, first.remaining_images) == (0, 14)
    views, rows = first.run(torch.device("cpu"), 0, False)
    assert views.shape[:2] == (2, 13) and rows.tolist() == list(range(1, 14))  # the unreadable image left out
    assert first.computed_images == 14 and first.dataset.unreadable == [0]
    names = sorted(path.name for path in folder.iterdir())
    assert names == ["train-00000.safetensors", "train-00001.safetensors", "train-00002.safetensors"]

    again = _store(small_pile, folder)
    assert (again.kept_chunks, again.kept_images, again.remaining_images) == (3, 14, 0)
    views2, rows2 = again.run(torch.device("cpu"), 0, False)
    assert again.computed_images == 0 and torch.equal(views2, views) and torch.equal(rows2, rows)

    # a changed image (its size and time) makes its chunk stale: only that chunk is computed again
    changed = sorted(small_pile.rglob("*.jpg"))[7]  # image 7: chunk 1
    changed.write_bytes(sorted(small_pile.rglob("*.jpg"))[8].read_bytes() + b"\0")
    third = _store(small_pile, folder)
    assert sorted(third.done) == [0, 2] and third.remaining_images == 5
    views3, _ = third.run(torch.device("cpu"), 0, False)
    assert third.computed_images == 5
    assert torch.equal(views3[:, :4], views[:, :4]) and torch.equal(views3[:, 9:], views[:, 9:])
    assert not torch.equal(views3[:, 4:9], views[:, 4:9])

    # another preprocessing (image size) or seed: nothing fits
    assert _store(small_pile, folder, size=20).kept_chunks == 0
    assert _store(small_pile, folder, seed=1).kept_chunks == 0


def test_a_damaged_or_crafted_chunk_is_computed_again(small_pile, tmp_path, monkeypatch):
    import plmetric.training.view_cache as view_cache

    monkeypatch.setattr(view_cache, "CHUNK_IMAGES", 5)
    folder = tmp_path / "view-cache"
    views, rows = _store(small_pile, folder).run(torch.device("cpu"), 0, False)
    path = folder / "train-00001.safetensors"
    good = path.read_bytes()
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
        stored = {name: handle.get_tensor(name) for name in handle.keys()}

    def crafted(**tensors: torch.Tensor) -> bytes:
        save_file({**stored, **tensors}, str(path), metadata=meta)
        return path.read_bytes()

    damaged = {
        "truncated": good[: len(good) // 2],
        "garbage": os.urandom(len(good)),
        "empty": b"",
        "float16 views": crafted(views=stored["views"].half()),
        "a row outside the chunk": crafted(rows=torch.tensor([5, 6, 7, 8, 10])),
        "rows out of order": crafted(rows=torch.tensor([5, 7, 6, 8, 9])),
        "fewer views than rows": crafted(views=stored["views"][:, :4].contiguous()),
        "another key": None,
    }
    for what, data in damaged.items():
        if data is None:
            other = meta["plmetric_view_cache"].replace('"key": "', '"key": "0')
            save_file(stored, str(path), metadata={"plmetric_view_cache": other})
        else:
            path.write_bytes(data)
        store = _store(small_pile, folder)
        assert sorted(store.done) == [0, 2], what
        again, again_rows = store.run(torch.device("cpu"), 0, False)
        assert store.computed_images == 5 and torch.equal(again, views) and torch.equal(again_rows, rows), what
        assert path.read_bytes() == good, what  # replaced by the chunk as computed
    # chunks past the end of a pile that shrank are removed
    (folder / "train-00007.safetensors").write_bytes(good)
    _store(small_pile, folder)
    assert not (folder / "train-00007.safetensors").exists()


def test_each_image_has_its_own_random_views_whoever_decodes_it(small_pile):
    dataset = load_dataset("images", str(small_pile), verbose=False).train
    dataset.transform = build_transform("efficientnet_lite0", 16, train=True)
    seeded = SeededViews(dataset, seed=3)
    state = torch.random.get_rng_state()
    first = seeded[5][0]
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's generator is left alone
    assert torch.equal(seeded[5][0], first)  # the same views every time
    assert not torch.equal(SeededViews(dataset, seed=4)[5][0], first)  # another seed, other views


def test_a_chunk_that_cannot_be_stored_warns_once_and_the_pass_goes_on_in_memory(small_pile, tmp_path, monkeypatch):
    import errno

    import plmetric.training.view_cache as view_cache

    monkeypatch.setattr(view_cache, "CHUNK_IMAGES", 5)
    expected, expected_rows = _store(small_pile, tmp_path / "reference").run(torch.device("cpu"), 0, False)
    writes = []

    def full_disk(path, data):
        writes.append(path)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(view_cache, "atomic_write_bytes", full_disk)
    store = _store(small_pile, tmp_path / "full")
    with pytest.warns(UserWarning, match="cannot store cached views .* No space left") as caught:
        views, rows = store.run(torch.device("cpu"), 0, False)
    assert len([w for w in caught if "cannot store" in str(w.message)]) == 1 and len(writes) == 1
    assert torch.equal(views, expected) and torch.equal(rows, expected_rows)
    assert store.on_disk == set() and not list((tmp_path / "full").glob("*.safetensors"))


def test_the_view_cache_keys_on_the_clean_views_eval_rule():
    """``data.eval_resize`` changes view 0 (the clean view): a cache of the other rule is not reused."""
    crop = build_transform("efficientnet_lite0", 32)
    whole = build_transform("efficientnet_lite0", 32, eval_resize="whole")
    train = build_transform("efficientnet_lite0", 32, train=True)
    fields = {"net": "tiny", "seed": 0}
    assert setup_key(fields, [crop, train]) != setup_key(fields, [whole, train])
    assert setup_key(fields, [crop, train]) == setup_key(fields, [build_transform("efficientnet_lite0", 32), train])
