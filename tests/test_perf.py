"""Model FLOPs, token counts and MFU of a step (masa_jax.perf) against numbers worked out by hand."""
import jax
import pytest

from masa_jax import perf
from masa_jax.models import qwen

# V=10, H=4, I=8, L=2, 2 query heads and 1 KV head of size 2.
CFG = qwen.ModelConfig(family="qwen3", vocab_size=10, hidden_size=4, intermediate_size=8, num_layers=2,
                       num_heads=2, num_kv_heads=1, head_dim=2, tie_word_embeddings=True)


def test_matmul_params_by_hand_and_against_the_model():
    # Per layer: q 4x4, k 4x2, v 4x2, o 4x4, gate / up / down 3 x 4x8 = 16+8+8+16+96 = 144; LM head 10x4.
    assert perf.matmul_params(CFG) == 2 * 144 + 40
    # The same count from the model's own params (untied: the LM head is a param of its own).
    untied = CFG.replace(tie_word_embeddings=False)
    params = qwen.init_params(untied, jax.random.key(0))
    projections = sum(x.size for path, x in jax.tree_util.tree_leaves_with_path(params)
                      if jax.tree_util.keystr(path).endswith(("_proj']", "['lm_head']")))
    assert perf.matmul_params(untied) == projections


def test_forward_and_update_flops_by_hand():
    # T=3: 2 N T = 2*328*3 = 1968; causal attention 2 L h d T (T+1) = 2*2*2*2*3*4 = 192.
    assert perf.forward_flops(CFG, [3]) == 1968 + 192
    # T=1 adds 2*328 + 2*2*2*2*1*2 = 656 + 32.
    assert perf.forward_flops(CFG, [3, 1]) == 2160 + 688
    # Old log-probs (1 forward) + 2 epochs x (forward + backward = 3 forwards) + a reference forward each.
    c = perf.update_counts(CFG, [3, 1], ppo_epochs=2, reference=True)
    assert c == {"tokens/update": 4 * 3, "flops/update": 2848 * (1 + 2 * 4)}
    assert perf.update_counts(CFG, [], ppo_epochs=1, reference=False) == {"tokens/update": 0.0, "flops/update": 0.0}


def test_step_metrics_rates_and_mfu():
    m = {"tokens/solution": 30.0, "tokens/meta": 10.0, "tokens/update": 400.0, "flops/update": 1e6,
         "time/rollout_s": 2.0, "time/update_s": 0.5}
    out = perf.step_metrics(CFG, m, 4.0, peak_override=1e5)
    assert out["perf/rollout_tokens_per_s"] == 20.0 and out["perf/update_tokens_per_s"] == 800.0
    # (2 N x 40 generated + update FLOPs) / (4 s x devices x 1e5)
    assert out["perf/mfu"] == pytest.approx((2 * 328 * 40 + 1e6) / (4.0 * jax.device_count() * 1e5))


def test_peak_flops_table_override_and_unknown_devices(monkeypatch):
    assert perf.peak_flops_per_device("TPU v5 lite") == 197e12
    assert perf.peak_flops_per_device("TPU v5p") == perf.peak_flops_per_device("TPU v5") == 459e12
    assert perf.peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
    assert perf.peak_flops_per_device("TPU v5 lite", override=1.0) == 1.0
    assert perf.peak_flops_per_device("cpu") is None
    # No peak (a device the table lacks, no override): rates are logged, MFU is not guessed.
    monkeypatch.setattr(perf, "PEAK_BF16_FLOPS", {})
    out = perf.step_metrics(CFG, {"tokens/solution": 1.0, "time/rollout_s": 1.0}, 1.0)
    assert "perf/mfu" not in out and out["perf/rollout_tokens_per_s"] == 1.0
