"""Training on cached views (train.mode head/tail): the step floor, the estimate printed before any
pass, the report of what changed, and a checkpoint that is the whole image model, so that index and
export give the embedding the trainer's cached path gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from image_trees import make_tree

from plmetric.cli import main
from plmetric.config.schema import load_config
from plmetric.training.cached import build_cached_training, planned_steps_per_epoch, resolve_mode
from plmetric.training.optimization import epoch_steps

# The cached path and `plmetric index` compute the same float32 network (PyTorch's kernels) on other
# batches (5 views of 4 images against index's batches): another convolution blocking and summation
# order. A sum of n terms then differs by about sqrt(n)·u relative (u = 2^-24), n <= 1280: about 2e-6
# per layer; over EfficientNet-Lite0's ~50 layers at most about 1e-4 on unit-norm embeddings (the
# derivation of tests/retrieval/test_export.py's ONNX bound; ReLU6 and the normalisation do not amplify).
NETWORK_TOLERANCE = 1e-4
# The same network on the same batch through two module paths (composed image model against prefix +
# trained tail): the same kernels in the same order, but the composed model runs the prefix and the tail
# in one forward: identical up to a few float32 ulps of the unit-norm entries.
SAME_BATCH_TOLERANCE = 1e-5


def _cfg(root: Path, *extra: str):
    small = [
        "data.dataset=images",
        f"data.root={root}",
        "data.image_size=32",
        "data.num_workers=0",
        "model.embedding_dim=8",
        "plm.num_proxies=0",
        "train.batch_size=12",
        "train.neighbours_per_seed=4",
        "train.epochs=2",
        "train.views=2",
        "train.device=cpu",
        "train.select_k=3",
    ]
    return load_config("folder", [*small, *extra])


@pytest.fixture(scope="module")
def pile(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pile")
    make_tree("images", root, classes=3, per_class=8, bad=0)
    return root


def test_the_step_floor_known_answers():
    cfg = load_config(None, ["train.batch_size=10", "train.neighbours_per_seed=5", "train.epochs=4"])
    t = cfg.train
    assert epoch_steps(t, 100) == 10  # n // B: one pass an epoch
    t.min_steps = 100
    assert epoch_steps(t, 100) == 25  # ceil(100 / 4 epochs)
    t.min_steps = 1000
    # the floor holds whatever the pile: more than one round of seeds (100 // 2 = 50 batches) is
    # drawn again by the sampler
    assert epoch_steps(t, 100) == 250 and epoch_steps(t, 10) == 250
    t.min_steps = 301
    assert epoch_steps(t, 10) * t.epochs == 304  # ceil(301 / 4) * 4 >= 301
    t.max_steps_per_epoch = 7
    assert epoch_steps(t, 100) == 7  # the cap wins over the floor (quick runs, tests)
    t.min_steps, t.max_steps_per_epoch = 0, None
    assert epoch_steps(t, 9) == 0  # without the floor: no batch (the trainer says so)
    # the plan before any image is decoded is the rule itself
    t.min_steps = 100
    assert planned_steps_per_epoch(cfg, 100) == 25 and planned_steps_per_epoch(cfg, 30) == 25


def test_auto_is_end_to_end_on_a_gpu_and_the_head_elsewhere():
    cfg = load_config(None, ["train.mode=auto"])
    assert resolve_mode(cfg, torch.device("cpu")) == "head"
    assert resolve_mode(cfg, torch.device("cuda")) == "end_to_end"
    assert resolve_mode(load_config(None, ["train.mode=tail", "model.frozen_stages=6"]), torch.device("cpu")) == "tail"
    with pytest.raises(ValueError, match="train.mode=tail .* model.frozen_stages >= 1"):
        load_config(None, ["train.mode=tail"])
    with pytest.raises(ValueError, match="train.views"):
        load_config(None, ["train.views=0"])


@pytest.mark.slow
def test_a_pile_trains_on_cached_views_and_its_checkpoint_is_the_image_model(pile, tmp_path, capsys):
    run = tmp_path / "run"
    small = ["data.image_size=32", "data.num_workers=0", "model.embedding_dim=8", "train.epochs=2", "train.views=2"]
    small += ["train.min_steps=16", "train.select_k=3"]
    assert main(["train", "--images", str(pile), "--out", str(run), "--no-progress", *[f"--set={s}" for s in small]]) == 0
    out = capsys.readouterr().out
    # the choice and the estimate come before the first pass; the floor gives 8 steps an epoch, more
    # than one round of seeds (batch fitted to 20, 4 seeds a batch: 24 // 4 = 6 batches a round)
    assert "train.mode=auto: head (no GPU" in out
    estimate = next(line for line in out.splitlines() if line.startswith("train.mode=head:"))
    assert "24 images x 2 views cached once, then 16 steps (2 epochs); expected about" in estimate
    assert out.index(estimate) < out.index("epoch 1/2")
    state = torch.load(run / "state.pt", weights_only=False)
    assert state["scheduler"]["last_epoch"] == 16  # the schedule follows the steps
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [record["steps"] for record in log] == [8, 8]
    # what changed: both criterion values, the neighbour change, the report's two files
    summary = json.loads((run / "summary.json").read_text())
    # a pile: no test metrics written, and the kept epoch's criterion as logged
    assert not {"start", "final", "best", "best_epoch", "selected", "skipped_test_images"} & set(summary)
    assert summary["selected_epoch"] == 2 and summary["selected_score"] == log[-1]["selection"]["mutual_knn"]
    change = summary["change"]
    assert change["criterion"] == "mutual_knn" and {"start", "kept", "neighbours_changed_mean"} <= set(change)
    assert f"label-free criterion mutual_knn: start {change['start']:.4f}, kept {change['kept']:.4f}" in out
    assert (run / "report.html").stat().st_size > 1000 and (run / "report.png").stat().st_size > 1000
    # the checkpoint is a whole image model: index (images through the backbone) gives the embedding
    # the trainer's cached path gives (cached pooled features through the trained layer)
    index = tmp_path / "index.safetensors"
    checkpoint = run / "selected.safetensors"
    assert main(["index", str(pile), "--checkpoint", str(checkpoint), "--out", str(index), "--no-progress"]) == 0
    from plmetric.data.backbones import feature_model, load_model
    from plmetric.retrieval.index import load_embeddings

    indexed, _, paths, _ = load_embeddings(index)
    full, meta = load_model(checkpoint)
    assert meta["backbone"] == "efficientnet_lite0" and meta["image_size"] == 32
    cfg = load_config(run / "config.yaml")
    cached = build_cached_training(cfg, torch.device("cpu"), progress=False, mode="head")
    head = feature_model(cached.splits.train.views.shape[-1], 8)
    head.embedding.load_state_dict(full.embedding.state_dict())
    with torch.no_grad():
        from_cache = head.eval()(cached.splits.train.views[0])
    order = [cached.splits.train.describe(i) for i in range(len(cached.splits.train))]
    by_path = dict(zip(paths, indexed, strict=True))
    via_index = torch.stack([by_path[p] for p in order])
    assert (from_cache - via_index).abs().max().item() <= NETWORK_TOLERANCE
    # and it exports like any checkpoint
    assert main(["export", str(checkpoint), "--format", "torchscript", "--out", str(tmp_path / "m.pt")]) == 0


@pytest.mark.slow
def test_the_tail_image_model_is_the_prefix_then_the_trained_tail(pile):
    cfg = _cfg(pile, "train.mode=tail", "model.frozen_stages=6")
    cached = build_cached_training(cfg, torch.device("cpu"), progress=False, mode="tail")
    assert cached.splits.train.views.shape[:2] == (2, 24) and cached.splits.train.views.dtype == torch.float16
    trained = cached.student
    with torch.no_grad():  # "training": move every parameter of the tail and the layer
        for parameter in trained.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    full = cached.image_model(trained)
    from plmetric.training.networks import split_backbone

    prefix = split_backbone(full, 6)[0].eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = trained.eval()(prefix(x))
        got = full(x)
    assert (got - expected).abs().max().item() <= SAME_BATCH_TOLERANCE
    # a fresh copy each time: composing never changes the trained network or the pretrained model
    assert cached.image_model(trained) is not full


@pytest.mark.slow
def test_caching_never_changes_the_pretrained_model(tmp_path):
    """Caching a labelled set (train views, then the test split's clean view) leaves every weight and
    BatchNorm statistic of the pretrained model as loaded: the frozen part runs in eval mode only."""
    from plmetric.data.backbones import create_model

    root = tmp_path / "labelled"
    make_tree("folder", root, classes=4, per_class=6, bad=0)
    cfg = load_config(
        None, ["data.dataset=folder", f"data.root={root}", "data.image_size=32", "data.num_workers=0", "plm.num_proxies=0"]
    )
    cfg.train.views = 2
    cached = build_cached_training(cfg, torch.device("cpu"), progress=False, mode="head")
    assert cached.splits.test is not None and cached.splits.test.views.shape[0] == 1
    fresh = create_model("efficientnet_lite0", embedding_dim=cfg.model.embedding_dim).state_dict()
    for name, value in cached.model.state_dict().items():
        if not name.startswith("embedding."):  # the layer is initialised at random, then replaced
            assert torch.equal(value, fresh[name]), name


@pytest.mark.slow
def test_an_end_to_end_run_says_how_long_before_its_first_pass_and_keeps_its_random_stream(pile, tmp_path, capsys):
    from plmetric.training.estimate import end_to_end_estimate

    run = tmp_path / "e2e"
    small = ["data.image_size=32", "data.num_workers=0", "model.embedding_dim=8", "train.epochs=1"]
    small += ["train.mode=end_to_end", "train.max_steps_per_epoch=1", "train.select_k=3"]
    assert main(["train", "--images", str(pile), "--out", str(run), "--no-progress", *[f"--set={s}" for s in small]]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("train.mode=end_to_end:"))
    assert "24 images, 1 steps of 20 (1 epochs); expected at least" in line  # batch fitted: 24 - 24 % 5
    assert out.index(line) < out.index("epoch 1/1")
    # the probe builds and runs a network, but under fork_rng: the run's random stream is untouched
    cfg = load_config(run / "config.yaml")
    from plmetric.data.datasets import load_dataset

    splits = load_dataset("images", str(pile), verbose=False)
    before = torch.random.get_rng_state()
    end_to_end_estimate(cfg, splits.train, None, torch.device("cpu"), steps=1)
    assert torch.equal(torch.random.get_rng_state(), before)
