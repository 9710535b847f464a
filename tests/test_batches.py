import pytest
import torch

from genrep.data.batches import BatchPlan, TrainBatches, draw_random_inputs, make_views, mix_seed
from genrep.errors import GenrepError


def test_an_epoch_visits_each_image_at_most_once():
    plan = BatchPlan(100, 32, seed=0)
    assert plan.steps_per_epoch == 3
    seen = torch.cat([plan.indices(s) for s in range(3)])
    assert len(seen) == 96 and len(set(seen.tolist())) == 96
    assert not torch.equal(plan.indices(0), plan.indices(3))  # a new permutation each epoch


def test_order_is_independent_of_the_number_of_processes():
    one = BatchPlan(100, 32, seed=7)
    for world in (2, 4):
        ranks = [BatchPlan(100, 32, seed=7, rank=r, world=world) for r in range(world)]
        for step in (0, 1, 5):
            assert torch.equal(torch.cat([p.indices(step) for p in ranks]), one.indices(step))


def test_order_depends_on_the_seed_only():
    assert torch.equal(BatchPlan(50, 10, seed=1).indices(4), BatchPlan(50, 10, seed=1).indices(4))
    assert not torch.equal(BatchPlan(50, 10, seed=1).indices(4), BatchPlan(50, 10, seed=2).indices(4))


def test_bad_batch_sizes():
    with pytest.raises(GenrepError, match="not divisible by the 3 processes"):
        BatchPlan(100, 32, seed=0, world=3)
    with pytest.raises(GenrepError, match="larger than the 10 training images"):
        BatchPlan(10, 32, seed=0)


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_and_resident_paths_deliver_the_same_batches(workers):
    images = torch.randint(0, 256, (64, 1, 4, 4), dtype=torch.uint8)
    labels = torch.arange(64)
    plan = BatchPlan(64, 16, seed=3)
    resident = list(TrainBatches(images, labels, plan, torch.device("cpu"), resident=True)(2, 7))
    streamed = list(TrainBatches(images, labels, plan, torch.device("cpu"), resident=False,
                                 num_workers=workers)(2, 7))
    assert [s for s, _, _ in resident] == [s for s, _, _ in streamed] == list(range(2, 7))
    for (_, x1, y1), (_, x2, y2) in zip(resident, streamed):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
        assert torch.equal(images[y1], x1)


def test_views_of_a_split_batch_equal_the_whole_batch():
    images = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8)
    views = {"a": "weak", "b": "strong"}
    whole = make_views(images, views, seed=0, step=5, start=0, total=8)
    halves = [make_views(images[i:i + 4], views, seed=0, step=5, start=i, total=8) for i in (0, 4)]
    for name in views:
        assert torch.equal(torch.cat([h[name] for h in halves]), whole[name])
    assert not torch.equal(whole["a"], make_views(images, views, seed=0, step=6, start=0, total=8)["a"])


def test_mix_seed_spreads_nearby_inputs():
    seeds = {mix_seed(0, step, 0) for step in range(1000)}
    assert len(seeds) == 1000 and all(0 <= s < 2 ** 63 for s in seeds)


def test_random_inputs_of_a_split_batch_equal_the_whole_batch():
    views = {"v": torch.zeros(8, 3, 4, 4)}
    spec = {"t": ("steps", 1000), "noise": ("normal", "v")}
    whole = draw_random_inputs(spec, views, seed=0, step=5, start=0, total=8)
    assert whole["t"].shape == (8,) and whole["t"].dtype == torch.long and whole["noise"].shape == (8, 3, 4, 4)
    halves = [draw_random_inputs(spec, {"v": views["v"][i:i + 4]}, seed=0, step=5, start=i, total=8) for i in (0, 4)]
    for name in spec:
        assert torch.equal(torch.cat([h[name] for h in halves]), whole[name])
    other = draw_random_inputs(spec, views, seed=0, step=6, start=0, total=8)
    assert not torch.equal(whole["noise"], other["noise"]) and not torch.equal(whole["t"], other["t"])
    assert 0.5 < whole["noise"].std() < 1.5
