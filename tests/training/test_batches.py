"""The step-indexed batch order: a function of the step, split across ranks, two streams joined."""

from __future__ import annotations

from ccm_sdk.training.batches import JointBatches, StepBatches


def test_step_batches_are_a_function_of_the_step():
    full = StepBatches(10, 3, seed=5, stop=8)
    batches = list(full)
    assert batches == list(StepBatches(10, 3, seed=5, stop=8)) and len(batches) == 8
    assert list(StepBatches(10, 3, seed=5, start=5, stop=8)) == batches[5:]  # resuming needs only the step
    stream = [i for b in batches for i in b]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))  # whole epochs
    assert stream[:10] != stream[10:20]  # a new permutation each epoch
    assert all(len(b) == 3 for b in StepBatches(2, 3, seed=0, stop=4))  # smaller than a batch: wraps


def test_ranks_split_each_global_batch():
    ranks = [list(StepBatches(12, 2, seed=1, rank=r, world_size=3, stop=2)) for r in range(3)]
    single = list(StepBatches(12, 6, seed=1, stop=2))
    for step in range(2):
        assert [i for r in ranks for i in r[step]] == single[step]


def test_joint_batches_concatenate_two_streams():
    joint = list(JointBatches(StepBatches(3, 2, seed=0, stop=3), StepBatches(5, 2, seed=1, stop=3, offset=3)))
    assert all(len(b) == 4 and max(b[:2]) < 3 <= min(b[2:]) for b in joint)
