"""rl/sequences.py: taking and concatenating training sequences keeps every field aligned."""
import numpy as np

from masa_jax.rl.sequences import TrainingSequences


def _seqs():
    return TrainingSequences(prompt_ids=[[1], [2], [3]], response_ids=[[4, 5], [6], [7, 8, 9]],
                             sampler_logprobs=[np.array([-1.0, -2.0]), np.array([-3.0]), np.array([-4.0, -5.0, -6.0])],
                             advantages=np.array([0.5, -0.5, 1.0], np.float32), kind=np.array([0, 0, 1], np.int32),
                             problem=np.array([0, 1, 1]))


def test_take_reorders_every_field_and_renumbers_problems():
    s = _seqs().take([2, 0], problem_map=np.array([7, 3]))
    assert s.prompt_ids == [[3], [1]] and s.response_ids == [[7, 8, 9], [4, 5]]
    np.testing.assert_array_equal(s.sampler_logprobs[0], [-4.0, -5.0, -6.0])
    np.testing.assert_array_equal(s.advantages, [1.0, 0.5])
    np.testing.assert_array_equal(s.kind, [1, 0])
    np.testing.assert_array_equal(s.problem, [3, 7])  # old problems 1, 0 -> 3, 7
    assert len(s) == 2


def test_concat_shifts_the_second_batch_problems():
    a, b = _seqs(), _seqs().take([1])
    c = a.concat(b, problem_offset=2)
    assert len(c) == 4 and c.response_ids[-1] == [6]
    np.testing.assert_array_equal(c.problem, [0, 1, 1, 3])
    np.testing.assert_array_equal(c.kind, [0, 0, 1, 0])
    e = TrainingSequences.empty()
    assert len(e) == 0 and len(e.concat(a, 0)) == 3 and e.advantages.dtype == np.float32
