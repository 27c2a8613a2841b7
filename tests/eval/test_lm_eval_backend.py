"""The `masa_jax` lm-eval backend's own behaviour: one sampler call per sampling setting with per-request
budgets and stop strings, seeded sampling, loading through a masa_jax config, and lm-eval's command line
(`python -m masa_jax.evaluation.harness`)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from masa_jax.evaluation import lm_eval_backend, policy  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def _gen(context, **kwargs):
    return Instance(request_type="generate_until", doc={}, arguments=(context, kwargs), idx=0)


@pytest.fixture(scope="module")
def lm(lm_model_dir):
    return lm_eval_backend.MasaJaxLM(pretrained=lm_model_dir, dtype="float32")


def test_generate_until_batches_requests_with_their_own_budgets_and_stops(lm, monkeypatch):
    from masa_jax import sampling
    calls = []
    real = sampling.generate

    def counting(*args, **kwargs):
        calls.append((len(args[2]), kwargs["budgets"], kwargs["sampler"].temperature))  # the rollout engine's call
        return real(*args, **kwargs)

    monkeypatch.setattr(sampling, "generate", counting)
    ctx = "Q: Name a colour.\nA:"
    long_, short = lm.generate_until([_gen(ctx, until=[], max_gen_toks=20), _gen(ctx, until=[], max_gen_toks=6)])
    assert len(calls) == 1 and calls[0] == (2, [20, 6], 0.0)
    assert long_.startswith(short) and len(lm.tok_encode(short)) <= 6 < len(lm.tok_encode(long_))
    stop = long_[7:9]
    calls.clear()
    cut, again = lm.generate_until([_gen(ctx, until=[stop], max_gen_toks=20), _gen(ctx, until=[], do_sample=False,
                                                                                   max_gen_toks=20)])
    assert len(calls) == 1 and again == long_
    assert cut == long_.split(stop)[0]  # cut at the first occurrence, as hf's postprocessing
    # A sampled group is a second call, at its own temperature.
    calls.clear()
    lm.generate_until([_gen(ctx, max_gen_toks=4), _gen(ctx, do_sample=True, temperature=0.7, max_gen_toks=4)])
    assert sorted(c[2] for c in calls) == [0.0, 0.7]


def test_generate_until_shows_progress(lm, capsys):
    """A tqdm bar over the requests (the harness was silent while it generated); disable_tqdm hides it."""
    reqs = [_gen("Q: Name a colour.\nA:", until=[], max_gen_toks=b) for b in (3, 5, 4)]
    lm.generate_until(reqs)
    err = capsys.readouterr().err
    assert "masa_jax generate_until" in err and "3/3" in err
    lm.generate_until(reqs, disable_tqdm=True)
    assert "generate_until" not in capsys.readouterr().err


def test_sampling_is_seeded_and_repeats_differ(lm):
    reqs = [_gen("Q: Say something.\nA:", do_sample=True, temperature=1.0, top_p=0.9, max_gen_toks=16) for _ in range(4)]
    a, b = lm.generate_until(reqs), lm.generate_until(reqs)
    assert a == b  # the same seed and request order
    assert len(set(a)) > 1  # repeats of one prompt are different samples


def test_loglikelihood_is_batch_independent(lm):
    """Left padding and batching do not change a request's score (the same pair alone and among longer ones)."""
    pair = ("Question: 2 + 3\nAnswer:", " 5")
    mk = lambda c, x: Instance(request_type="loglikelihood", doc={}, arguments=(c, x), idx=0)
    alone = lm.loglikelihood([mk(*pair)])[0]
    mixed = lm.loglikelihood([mk("A much longer context that pads the short one on the left. " * 2, " ok"),
                              mk(*pair), mk("x", "yz")])[1]
    # Equal to float32 rounding: the batches' shapes take different matmul / attention-block paths
    # (measured 6e-7 relative); padding leaking into the score would be orders of magnitude more.
    assert abs(alone[0] - mixed[0]) <= 2e-6 * abs(alone[0]) and alone[1] == mixed[1]
    (full,) = lm.loglikelihood_rolling([Instance(request_type="loglikelihood_rolling", doc={},
                                                 arguments=("hello world",), idx=0)])
    ll, _ = lm.loglikelihood([mk("", "hello world")])[0]  # empty context: conditioned on the prefix token
    assert full == pytest.approx(ll, abs=1e-5)


def test_loads_through_a_masa_jax_config(lm_model_dir, lm):
    """checkpoint= + config= (+ config.<field>= overrides), as for a training run."""
    other = lm_eval_backend.MasaJaxLM(checkpoint=lm_model_dir, config=os.path.join(REPO, "configs", "tiny.py"),
                                      **{"config.rollout.num_slots": 8})
    assert other.loaded.config.rollout.num_slots == 8 and other.model_cfg.dtype == "float32"
    mk = Instance(request_type="loglikelihood", doc={}, arguments=("Question: 7 * 6\nAnswer:", " 42"), idx=0)
    assert other.loglikelihood([mk])[0][0] == pytest.approx(lm.loglikelihood([mk])[0][0], abs=1e-6)


def test_run_config_and_argument_errors(tmp_path, lm_model_dir):
    from masa_jax import config as config_lib
    from masa_jax import errors
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    stored = config_lib.resolve(config_lib.base_config()).to_dict()
    stored["model"]["path"] = lm_model_dir
    (run / "config.json").write_text(json.dumps(stored, default=list))
    for where in (run, run / "checkpoints"):
        c = policy.run_config(str(where))
        assert c.model.path == lm_model_dir and tuple(c.mesh.shape) == (1, -1, 1)
    with pytest.raises(errors.UserError, match="pretrained=DIR"):
        lm_eval_backend.load_model()
    with pytest.raises(errors.UserError, match="holds no run config.json"):
        lm_eval_backend.load_model(checkpoint=str(tmp_path))
    with pytest.raises(errors.UserError, match="mesh"):
        lm_eval_backend.parse_mesh("2x2")
    assert lm_eval_backend.parse_mesh("1x-1x1") == (1, -1, 1)


@pytest.mark.slow  # the CLI in a subprocess
def test_harness_cli(lm_model_dir, local_tasks, tmp_path):
    """lm-eval's CLI with the model registered: the README's command on a local task."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "masa_jax.evaluation.harness", "--model", "masa_jax",
                          "--model_args", f"pretrained={lm_model_dir},dtype=float32", "--tasks", "masa_mc",
                          "--include_path", local_tasks, "--output_path", str(tmp_path / "out")],
                         cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "masa_mc" in res.stdout and "acc" in res.stdout
    files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "out") for f in fs if f.endswith(".json")]
    results = json.load(open(files[0]))["results"]["masa_mc"]
    assert 0.0 <= results["acc,none"] <= 1.0


@pytest.mark.slow  # four-device meshes in a subprocess
def test_sharded_meshes_give_the_one_device_results(lm_model_dir, lm):
    """On 4 fake CPU devices, fsdp 4 and data 2 x tensor 2: the same log-likelihoods (1e-4: tensor-parallel sums
    round differently) and greedy generations
    as on one device (the sharded run is a subprocess: the device count is fixed when jax starts)."""
    spec = importlib.util.spec_from_file_location("sharded_backend_check", os.path.join(HERE, "sharded_backend_check.py"))
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    GEN, LL = check.GEN, check.LL
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip())
    proc = subprocess.run([sys.executable, os.path.join(HERE, "sharded_backend_check.py"), lm_model_dir, "1x4x1",
                           "2x1x2"], env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[len("RESULT "):])
    ll = lm.loglikelihood([Instance("loglikelihood", {}, pair, 0) for pair in LL])
    gen = lm.generate_until([Instance("generate_until", {}, (c, {"until": ["."], "max_gen_toks": 12}), 0) for c in GEN])
    assert result["1x4x1"]["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert result["2x1x2"]["mesh"] == {"data": 2, "fsdp": 1, "tensor": 2}
    for mesh, r in result.items():
        assert max(abs(a - b) for a, b in zip(r["ll"], (x for x, _ in ll))) < 1e-4, mesh
        assert r["greedy"] == [g for _, g in ll], mesh
        assert r["gen"] == gen, mesh


@pytest.mark.slow  # the CLI in a subprocess
@pytest.mark.parametrize("bad", ["missing", "not_hf"])
def test_harness_cli_bad_pretrained_is_one_line(bad, local_tasks, tmp_path):
    """A bad ``pretrained`` ends the harness with one line naming it and exit 2, not lm-eval's traceback."""
    path = tmp_path / "no_such_model"
    if bad == "not_hf":
        path.mkdir()
        (path / "notes.txt").write_text("not a model")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "masa_jax.evaluation.harness", "--model", "masa_jax",
                          "--model_args", f"pretrained={path}", "--tasks", "masa_mc",
                          "--include_path", local_tasks, "--output_path", str(tmp_path / "out")],
                         cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(path) in last, last
