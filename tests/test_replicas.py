"""Model replicas in threads: shared parameters, own gradients, same result as one thread."""

from __future__ import annotations

import numpy as np
import pytest

from dpvit.nn.losses import CrossEntropyLoss
from dpvit.parallel.replicas import Replicas
from dpvit.vit import VisionTransformer, ViTConfig

CFG = ViTConfig(img_size=8, patch_size=4, embed_dim=8, depth=2, num_heads=2, num_classes=3,
                drop_rate=0.2, attn_drop_rate=0.1)
LOSS = CrossEntropyLoss(label_smoothing=0.1)


def share_step(model, indices, x, y):
    model.set_dropout_keys(seed=3, step=0, sample_ids=indices)
    logits = model.forward(x, train=True)
    loss, dlogits = LOSS(logits, y, denominator=7)
    model.backward(dlogits)
    return loss, float(np.count_nonzero(logits.argmax(axis=1) == y))


def batch(n: int):
    rng = np.random.default_rng(n)
    return np.arange(100, 100 + n), rng.standard_normal((n, 1, 8, 8)), rng.integers(0, 3, n)


def test_replica_reads_the_parameter_buffer_and_keeps_its_own_gradients():
    model = VisionTransformer(CFG, np.float64, seed=0)
    replica = model.replica()
    assert replica.store.flat_params is model.store.flat_params
    assert not np.shares_memory(replica.store.grad_buffer, model.store.grad_buffer)
    _, x, _ = batch(2)
    before = replica.forward(x)
    model.store.flat_params *= 1.5  # an optimizer step on the rank's model ...
    assert not np.allclose(replica.forward(x), before)  # ... is what the replica computes with
    np.testing.assert_array_equal(replica.forward(x), model.forward(x))


@pytest.mark.parametrize("threads,n", [(2, 7), (3, 7), (4, 2)], ids=["2x7", "3x7", "4x2"])
def test_threads_give_the_gradients_of_one_thread(threads, n):
    """Uneven parts (7 over 3 threads: 3/2/2) and more threads than images (2 over 4)."""
    indices, x, y = batch(n)
    one = Replicas(VisionTransformer(CFG, np.float64, seed=0), 1)
    many = Replicas(VisionTransformer(CFG, np.float64, seed=0), threads)
    for replicas in (one, many):
        replicas.model.store.flat_grads.fill(7.0)  # stale gradients must be cleared
        for model in replicas.models:
            model.store.flat_grads.fill(3.0)
    loss_one, correct_one = one.forward_backward(share_step, indices, x, y)
    loss_many, correct_many = many.forward_backward(share_step, indices, x, y)
    assert correct_many == correct_one
    assert loss_many == pytest.approx(loss_one, rel=1e-13)
    np.testing.assert_allclose(many.model.store.flat_grads, one.model.store.flat_grads,
                               rtol=1e-12, atol=1e-15)
    assert np.abs(one.model.store.flat_grads).max() > 0


@pytest.mark.parametrize("threads", [1, 2])
def test_micro_batches_give_the_gradients_of_whole_parts(threads):
    """11 images in micro-batches of at most 3 (one part: 3/3/3/2; two parts of 6 and 5: 3/3
    and 3/2): same loss, correct count and gradients as running each part at once."""
    indices, x, y = batch(11)
    sizes = []

    def recording_step(model, idx, xb, yb):
        sizes.append(len(idx))
        return share_step(model, idx, xb, yb)

    whole = Replicas(VisionTransformer(CFG, np.float64, seed=0), threads, micro_batch=0)
    micro = Replicas(VisionTransformer(CFG, np.float64, seed=0), threads, micro_batch=3)
    loss_whole, correct_whole = whole.forward_backward(share_step, indices, x, y)
    loss_micro, correct_micro = micro.forward_backward(recording_step, indices, x, y)
    assert sorted(sizes) == [2, 3, 3, 3]
    assert correct_micro == correct_whole
    assert loss_micro == pytest.approx(loss_whole, rel=1e-13)
    np.testing.assert_allclose(micro.model.store.flat_grads, whole.model.store.flat_grads,
                               rtol=1e-12, atol=1e-15)


def test_micro_batch_must_not_be_negative():
    with pytest.raises(ValueError, match="micro_batch must be 0"):
        Replicas(VisionTransformer(CFG, np.float64, seed=0), 1, micro_batch=-1)


def test_an_empty_share_leaves_zero_gradients():
    replicas = Replicas(VisionTransformer(CFG, np.float64, seed=0), 2)
    replicas.model.store.flat_grads.fill(1.0)
    indices, x, y = batch(0)
    assert replicas.forward_backward(share_step, indices, x, y) == (0, 0)
    assert not replicas.model.store.flat_grads.any()


@pytest.mark.parametrize("items", [0, 1, 5])
def test_map_runs_every_item_once_in_order(items):
    replicas = Replicas(VisionTransformer(CFG, np.float64, seed=0), 3)
    used = []

    def fn(model, item):
        used.append(model)
        return item * 10

    assert replicas.map(fn, list(range(items))) == [10 * i for i in range(items)]
    assert {id(m) for m in used} <= {id(m) for m in replicas.models}
    assert len({id(m) for m in used}) == min(items, 3)


def test_shared_parameters_must_fit_the_model():
    model = VisionTransformer(CFG, np.float64, seed=0)
    with pytest.raises(ValueError, match="do not fit"):
        VisionTransformer(CFG, np.float32, shared_params=model.store.flat_params)
    with pytest.raises(ValueError, match="at least 1"):
        Replicas(model, 0)


def test_evaluation_does_not_depend_on_the_number_of_threads():
    """Batches spread over 3 threads score exactly as on one (predictions, confidences, counts)."""
    from dpvit.data import DATASETS
    from dpvit.inference import evaluate_model
    from dpvit.parallel.comm import LocalComm

    cfg = ViTConfig(img_size=28, patch_size=7, embed_dim=8, depth=1, num_heads=2)
    model = VisionTransformer(cfg, np.float32, seed=0)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (70, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 70)
    one, three = (evaluate_model(Replicas(model, threads), images, labels, LocalComm(),
                                 DATASETS["mnist"], epoch=1, step=5, batch_size=8)
                  for threads in (1, 3))
    np.testing.assert_array_equal(three.predictions, one.predictions)
    np.testing.assert_array_equal(three.confidences, one.confidences)
    assert three.report["confusion_matrix"] == one.report["confusion_matrix"]
    assert three.report["loss"] == one.report["loss"]  # same batches, summed in batch order
    assert len(one.predictions) == 70
