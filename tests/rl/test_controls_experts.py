"""MASA-efficient controls (gating, cutoff budgets, hints), expert selection / rewriting, batching and
the switch-over rule, against hand-computed values."""
import numpy as np

from masa_jax import train
from masa_jax.config import base_config
from masa_jax.rewards import meta
from masa_jax.rl import prompts
from masa_jax.rl import batching, controls, expert_buffer

MP = meta.MetaPrediction


def test_gating_needs_agreeing_extreme_predictions():
    rows = [
        [MP(("a",), 1.0, 10), MP(("a",), 1.0, 12)],          # all agree: always solved -> gated
        [MP(None, 0.0, 10), MP(None, 0.0, None)],             # all agree: never solved -> gated
        [MP(None, 1.0, 10), MP(None, 0.75, 10)],              # std 0.125 >= 0.1 -> kept
        [MP(None, 0.5, 10), MP(None, 0.5, 10)],               # agree, but not extreme -> kept
        [MP(None, 1.0, 10), MP(None, None, 10)],              # one parsed pass rate: no evidence -> kept
    ]
    c = controls.compute_controls(rows, 64, controls.ControlConfig())
    np.testing.assert_array_equal(c.gated, [True, True, False, False, False])
    # Budgets: ceil(2 x mean predicted length), capped, the max where nothing parsed.
    np.testing.assert_array_equal(c.budgets, [22, 20, 20, 20, 20])
    c2 = controls.compute_controls([[MP(None, 0.5, 40)], [MP(None, 0.5, None)]], 64, controls.ControlConfig())
    np.testing.assert_array_equal(c2.budgets, [64, 64])
    tol = controls.compute_controls([rows[2]], 64, controls.ControlConfig(gate_std=0.2, gate_tol=0.15))
    assert tol.gated[0]  # mean 0.875 >= 1 - 0.15 and std 0.125 < 0.2


def test_hints_are_the_most_frequent_notions_and_off_when_disabled():
    row = [MP(("carry", "add"), 0.5, 9), MP(("add", "add"), 0.5, 9), MP(("borrow",), 0.5, 9)]
    c = controls.compute_controls([row], 64, controls.ControlConfig(max_hint_notions=2))
    assert c.hints == (("add", "carry"),)
    off = controls.compute_controls([row], 64, controls.ControlConfig(), use_hints=False)
    assert off.hints == ((),)
    assert prompts.hint_suffix(c.hints[0]) == "\n\nHint: the problem can be solved using these notions: add, carry."


def test_control_metrics_precision_before_the_switch():
    c = controls.Controls(gated=np.array([True, True, False]), budgets=np.array([4, 64, 4]), hints=((), (), ()),
                          pred_pass_mean=np.array([1.0, 0.0, 0.5]), pred_length_mean=np.array([2.0, 32.0, 2.0]))
    correct = np.array([[1, 1], [1, 0], [0, 1]], bool)
    lengths = np.array([[3, 5], [10, 70], [2, 9]])
    m = controls.control_metrics(c, correct, lengths, np.zeros((3, 2), bool), 64, applied=False)
    assert m["gate/would_gate_fraction"] == 2 / 3
    assert m["gate/would_gate_precision"] == 0.5          # problem 0 really all right; problem 1 was not all wrong
    assert m["cutoff/would_cut_fraction"] == 3 / 6        # lengths 5, 70, 9 exceed their budgets
    assert m["cutoff/would_cut_precision"] == 1 / 3       # of those, only the 70-token one was wrong
    assert m["cutoff/would_save_tokens"] == 1 + 6 + 5


def test_experts_take_the_best_notion_rollout_and_the_true_statistics():
    texts = [["<meta>think A</meta>{}", "<meta>think B</meta>{}"], ["<meta>x</meta>{}", "<meta>y</meta>{}"]]
    preds = [[MP(("carry",), 0.0, 5), MP(("add", "carry"), 1.0, 50)], [MP(("a",), 0.5, 5), MP(("b",), 0.5, 5)]]
    notion = np.array([[0.5, 1.0], [0.1, 0.0]])
    correct = np.array([[1, 1, 0, 0], [0, 0, 0, 0]], bool)
    lengths = np.array([[10, 20, 99, 99], [7, 9, 11, 13]])
    ex = expert_buffer.select_experts(texts, preds, notion, correct, lengths, [[1, 2], [3]], ["u0", "u1"],
                                      np.array([True, True]), k=8, min_notion_reward=0.2)
    assert len(ex) == 1 and ex[0].uid == "u0" and ex[0].prompt_ids == (1, 2)
    parsed = meta.parse(ex[0].output, k=8)
    assert parsed == MP(("add", "carry"), 0.5, 15)      # 2/4 correct -> 4/8; mean correct length 15
    assert "think B" in ex[0].output
    p_int, length = expert_buffer.true_targets(correct, lengths, 8)
    np.testing.assert_array_equal(p_int, [4, 0])
    np.testing.assert_array_equal(length, [15, 10])      # no correct rollout: mean of all lengths
    gated = expert_buffer.select_experts(texts, preds, notion, correct, lengths, [[1, 2], [3]], ["u0", "u1"],
                                         np.array([False, True]), k=8, min_notion_reward=0.2)
    assert gated == []


def test_expert_pass_rate_targets_round_half_up_and_keep_mixed_groups_inside_1_to_k_minus_1():
    """Issue 11.3. G = 16, K = 8: n correct -> n / 2 rounded, halves up; a mixed group never gets 0 or K
    (the values the gate skips), only an all-wrong / all-right group does."""
    n_correct = np.array([0, 1, 2, 3, 5, 8, 13, 15, 16])
    correct = np.arange(16)[None, :] < n_correct[:, None]
    p_int, _ = expert_buffer.true_targets(correct, np.ones((9, 16), int), 8)
    np.testing.assert_array_equal(p_int, [0, 1, 1, 2, 3, 4, 7, 7, 8])
    # G = 4, K = 8: no rounding at all.
    p4, _ = expert_buffer.true_targets(np.arange(4)[None, :] < np.array([[1], [3]]), np.ones((2, 4), int), 8)
    np.testing.assert_array_equal(p4, [2, 6])


def test_buffer_fills_drains_and_round_trips():
    buf = expert_buffer.ExpertBuffer(2)
    buf.add([expert_buffer.Expert((1,), "o", "u")])
    assert not buf.full
    buf.add([expert_buffer.Expert((2, 3), "p", "v")])
    assert buf.full
    again = expert_buffer.ExpertBuffer.from_json(buf.to_json())
    assert again.items == buf.items
    assert len(buf.drain()) == 2 and buf.items == []


def test_pack_sequences_masks_and_buckets():
    b = batching.pack_sequences([[5, 6], [7]], [[8, 9, 10], [11]], pad_id=0, row_multiple=4, buckets=(4, 8),
                                advantages=np.array([1.0, -1.0]), sampler_logprobs=[np.array([-1, -2, -3.0]),
                                                                                    np.array([-4.0])])
    assert b["tokens"].shape == (4, 8)
    np.testing.assert_array_equal(b["tokens"][0], [5, 6, 8, 9, 10, 0, 0, 0])
    np.testing.assert_array_equal(b["loss_mask"][0], [0, 0, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(b["attention_mask"][1], [1, 1, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(b["sampler_logprobs"][1, :2], [0, -4])
    np.testing.assert_array_equal(b["advantages"], [1, -1, 0, 0])
    assert not b["loss_mask"][2:].any()
    assert batching.bucket_length(9, (4, 8)) == 16 and batching.default_buckets(100) == (64, 128)


def test_switch_over_at_step_k_or_by_the_meta_reward_average():
    c = base_config()
    c.algorithm = "masa_efficient"
    c.efficient.switch_step = 5
    loop = train.LoopState(step=4)
    assert not train.efficient_active(c, loop)
    loop.step = 5
    assert train.efficient_active(c, loop) and loop.switched_at == 5
    c.efficient.auto_switch_threshold = 0.6
    c.efficient.auto_switch_window = 3
    loop = train.LoopState(step=1, meta_reward_history=[0.2, 0.7, 0.7])
    assert not train.efficient_active(c, loop)            # moving average 0.53 < 0.6
    loop.meta_reward_history.append(0.8)
    assert train.efficient_active(c, loop) and loop.switched_at == 1
    loop.meta_reward_history.append(0.0)                  # once switched, it stays switched
    assert train.efficient_active(c, loop)
    c.algorithm = "masa"
    assert not train.efficient_active(c, train.LoopState(step=100))
