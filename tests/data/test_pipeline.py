"""Tests for masa_jax.data.pipeline: shuffling, epochs, per-host sharding and resumable state."""

import collections
import json
import os

import pytest

from masa_jax.data import pipeline, sources
from masa_jax.data.problem import Problem
from masa_jax.toy import world

SAMPLE = os.path.join(os.path.dirname(__file__), "math_sample.parquet")


def _problems(n):
    return tuple(Problem(uid=f"p:{i}", question=f"q{i}", answer=str(i), row=i) for i in range(n))


def _uids(batch):
    return [p.uid for p in batch]


def test_batches_are_lists_of_problems_from_a_real_file():
    problems = sources.load_verl_parquet(SAMPLE).problems
    it = pipeline.batches(problems, batch_size=8, seed=0, num_epochs=1, process_index=0, process_count=1)
    got = list(it)
    assert len(got) == 4
    assert all(isinstance(b, list) and len(b) == 8 and all(isinstance(p, Problem) for p in b) for b in got)
    assert sorted(p.uid for b in got for p in b) == sorted(p.uid for p in problems)
    assert [p.uid for b in got for p in b] != [p.uid for p in problems]  # shuffled


def test_shuffle_is_seeded_and_reshuffles_each_epoch():
    problems = _problems(20)

    def run(seed):
        it = pipeline.batches(problems, batch_size=5, seed=seed, num_epochs=2, process_index=0, process_count=1)
        return [p.uid for b in it for p in b]

    a, b, c = run(7), run(7), run(8)
    assert a == b and a != c
    first, second = a[:20], a[20:]
    assert sorted(first) == sorted(second) == sorted(p.uid for p in problems)
    assert first != second


def test_no_shuffle_keeps_order_and_repeats_forever():
    it = pipeline.batches(_problems(5), batch_size=3, shuffle=False, process_index=0, process_count=1)
    got = [_uids(next(it)) for _ in range(4)]
    assert got == [["p:0", "p:1", "p:2"], ["p:3", "p:4", "p:0"], ["p:1", "p:2", "p:3"], ["p:4", "p:0", "p:1"]]
    assert it.epoch == pytest.approx(12 / 5)


@pytest.mark.parametrize("n, hosts, batch, epochs", [(40, 4, 3, 2), (37, 3, 2, 1), (10, 2, 1, 3)])
def test_hosts_are_disjoint_cover_and_stay_in_step(n, hosts, batch, epochs):
    problems = _problems(n)
    per_host = [
        list(pipeline.batches(problems, batch_size=batch, seed=3, num_epochs=epochs, process_index=h, process_count=hosts))
        for h in range(hosts)
    ]
    # Every host takes the same number of steps (collectives would hang otherwise).
    assert len({len(b) for b in per_host}) == 1
    steps = len(per_host[0])
    assert steps == (n * epochs) // (batch * hosts)
    # Step s of all hosts together is one contiguous window of the single global stream.
    global_stream = [
        p.uid
        for b in pipeline.batches(
            problems, batch_size=batch * hosts, seed=3, num_epochs=epochs, process_index=0, process_count=1
        )
        for p in b
    ]
    for s in range(steps):
        window = global_stream[s * batch * hosts : (s + 1) * batch * hosts]
        union = [u for h in range(hosts) for u in _uids(per_host[h][s])]
        assert sorted(union) == sorted(window)
    # Within each epoch the hosts never read the same problem twice, and cover it when it divides.
    all_seen = collections.Counter(u for h in range(hosts) for b in per_host[h] for u in _uids(b))
    assert max(all_seen.values()) <= epochs
    if (n * epochs) % (batch * hosts) == 0:
        assert all_seen == collections.Counter({p.uid: epochs for p in problems})


def test_one_epoch_hosts_are_disjoint_and_covering():
    problems = _problems(24)
    seen = [
        [u for b in pipeline.batches(problems, batch_size=4, seed=1, num_epochs=1, process_index=h, process_count=3)
         for u in _uids(b)]
        for h in range(3)
    ]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not set(seen[i]) & set(seen[j])
    assert sorted(u for s in seen for u in s) == sorted(p.uid for p in problems)


def test_drop_remainder_false_keeps_the_tail():
    it = pipeline.batches(_problems(7), batch_size=3, seed=0, num_epochs=1, drop_remainder=False,
                          process_index=0, process_count=1)
    assert [len(b) for b in it] == [3, 3, 1]


@pytest.mark.parametrize("hosts, host", [(1, 0), (2, 1)])
def test_resume_from_saved_state_yields_identical_batches(hosts, host):
    problems = sources.load_verl_parquet(SAMPLE).problems
    kwargs = dict(batch_size=3, seed=11, process_index=host, process_count=hosts)
    it = pipeline.batches(problems, **kwargs)
    for _ in range(7):  # cross an epoch boundary before and after the save
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    expected = [_uids(next(it)) for _ in range(12)]

    resumed = pipeline.batches(problems, **kwargs)
    resumed.set_state(state)
    assert [_uids(next(resumed)) for _ in range(12)] == expected
    assert resumed.batches_consumed == it.batches_consumed == 19


def test_set_state_rejects_another_configuration():
    problems = _problems(30)
    it = pipeline.batches(problems, batch_size=3, seed=1, process_index=0, process_count=1)
    next(it)
    state = it.get_state()
    other = pipeline.batches(problems, batch_size=3, seed=2, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="different configuration.*seed"):
        other.set_state(state)
    with pytest.raises(ValueError, match="version"):
        other.set_state({**state, "version": 99})


def test_unbounded_toy_source_shards_and_resumes():
    src = world.source(seed=5)
    hosts = [pipeline.batches(src, batch_size=2, process_index=h, process_count=2) for h in range(2)]
    b0, b1 = next(hosts[0]), next(hosts[1])
    assert [p.row for p in b0] == [0, 2] and [p.row for p in b1] == [1, 3]
    assert b0[0] == world.problem_at(0, seed=5)
    state = hosts[0].get_state()
    expected = [[p.uid for p in next(hosts[0])] for _ in range(3)]
    again = pipeline.batches(src, batch_size=2, process_index=0, process_count=2)
    again.set_state(state)
    assert [[p.uid for p in next(again)] for _ in range(3)] == expected
    assert expected[0] == ["toy-5:4", "toy-5:6"]


def test_argument_checks_and_defaults():
    with pytest.raises(ValueError, match="batch_size"):
        pipeline.batches(_problems(3), batch_size=0, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="process_index"):
        pipeline.batches(_problems(3), batch_size=1, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="empty"):
        pipeline.batches((), batch_size=1, process_index=0, process_count=1)
    it = pipeline.batches(_problems(3), batch_size=1)  # host from jax: a single process here
    assert (it.config.process_index, it.config.process_count) == (0, 1)
    assert pipeline.per_host_batch_size(128, 4) == 32
    with pytest.raises(ValueError, match="not divisible"):
        pipeline.per_host_batch_size(128, 3)
    assert pipeline.steps_per_epoch(7500, 128) == 58
