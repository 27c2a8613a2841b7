"""masa_jax against the JAX peer Tunix (PyPI google-tunix 0.1.7) on one tiny Qwen3 checkpoint (issue 23).

    pip install -e ".[dev,bench]"            # Tunix pins the same jax / flax as masa_jax
    python experiments/bench_peer.py         # the issue's table (minutes on 2 CPU cores)
    python experiments/bench_peer.py --quick # smoke run of every code path (tiny sizes; its time is compilation)

Both sides run in this one process on the same JAX stack and the same weights: a Qwen3 checkpoint
(hidden 256, ffn 768, 4 layers, 4 / 2 heads, head_dim 64, vocab 1024, tied, float32) is built offline
with transformers (`save_pretrained`, random init at seed --seed) and loaded by each side through its
own HF loader: `masa_jax.models.qwen.from_pretrained` and Tunix's
`tunix.models.qwen3.params.create_model_from_safe_tensors`.

Cases (each timed in rounds A B B A after --warmup untimed calls per side; medians reported):
  sampling   batch 1 and batch 64 (--batches), prompt 128 random tokens, 128 new tokens, no EOS, greedy
             and temperature 1 (top-p 1, no top-k). masa_jax: `sampling.generate` on token lists;
             Tunix: `generate.sampler.Sampler.__call__` on the same prompts as text through an
             identity tokenizer ("12 7 ..." <-> [12, 7, ...]; its host work is part of Tunix's API).
  update     one GRPO / PPO update on 16 x 256 tokens (first 64 prompt, the rest completion), random
             advantages, old log-probs precomputed by each side with its own forward, same loss
             settings on both: clipped surrogate with clip 0.2 / 0.28 (clip-higher), dual clip 10,
             token-mean, no KL, temperature 1; AdamW (lr 1e-6, b 0.9 / 0.999, eps 1e-8, decay 0.1)
             after global-norm clipping at 1.0, constant lr. masa_jax: `rl.train_step.make_train_step`
             (as experiments/bench_train_step.py drives it); Tunix: its registered "grpo" policy
             loss `tunix.rl.algo_core.grpo_loss_fn` under `nnx.value_and_grad` + `nnx.Optimizer`
             inside `nnx.jit(donate optimizer)` + `nnx.cached_partial`, exactly as
             `tunix.sft.peft_trainer.PeftTrainer._train_step` / `jit_train_and_eval_step` run it.
             --update-groups 1,8: first with every row its own prompt (the issue's case), then with
             the rows in GRPO groups of 8 sharing their prompt (2 prompts x 8 rollouts), where masa_jax
             packs the shared-prefix layout the trainer uses (`batching.pack_shared`: each prompt's
             forward once) and Tunix trains on the same 16 rows as always.
  compile    the first call of each side's sampler (batch 1, greedy): tracing + compilation + one run
             (masa_jax's comes first; JAX's backend is started before either).

Cross-check (real numbers from both sides, printed and asserted by tests/test_bench_peer.py): greedy
tokens equal between masa_jax, Tunix and transformers `generate` (every prompt of every batch size);
old log-probs of the update batch agree; the first update's loss and gradient norm (before clipping)
equal within float32 rounding. The ratio column is a speed ratio (> 1: masa_jax is faster): tok/s
masa_jax / Tunix for sampling, seconds Tunix / masa_jax for the update and the compile.
The last line is a JSON record for docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import importlib.metadata as md
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

SHAPE = dict(vocab_size=1024, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, tie_word_embeddings=True)
PAD_ID, EOS_ID = -1, -2  # never a real token: no prompt padding, no EOS (every row makes `new` tokens)
LOSS_TOL = dict(rtol=1e-5, atol=1e-6)   # float32 rounding of two different reduction orders
GRAD_NORM_RTOL = 1e-4
LOGPROB_ATOL = 1e-4


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "absent"


def machine_facts() -> dict:
    import jax
    return {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "host": platform.node(), "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "loadavg_start": [round(x, 2) for x in os.getloadavg()],
            "jax_device": str(jax.devices()[0].device_kind), "python": platform.python_version(),
            **{d: _version(d) for d in ("jax", "jaxlib", "flax", "optax", "google-tunix", "transformers", "torch")}}


# ------------------------------------------------------------------------------------- checkpoint


def build_checkpoint(path: str, seed: int):
    """The tiny Qwen3 as an HF directory (config.json + model.safetensors); returns the torch model."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM
    cfg = Qwen3Config(**SHAPE, max_position_embeddings=4096, rms_norm_eps=1e-6, bos_token_id=None,
                      eos_token_id=None, pad_token_id=None,
                      rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg).float().eval()
    model.save_pretrained(path)
    return model


def _hf_rope_theta(hf: dict) -> float:
    # transformers 5 writes rope_theta under rope_parameters, 4 at the top level.
    rope = hf.get("rope_parameters") or {}
    return float(rope.get("rope_theta", hf.get("rope_theta", 1_000_000.0)))


def hf_greedy(model, prompts: np.ndarray, new: int) -> list[list[int]]:
    import torch
    ids = torch.tensor(prompts, dtype=torch.long)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                             min_new_tokens=new, eos_token_id=None, pad_token_id=0)
    return out[:, prompts.shape[1]:].tolist()


# ------------------------------------------------------------------------------------------- masa_jax


class Ours:
    name = "masa_jax"

    def __init__(self, ckpt: str, args):
        import jax

        from masa_jax import sampling
        from masa_jax.models import qwen
        from masa_jax.parallel.mesh import make_mesh
        from masa_jax.rl import train_step as ts
        self.jax, self.sampling, self.ts = jax, sampling, ts
        self.mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
        self.cfg, params = qwen.from_pretrained(ckpt, mesh=self.mesh, remat=args.remat, scan_unroll=args.scan_unroll,
                                                scan_layers=args.scan_layers)
        self.sp = sampling.to_sampling_params(self.cfg, params)
        self.params = params
        self.host_params = jax.device_get(params)  # what every update case starts from
        self.args = args
        self.seed = 0

    def sample(self, prompts: np.ndarray, new: int, temperature: float) -> list[list[int]]:
        self.seed += 1
        out = self.sampling.generate(self.cfg, self.sp, prompts.tolist(), rng=self.jax.random.key(self.seed),
                                     max_new_tokens=new, temperature=temperature, top_p=1.0, top_k=0,
                                     num_slots=len(prompts))
        return out.tokens

    def setup_update(self, batch: dict, optim: dict, loss: dict):
        """-> (one_step, first-step metrics, old log-probs [N, T]). one_step() runs an update to completion."""
        ts, jax = self.ts, self.jax
        ocfg = ts.OptimConfig(lr=optim["lr"], warmup_steps=0, weight_decay=optim["weight_decay"],
                              clip_norm=optim["clip_norm"], b1=optim["b1"], b2=optim["b2"], eps=optim["eps"])
        lcfg = ts.LossConfig(clip_low=loss["clip_low"], clip_high=loss["clip_high"], clip_c=loss["clip_c"],
                             loss_agg="token-mean", temperature=loss["temperature"], chunk_size=self.args.chunk)
        T, P = batch["tokens"].shape[1], batch["prompt_len"]
        mb = self.args.micro_batch or len(batch["tokens"])
        place = None
        if batch["groups"] > 1:  # rows share prompts: the shared-prefix layout, as the trainer packs it
            from masa_jax.rl import batching
            ours, place = batching.pack_shared([r[:P].tolist() for r in batch["tokens"]],
                                               [r[P:].tolist() for r in batch["tokens"]], pad_id=0,
                                               rows_per_block=mb, advantages=batch["advantages"])
        else:
            ours = dict(tokens=batch["tokens"], attention_mask=np.ones_like(batch["tokens"], bool),
                        loss_mask=np.arange(T)[None, :].repeat(len(batch["tokens"]), 0) >= P,
                        advantages=batch["advantages"])
        # From the host copy: each case's train state is donated by its steps.
        holder = {"state": ts.create_train_state(self.cfg, self.host_params, ocfg, self.mesh)}
        clp = ts.make_compute_logprobs(self.cfg, self.mesh, mb, temperature=loss["temperature"],
                                       chunk_size=self.args.chunk)
        step = ts.make_train_step(self.cfg, lcfg, ocfg, self.mesh, mb)
        with jax.set_mesh(self.mesh):
            old, _ = clp(holder["state"].params, ours)
            jax.block_until_ready(old)
        ours["old_logprobs"] = old

        def one_step():
            with jax.set_mesh(self.mesh):
                holder["state"], m = step(holder["state"], ours)
                jax.block_until_ready((holder["state"], m))
            return m

        m = one_step()
        first = {"loss": float(m["loss"]), "grad_norm": float(m["grad_norm"])}
        old = np.asarray(old)
        return one_step, first, old[place[:, 0], place[:, 1]] if place is not None else old[:, P:]


# ---------------------------------------------------------------------------------------------- Tunix


class IdTokenizer:
    """Identity text <-> ids tokenizer (the TokenizerAdapter "NONE" protocol): Tunix's sampler takes text."""

    def encode(self, text: str, **kw) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids, **kw) -> str:
        return " ".join(str(int(i)) for i in ids)

    def bos_id(self):
        return None

    def eos_id(self) -> int:
        return EOS_ID

    def pad_id(self) -> int:
        return PAD_ID


class Tunix:
    name = "tunix"

    def __init__(self, ckpt: str, args):
        import jax
        import jax.numpy as jnp
        from tunix.models.qwen3 import model as model_lib
        from tunix.models.qwen3 import params as params_lib
        self.jax, self.jnp = jax, jnp
        with open(os.path.join(ckpt, "config.json")) as f:
            hf = json.load(f)
        self.mcfg = model_lib.ModelConfig(
            num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"], embed_dim=hf["hidden_size"],
            hidden_dim=hf["intermediate_size"], num_heads=hf["num_attention_heads"], head_dim=hf["head_dim"],
            num_kv_heads=hf["num_key_value_heads"], rope_theta=_hf_rope_theta(hf), norm_eps=hf["rms_norm_eps"],
            use_tied_embedding=hf["tie_word_embeddings"], dtype=jnp.float32, param_dtype=jnp.float32)
        self.ckpt = ckpt
        self.model = params_lib.create_model_from_safe_tensors(ckpt, self.mcfg, dtype=jnp.float32)
        self.args = args
        self.samplers = {}
        self.seed = 0

    def _sampler(self, cache_size: int):
        from tunix.generate import sampler as sampler_lib
        if cache_size not in self.samplers:
            cc = sampler_lib.CacheConfig(cache_size=cache_size, num_layers=self.mcfg.num_layers,
                                         num_kv_heads=self.mcfg.num_kv_heads, head_dim=self.mcfg.head_dim)
            self.samplers[cache_size] = sampler_lib.Sampler(self.model, IdTokenizer(), cc)
        return self.samplers[cache_size]

    def sample(self, prompts: np.ndarray, new: int, temperature: float) -> list[list[int]]:
        self.seed += 1
        P = prompts.shape[1]
        sampler = self._sampler(P + new)
        texts = [" ".join(map(str, row)) for row in prompts.tolist()]
        kw = dict(temperature=temperature, top_p=1.0, top_k=None, seed=self.seed) if temperature > 0 else {}
        out = sampler(texts, max_generation_steps=new, max_prompt_length=P, eos_tokens=[EOS_ID], **kw)
        return [np.asarray(t).tolist() for t in out.tokens]

    def setup_update(self, batch: dict, optim: dict, loss: dict):
        import optax
        from flax import nnx
        from tunix.models.qwen3 import params as params_lib
        from tunix.rl import algo_core, common
        from tunix.rl.grpo import grpo_learner
        jax, jnp = self.jax, self.jnp
        # A fresh model: the sampler's copy stays as loaded.
        model = params_lib.create_model_from_safe_tensors(self.ckpt, self.mcfg, dtype=jnp.float32)
        algo = grpo_learner.GRPOConfig(num_generations=2, beta=0.0, epsilon=loss["clip_low"],
                                       loss_agg_mode="token-mean", loss_algo="grpo")
        # Read by grpo_loss_fn with hasattr / getattr; GRPOLearner sets temperature from its rollout config.
        algo.epsilon_high = loss["clip_high"]
        algo.epsilon_c = loss["clip_c"]
        algo.temperature = loss["temperature"]
        tx = optax.chain(optax.clip_by_global_norm(optim["clip_norm"]),
                         optax.adamw(optim["lr"], b1=optim["b1"], b2=optim["b2"], eps=optim["eps"],
                                     weight_decay=optim["weight_decay"]))
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        P = batch["prompt_len"]
        prompt = jnp.asarray(batch["tokens"][:, :P])
        completion = jnp.asarray(batch["tokens"][:, P:])
        cmask = jnp.ones(completion.shape, jnp.int32)

        graphdef, state = nnx.split(model)
        # The old log-probs as Tunix's rollout side computes them (no gradient), jitted over the state.
        old_fn = jax.jit(lambda st, p, c: common.compute_per_token_logps(
            graphdef, st, prompt_tokens=p, completion_tokens=c, pad_id=PAD_ID, eos_id=EOS_ID,
            stop_gradient=True, temperature=loss["temperature"]))
        old = old_fn(state, prompt, completion)
        jax.block_until_ready(old)
        example = grpo_learner.TrainExample(
            prompt_ids=prompt, prompt_mask=jnp.ones(prompt.shape, jnp.int32), completion_ids=completion,
            completion_mask=cmask, advantages=jnp.asarray(batch["advantages"]), ref_per_token_logps=None,
            old_per_token_logps=old)
        def loss_fn(model, train_example):  # as GRPOLearner binds the registered "grpo" policy loss
            return algo_core.grpo_loss_fn(model, train_example, algo, PAD_ID, EOS_ID)

        def train_step(model, optimizer, train_example):  # PeftTrainer._train_step, without LoRA
            grad_fn = nnx.value_and_grad(loss_fn, argnums=0, has_aux=True)
            (value, aux), grads = grad_fn(model, train_example)
            grad_norm = optax.global_norm(grads)
            optimizer.update(model, grads)
            return value, aux, grad_norm

        jitted = nnx.jit(train_step, donate_argnames=("optimizer",))
        step = functools.partial(nnx.cached_partial(jitted, model, optimizer))

        def one_step():
            value, aux, grad_norm = step(example)
            jax.block_until_ready((value, grad_norm, nnx.state(model)))
            return {"loss": value, "grad_norm": grad_norm}

        m = one_step()
        first = {"loss": float(m["loss"]), "grad_norm": float(m["grad_norm"])}
        return one_step, first, np.asarray(old)


# ----------------------------------------------------------------------------------------- timing


def abba(fns: dict, rounds: int) -> dict[str, list[float]]:
    """Rounds of A B B A (each side twice per round); wall-clock seconds per call."""
    (a, fa), (b, fb) = fns.items()
    times = {a: [], b: []}
    for _ in range(rounds):
        for name, fn in ((a, fa), (b, fb), (b, fb), (a, fa)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: prompt 16, 16 new, batches 1,4, update 4 x 64, 1 round")
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=None)
    ap.add_argument("--prompt", type=int, default=None, help="sampling prompt length (default 128)")
    ap.add_argument("--new", type=int, default=None, help="new tokens per sequence (default 128)")
    ap.add_argument("--train-batch", type=int, default=None, help="update sequences (default 16)")
    ap.add_argument("--train-seq", type=int, default=None, help="update tokens per sequence (default 256)")
    ap.add_argument("--micro-batch", type=int, default=None, help="masa_jax micro-batch (default: whole batch)")
    ap.add_argument("--update-groups", type=lambda s: [int(x) for x in s.split(",")], default=None,
                    help="rollouts per prompt of the update cases (default 1,8: every row its own prompt, then "
                         "GRPO groups of 8 sharing the first quarter of their tokens)")
    ap.add_argument("--chunk", type=int, default=512, help="masa_jax log-prob chunk (LossConfig.chunk_size)")
    ap.add_argument("--remat", default="none", help="masa_jax ModelConfig.remat (Tunix: RematConfig.NONE)")
    ap.add_argument("--scan-unroll", type=int, default=1,
                    help="masa_jax ModelConfig.scan_unroll with --scan-layers true (default 1; 4 = the model's "
                         "depth: the scan unrolled)")
    ap.add_argument("--scan-layers", type=lambda s: {"true": True, "false": False}[s.lower()], default=False,
                    help="masa_jax ModelConfig.scan_layers (default false, as configs/tiny.py, the CPU config: "
                         "a Python loop over the layers; true: lax.scan, what the accelerator configs run)")
    ap.add_argument("--rounds", type=int, default=None, help="A B B A rounds per case (default 3)")
    ap.add_argument("--warmup", type=int, default=2,
                    help="untimed calls per side before the rounds (the first compiles; Tunix's update "
                         "compiles again on its second call)")
    ap.add_argument("--cases", default="sampling,update", help="comma list of sampling, update")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoint-dir", default=None, help="where to write the checkpoint (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the JSON record to this file")
    args = ap.parse_args(argv)
    defaults = (dict(batches=[1, 4], prompt=16, new=16, train_batch=4, train_seq=64, rounds=1, update_groups=[1, 2])
                if args.quick else
                dict(batches=[1, 64], prompt=128, new=128, train_batch=16, train_seq=256, rounds=3,
                     update_groups=[1, 8]))
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    cases = set(args.cases.split(","))

    try:
        import tunix  # noqa: F401
    except ImportError as e:
        print(f"Tunix is not importable ({e}): pip install -e '.[bench]'", file=sys.stderr)
        return 2
    import jax
    import jax.numpy as jnp
    jax.block_until_ready(jnp.ones(2) + 1)  # backend start-up, paid by neither side's compile time

    facts = machine_facts()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in facts.items()), flush=True)
    tmp = tempfile.TemporaryDirectory(prefix="bench_peer_")
    ckpt = args.checkpoint_dir or os.path.join(tmp.name, "qwen3_tiny")
    hf_model = build_checkpoint(ckpt, args.seed)
    (ours, t_ours_load), (peer, t_peer_load) = timed(lambda: Ours(ckpt, args)), timed(lambda: Tunix(ckpt, args))
    sides = {"masa_jax": ours, "tunix": peer}
    record = {"benchmark": "peer_tunix", **facts, "shape": SHAPE, "dtype": "float32", "args": vars(args),
              "load_s": {"masa_jax": t_ours_load, "tunix": t_peer_load}}
    rows, checks = [], {}

    if "sampling" in cases:
        V = SHAPE["vocab_size"]
        first_calls, warm = {}, {}
        for B in args.batches:
            prompts = np.random.RandomState(1000 + B).randint(0, V, (B, args.prompt))
            for temperature in (0.0, 1.0):
                label = f"sampling, batch {B}, {'greedy' if temperature == 0 else 'temperature 1'}"
                outs = {}
                for name, side in sides.items():  # warm-up: compiles, first-call costs
                    outs[name], first_calls[(name, B, temperature)] = timed(
                        lambda side=side: side.sample(prompts, args.new, temperature))
                    warm[(name, B, temperature)] = [timed(lambda side=side: side.sample(
                        prompts, args.new, temperature))[1] for _ in range(args.warmup - 1)]
                    lens = {len(t) for t in outs[name]}
                    assert lens == {args.new}, f"{name} made {lens} tokens per row, expected {args.new}"
                if temperature == 0:
                    ref = hf_greedy(hf_model, prompts, args.new)
                    same_peer = sum(a == b for a, b in zip(outs["masa_jax"], outs["tunix"]))
                    same_hf = sum(a == b for a, b in zip(outs["masa_jax"], ref))
                    peer_hf = sum(a == b for a, b in zip(outs["tunix"], ref))
                    checks[f"greedy_batch{B}"] = {"rows": B, "masa_jax==tunix": same_peer,
                                                  "masa_jax==transformers": same_hf,
                                                  "tunix==transformers": peer_hf,
                                                  "ok": same_peer == same_hf == peer_hf == B}
                times = abba({n: (lambda s=s: s.sample(prompts, args.new, temperature)) for n, s in sides.items()},
                             args.rounds)
                tps = {n: B * args.new / float(np.median(v)) for n, v in times.items()}
                rows.append((label, f"{tps['masa_jax']:,.0f} tok/s", f"{tps['tunix']:,.0f} tok/s",
                             tps["masa_jax"] / tps["tunix"]))
                record[label] = {"tok_s": tps, "times_s": times,
                                 "first_call_s": {n: first_calls[(n, B, temperature)] for n in sides},
                                 "other_warmup_calls_s": {n: warm[(n, B, temperature)] for n in sides}}
                print(f"{label}: " + "  ".join(f"{n} {v:,.0f} tok/s" for n, v in tps.items()) +
                      f"  (rounds s: {json.dumps({n: [round(t, 3) for t in v] for n, v in times.items()})})",
                      flush=True)
        B0 = args.batches[0]
        fc = {n: first_calls[(n, B0, 0.0)] for n in sides}
        rows.append((f"sampler first call (batch {B0} greedy: compile + one run)", f"{fc['masa_jax']:.1f} s",
                     f"{fc['tunix']:.1f} s", fc["tunix"] / fc["masa_jax"]))
        record["first_call_s"] = {f"{n}|batch{b}|T{t:g}": v for (n, b, t), v in first_calls.items()}

    for G in (args.update_groups if "update" in cases else ()):
        rng = np.random.default_rng(args.seed)
        N, T = args.train_batch, args.train_seq
        tokens = rng.integers(0, SHAPE["vocab_size"], (N, T)).astype(np.int32)
        for g in range(0, N, G):  # the G rollouts of a prompt share its first T / 4 tokens
            tokens[g:g + G, :T // 4] = tokens[g, :T // 4]
        batch = dict(tokens=tokens, prompt_len=T // 4, groups=G, advantages=rng.normal(size=N).astype(np.float32))
        optim = dict(lr=1e-6, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1, clip_norm=1.0)
        loss = dict(clip_low=0.2, clip_high=0.28, clip_c=10.0, temperature=1.0)
        steps, firsts, olds, setup_s = {}, {}, {}, {}
        for name, side in sides.items():
            (steps[name], firsts[name], olds[name]), setup_s[name] = timed(
                lambda side=side: side.setup_update(batch, optim, loss))
        warm = {n: [timed(fn)[1] for _ in range(args.warmup - 1)] for n, fn in steps.items()}
        times = abba(steps, args.rounds)
        med = {n: float(np.median(v)) for n, v in times.items()}
        key = "update" if G == 1 else f"update_groups{G}"
        label = (f"GRPO update, {N} x {T} tokens (same loss settings, old log-probs precomputed)" if G == 1 else
                 f"GRPO update, {N} x {T} tokens, {N // G} prompts x {G} rollouts (masa_jax: shared prefix)")
        rows.append((label, f"{med['masa_jax']:.3f} s", f"{med['tunix']:.3f} s", med["tunix"] / med["masa_jax"]))
        record[key] = {"median_s": med, "times_s": times, "setup_and_first_step_s": setup_s,
                            "other_warmup_calls_s": warm, "first_step": firsts}
        print(f"{label}: " + "  ".join(f"{n} {v:.3f} s" for n, v in med.items()) +
              f"  (rounds s: {json.dumps({n: [round(t, 3) for t in v] for n, v in times.items()})})", flush=True)
        a, b = firsts["masa_jax"], firsts["tunix"]
        lp_gap = float(np.max(np.abs(olds["masa_jax"] - olds["tunix"])))
        checks[key] = {
            "loss": [a["loss"], b["loss"]], "grad_norm": [a["grad_norm"], b["grad_norm"]],
            "old_logprob_max_abs_diff": lp_gap,
            "ok": bool(np.isclose(a["loss"], b["loss"], **LOSS_TOL)
                       and abs(a["grad_norm"] - b["grad_norm"]) <= GRAD_NORM_RTOL * abs(b["grad_norm"])
                       and lp_gap <= LOGPROB_ATOL)}

    record["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(f"\n{facts['date_utc']}, {facts['cpu_count']} CPUs ({facts['cpu']}), load average "
          f"{facts['loadavg_start'][0]} at start / {record['loadavg_end'][0]} at end; jax {facts['jax']}, "
          f"flax {facts['flax']}, google-tunix {facts['google-tunix']}; medians of {2 * args.rounds} calls per "
          f"side (A B B A x {args.rounds})\n")
    print("| case | masa_jax | Tunix | masa_jax / Tunix (speed) |\n|---|---:|---:|---:|")
    for label, x, y, r in rows:
        print(f"| {label} | {x} | {y} | {r:.2f} |")
    print("\ncross-check:")
    for k, v in checks.items():
        if k.startswith("update"):
            print(f"  first {k}: loss masa_jax {v['loss'][0]:.8f} / Tunix {v['loss'][1]:.8f}; grad norm "
                  f"{v['grad_norm'][0]:.7f} / {v['grad_norm'][1]:.7f}; old log-probs max |diff| "
                  f"{v['old_logprob_max_abs_diff']:.2e}  -> {'OK' if v['ok'] else 'MISMATCH'}")
        else:
            print(f"  {k}: of {v['rows']} rows, masa_jax == Tunix {v['masa_jax==tunix']}, masa_jax == transformers "
                  f"{v['masa_jax==transformers']}, Tunix == transformers {v['tunix==transformers']}  -> "
                  f"{'OK' if v['ok'] else 'MISMATCH'}")
    ok = all(v["ok"] for v in checks.values())
    record["checks"] = checks
    record["cross_check_ok"] = ok
    print(f"cross-check: {'PASS' if ok else 'FAIL'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    print(json.dumps(record))
    tmp.cleanup()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
