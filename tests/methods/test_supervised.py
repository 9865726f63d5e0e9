"""The supervised ceiling (plmetric.methods.supervised): pytorch-metric-learning's multi-similarity
loss on class-balanced batches of the train labels, in the same trainer."""

from __future__ import annotations

import json

import pytest
import torch
from pytorch_metric_learning import losses, miners
from tiny import tiny_config, tiny_model, tiny_splits

from plmetric.methods.base import StepInputs
from plmetric.methods.supervised import MultiSimilarityObjective
from plmetric.training.loop import train


def test_objective_is_pml_multi_similarity_with_its_miner():
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(20, 8), dim=1).requires_grad_()
    labels = torch.arange(4).repeat_interleave(5)
    ours = MultiSimilarityObjective(alpha=2.0, beta=40.0, base=0.4, miner_epsilon=0.2)
    got = ours(StepInputs((emb,), (), labels))["loss"]
    reference = losses.MultiSimilarityLoss(alpha=2.0, beta=40.0, base=0.4)
    want = reference(emb, labels, miners.MultiSimilarityMiner(epsilon=0.2)(emb, labels))
    assert torch.equal(got, want)
    got.backward()
    assert emb.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="needs the batch's labels"):
        ours(StepInputs((emb,), (), None))
    with pytest.raises(ValueError, match="per_class"):
        MultiSimilarityObjective(per_class=1)


def test_supervised_run_trains_on_class_balanced_batches_and_reports_best_and_final(tmp_path, monkeypatch):
    from plmetric.training import sampling
    seen = []
    original = sampling.ClassBalancedBatchSampler.__iter__

    def recording(self):
        for batch in original(self):
            seen.append(batch)
            yield batch

    monkeypatch.setattr(sampling.ClassBalancedBatchSampler, "__iter__", recording)
    cfg = tiny_config(train__method="supervised", train__epochs=2, supervised__per_class=5)
    splits = tiny_splits()
    result = train(cfg, tmp_path, splits=splits, model=tiny_model(), progress=False)
    assert seen and all(len(set(splits.train.labels[b].tolist())) == 2 for b in seen)  # 10 = 2 classes x 5
    assert result.final_metrics is not None and result.best_epoch in (1, 2)
    record = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
    assert record["loss"] > 0 and "target_label_correlation" not in record  # no pair targets to watch
    assert (tmp_path / "best.safetensors").is_file() and (tmp_path / "model.safetensors").is_file()


def test_supervised_needs_labels(tmp_path):
    splits = tiny_splits()
    splits.train.labels[:] = -1
    cfg = tiny_config(train__method="supervised")
    with pytest.raises(ValueError, match="trains with labels; the training split has none"):
        train(cfg, tmp_path, splits=splits, model=tiny_model(), progress=False)


@pytest.mark.parametrize("method", ["plm", "stml"])
def test_labels_never_reach_an_unsupervised_objective(tmp_path, monkeypatch, method):
    """With a labelled training split (the labels monitor the targets), the objective of an
    unsupervised method gets ``labels=None`` at every step."""
    from plmetric.methods import get_method

    objective_class = type(
        get_method(method)(tiny_config()).build_objective(16, torch.randn(40, 16), torch.Generator())
    )
    labels_seen = []
    original = objective_class.forward

    def spy(self, inputs):
        labels_seen.append(inputs.labels)
        return original(self, inputs)

    monkeypatch.setattr(objective_class, "forward", spy)
    cfg = tiny_config(train__method=method, train__epochs=1)
    train(cfg, tmp_path, splits=tiny_splits(), model=tiny_model(), progress=False)
    assert labels_seen and all(labels is None for labels in labels_seen)
    record = json.loads((tmp_path / "log.jsonl").read_text())
    assert "target_label_correlation" in record  # the labels did watch the targets
