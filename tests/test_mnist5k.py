"""The embedded mnist5k data: real digits, fixed disjoint split, stratified fixed subsets."""
import torch

from bench.core.data import dataset_labels, load_split, select_examples


def test_shapes_ranges_and_split():
    train, test = load_split("mnist5k", "train"), load_split("mnist5k", "test")
    assert len(train) == 4000 and len(test) == 1000
    x, y = test.tensors
    assert x.shape == (1000, 1, 28, 28) and x.dtype == torch.float32
    assert x.min() == 0.0 and x.max() == 1.0
    assert set(y.tolist()) == set(range(10))
    # Disjoint: no test image appears in the training split.
    train_rows = {row.numpy().tobytes() for row in train.tensors[0].flatten(1)}
    assert not any(row.numpy().tobytes() in train_rows for row in x.flatten(1)[:200])


def test_select_examples_is_stratified_and_fixed():
    test = load_split("mnist5k", "test")
    first = select_examples(test, 50, seed=0)
    assert torch.equal(first, select_examples(test, 50, seed=0))
    assert not torch.equal(first, select_examples(test, 50, seed=1))
    counts = torch.bincount(dataset_labels(test)[first], minlength=10)
    assert counts.tolist() == [5] * 10
    assert len(set(first.tolist())) == 50
