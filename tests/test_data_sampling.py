"""Labels and pure index sampling: shifted one-hot, real batches, prototype init."""

from __future__ import annotations

import numpy as np
import pytest

from rcig.data import DatasetError, init_proto_indices, real_batch_indices, shifted_one_hot


def test_shifted_one_hot_values_and_row_sums():
    y = shifted_one_hot(np.array([0, 3, 1]), 4)
    assert y.dtype == np.float32 and y.shape == (3, 4)
    np.testing.assert_allclose(y[1], [-0.25, -0.25, -0.25, 0.75])
    np.testing.assert_allclose(y.sum(1), 0.0, atol=1e-6)
    # docs/algorithm.md §1.4: the outer CE recovers a plain one-hot by subtracting the batch minimum.
    np.testing.assert_allclose(y - y.min(), np.eye(4)[[0, 3, 1]], atol=1e-6)
    with pytest.raises(DatasetError, match="labels must lie in"):
        shifted_one_hot(np.array([4]), 4)


def test_real_batches_are_a_pure_function_of_seed_and_step():
    a = [real_batch_indices(7, s, 103, 10) for s in range(40)]
    b = [real_batch_indices(7, s, 103, 10) for s in reversed(range(40))][::-1]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert all(x.shape == (10,) and x.dtype == np.int64 for x in a)
    c = [real_batch_indices(8, s, 103, 10) for s in range(40)]
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_each_epoch_is_covered_exactly_once_across_batch_boundaries():
    n, bs = 103, 10  # 103 is not a multiple of 10: batches straddle epoch ends
    stream = np.concatenate([real_batch_indices(3, s, n, bs) for s in range(31)])  # 310 items
    for e in range(3):
        epoch = stream[e * n : (e + 1) * n]
        np.testing.assert_array_equal(np.sort(epoch), np.arange(n))
        np.testing.assert_array_equal(epoch, np.random.default_rng([3, e]).permutation(n))
    assert not np.array_equal(stream[:n], stream[n : 2 * n])  # a fresh order per epoch


def test_batch_larger_than_the_training_set_spans_epochs():
    idx = real_batch_indices(0, 1, 5, 12)  # items 12..23: epochs 2 (partial), 3, 4 (partial)
    expected = np.concatenate([np.random.default_rng([0, e]).permutation(5) for e in range(5)])
    np.testing.assert_array_equal(idx, expected[12:24])


@pytest.mark.parametrize("args", [(-1, 0, 10, 2), (0, -1, 10, 2), (0, 0, 0, 2), (0, 0, 10, 0)])
def test_real_batch_rejects_bad_arguments(args):
    with pytest.raises(ValueError, match="real_batch_indices"):
        real_batch_indices(*args)


def test_init_proto_indices_are_class_sorted_and_seeded():
    y = np.random.default_rng(1).integers(0, 5, size=200)
    idx = init_proto_indices(y, 5, 3, seed=4)
    assert idx.shape == (15,) and len(set(idx.tolist())) == 15
    np.testing.assert_array_equal(y[idx], np.repeat(np.arange(5), 3))
    np.testing.assert_array_equal(idx, init_proto_indices(y, 5, 3, seed=4))
    assert not np.array_equal(idx, init_proto_indices(y, 5, 3, seed=5))


def test_init_proto_indices_too_few_images_names_the_class():
    y = np.array([0, 0, 0, 1, 2, 2])
    with pytest.raises(DatasetError, match="class 1 has 1 training images, fewer than ipc=2"):
        init_proto_indices(y, 3, 2, seed=0)
