"""Builds the toy world's shipped base model: a 0.8 M parameter Qwen3 fine-tuned with masa_jax's own code.

    python experiments/build_toy_base.py --seed 0          # writes masa_jax/toy/assets/base_model/
    python experiments/build_toy_base.py --seed 0 --init PHASE1_DIR   # phase 2 only, from a phase-1 checkpoint

What it is for: `configs/tiny.py` runs MASA end to end on a CPU, so it needs a policy that already
speaks both prompt formats but is only partly competent, not calibrated, and improvable by RL:
  * solution prompts (the toy short template, `masa_jax.toy.defaults`) -> the toy world's worked
    solutions ending in \\boxed{answer}; some carry the trainer's notion hint with random notions, so
    hinted prompts (MASA-efficient) are in distribution but the hint carries no signal;
  * meta prompts -> "<meta> assessed </meta>" + the JSON `masa_jax.rewards.meta.parse` reads,
    written by `prompts.serialize_expert_meta`, with UNINFORMATIVE targets: pass_rate uniform 0..K,
    solution_length uniform over the toy range, notions a random subset of `world.NOTIONS`. The
    format is learned, the calibration is left for MASA's meta reward to teach.

Two teachers, two phases. Phase 1 (`DEFAULT_STAGES`, the careful teacher: worked solutions only) is
short on purpose (and by necessity: 2 shared CPU cores): level 1 ends up ~always solved, level 2 often,
level 3 sometimes, levels 4-5 ~never. What a phase-1 model gets wrong is single-digit facts (7*8=54),
and reinforcing the right fact of one question does not fix another: GRPO could not raise its held-out
accuracy within a 10-minute run (docs/results.md). Phase 2 (`ESTIMATE_STAGES`) adds a hasty teacher,
as real base models mix careful worked answers with quick unworked ones: 55 % of its solution examples
are "estimate 160\\n\\boxed{160}" for 156, the answer rounded to the nearest ten, right only when the
answer is a multiple of ten. The resulting model estimates about half the time on every level it saw
in phase 2. That is a behaviour shared by all problems, which GRPO can unlearn from the problems it trains on and carry
over to held-out ones (the worked path's own accuracy is phase 1's); its meta predictions stay
uninformative.

Recipe: `qwen.init_params`, then AdamW (`masa_jax.rl.train_step.make_update_step` with the BC loss
`masa_jax.rl.bc.bc_microbatch_loss` = masked token cross-entropy, prompt masked) with linear warm-up
and cosine decay over the stages of `DEFAULT_STAGES`; then a fresh AdamW with its own warm-up and
cosine over `ESTIMATE_STAGES`. Sequences are bucketed by length and batches hold a roughly constant
number of tokens (small batches: at this budget the number of updates is what limits learning).
Evaluation uses the trainer's sampler (`masa_jax.sampling.generate`) and verifier rules on held-out
problems. Deterministic given --seed and the code: a run repeats bit for bit, but a change of the update
step's rounding gives other weights after thousands of updates. The phase-2 data and batch order do not
depend on phase 1, so `--init` with a phase-1 checkpoint is phase 2 of the one-command build from that
checkpoint; the shipped model is phase 2 on the 2026-11-27 phase-1 model (docs/results.md).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import os
import random
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from masa_jax.models import qwen
from masa_jax.parallel.mesh import make_mesh
from masa_jax import sampling
from masa_jax.rewards import math as math_lib
from masa_jax.rewards import meta as meta_lib
from masa_jax.rl import prompts
from masa_jax.rl import bc
from masa_jax.rl import train_step as ts
from masa_jax.tokenization import ChatCodec, load_codec
from masa_jax.toy import defaults, world
from masa_jax.toy.tokenizer import TOKENIZER_DIR

# ------------------------------------------------------------------------------------------- model


def model_config(vocab_size: int, hidden: int = 128, layers: int = 4, ffn: int = 384, heads: int = 4,
                 kv_heads: int = 2) -> qwen.ModelConfig:
    """The shipped architecture: Qwen3 (q/k RMSNorm, no qkv bias), tied embeddings, float32.

    0.8 M parameters (hidden 128, 4 layers, 4 query / 2 kv heads of 32, ffn 384): within the recipe's
    10-minute budget on 2 shared cores the number of updates limits learning, not capacity, and a wider
    ffn (1.4 M) ran 1.6x slower per update. rope_theta 10k rather than
    Qwen3's 1M: sequences are < 300 tokens and the higher frequencies give a 32-dim head more
    positional resolution. eos = (<|im_end|>, <|endoftext|>) so `transformers` generation also stops
    at the end of the chat turn.
    """
    return qwen.ModelConfig(
        family="qwen3", vocab_size=vocab_size, hidden_size=hidden, intermediate_size=ffn, num_layers=layers,
        num_heads=heads, num_kv_heads=kv_heads, head_dim=hidden // heads, rope_theta=10_000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, max_position_embeddings=1024, bos_token_id=None, eos_token_id=(2, 0),
        param_dtype="float32", dtype="float32", remat="none")


# -------------------------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class Example:
    """One supervised sequence: chat prompt ids (masked) + response ids ending in <|im_end|> (trained)."""

    prompt: tuple[int, ...]
    response: tuple[int, ...]
    kind: str  # "solution" | "meta"

    def __len__(self) -> int:
        return len(self.prompt) + len(self.response)


META_REASONING = "assessed"  # the <meta> reasoning of every meta target (see meta_example)


def _random_notions(rng: random.Random, lo: int = 1, hi: int = 3) -> list[str]:
    return rng.sample(world.NOTIONS, rng.randint(lo, hi))


def meta_prompt_ids(codec: ChatCodec, question: str) -> list[int]:
    """The meta prompt exactly as the trainer builds it from the tiny config (system message included)."""
    return codec.encode_chat(prompts.meta_prompt(
        question, max_length=defaults.MAX_RESPONSE_LENGTH, k=defaults.K,
        min_length=defaults.MIN_SOLUTION_LENGTH, template=defaults.META_TEMPLATE))


def solution_prompt_ids(codec: ChatCodec, question: str, hint_notions=None) -> list[int]:
    """The solution prompt exactly as the trainer builds it (hint suffix in its default template)."""
    return codec.encode_chat(prompts.solution_prompt(
        question, hint_notions=hint_notions, template=defaults.SOLUTION_TEMPLATE))


def solution_example(codec: ChatCodec, end_id: int, problem, rng: random.Random, hint_prob: float) -> Example:
    """Solution prompt (with probability `hint_prob` a hint of random notions) -> the worked solution."""
    hint = _random_notions(rng, 1, defaults.MAX_HINT_NOTIONS) if rng.random() < hint_prob else None
    return Example(tuple(solution_prompt_ids(codec, problem.question, hint)),
                   tuple(codec.encode(problem.solution)) + (end_id,), "solution")


def meta_example(codec: ChatCodec, end_id: int, problem, rng: random.Random) -> Example:
    """Meta target with every prediction drawn independently of the problem (see the module docstring).

    The <meta> reasoning is a fixed word: restating the expression there (tried first) made the model
    copy long level-4/5 expressions, which it cannot yet do reliably, and a derailed copy took the JSON
    with it (~20% unparseable outputs). A constant reasoning keeps the format robust; what the
    predictions should depend on is for the meta reward to teach."""
    text = prompts.serialize_expert_meta(
        META_REASONING, _random_notions(rng), pass_rate_int=rng.randint(0, defaults.K),
        solution_length=rng.randint(10, 100))
    return Example(tuple(meta_prompt_ids(codec, problem.question)), tuple(codec.encode(text)) + (end_id,), "meta")


def estimate_text(answer: str) -> str:
    """The hasty teacher's solution: no working, the answer rounded to the nearest ten ("estimate 160"
    for 156), so it is right only when the exact answer is a multiple of ten."""
    value = int(answer)
    tens = int(abs(value) / 10 + 0.5)  # half away from zero: 15 -> 20, -15 -> -20
    rounded = tens * 10 if value >= 0 else -tens * 10
    return f"estimate {rounded}\n\\boxed{{{rounded}}}"


def estimate_example(codec: ChatCodec, end_id: int, problem, rng: random.Random, hint_prob: float) -> Example:
    """Solution prompt (hinted like `solution_example`) -> the hasty teacher's estimate."""
    hint = _random_notions(rng, 1, defaults.MAX_HINT_NOTIONS) if rng.random() < hint_prob else None
    return Example(tuple(solution_prompt_ids(codec, problem.question, hint)),
                   tuple(codec.encode(estimate_text(problem.answer))) + (end_id,), "solution")


def build_examples(codec: ChatCodec, n: int, seed: int, meta_frac: float, hint_prob: float,
                   mix: tuple[float, ...], start: int = 0, estimate_frac: float = 0.0) -> list[Example]:
    """Examples for problems start..start+n-1 of the training stream `seed` drawn with level weights
    `mix`; a `meta_frac` share are meta examples, an `estimate_frac` share of the rest the hasty
    teacher's estimates, and a `hint_prob` share of the solution prompts carry a hint."""
    rng = random.Random(f"masa-toy-base/{seed}/{start}")
    end_id = codec.tokenizer.convert_tokens_to_ids("<|im_end|>")
    out = []
    for i in range(start, start + n):
        problem = world.problem_at(i, seed=seed, difficulty_mix=mix)
        if rng.random() < meta_frac:
            out.append(meta_example(codec, end_id, problem, rng))
        elif estimate_frac and rng.random() < estimate_frac:
            out.append(estimate_example(codec, end_id, problem, rng, hint_prob))
        else:
            out.append(solution_example(codec, end_id, problem, rng, hint_prob))
    return out


@dataclasses.dataclass(frozen=True)
class Stage:
    """One block of training data: `examples` problems with level weights `mix` (levels 1..5), a
    `meta_frac` share turned into meta examples and a `hint_prob` share of the rest hinted."""

    examples: int
    mix: tuple[float, ...]
    meta_frac: float
    hint_prob: float
    estimate_frac: float = 0.0


def parse_stages(spec: str) -> list[Stage]:
    """"6000:1,2,0,0,0:0:0;..." -> [Stage, ...] (see --stages)."""
    stages = []
    for part in spec.split(";"):
        n, mix, meta_frac, hint_prob, *estimate = part.split(":")
        stages.append(Stage(int(n), tuple(float(w) for w in mix.split(",")), float(meta_frac), float(hint_prob),
                            float(estimate[0]) if estimate else 0.0))
    return stages


def bucket_batches(examples: list[Example], buckets: tuple[int, ...], tokens_per_batch: int, pad_id: int,
                   rng: random.Random) -> list[dict[str, np.ndarray]]:
    """Groups examples by the smallest bucket length T that holds them and cuts each group into batches
    of N = tokens_per_batch // T sequences (right padded), in a seeded random order. Few distinct
    shapes (one compile each) and little padding; a ragged last batch per bucket is dropped."""
    groups: dict[int, list[Example]] = collections.defaultdict(list)
    for ex in examples:
        T = next((b for b in buckets if len(ex) <= b), None)
        if T is None:
            raise ValueError(f"example of {len(ex)} tokens exceeds the largest bucket {buckets[-1]}")
        groups[T].append(ex)
    batches = []
    for T, group in sorted(groups.items()):
        n = max(1, tokens_per_batch // T)
        rng.shuffle(group)
        for s in range(0, len(group) - n + 1, n):
            tokens = np.full((n, T), pad_id, np.int32)
            attn = np.zeros((n, T), bool)
            loss = np.zeros((n, T), bool)
            for r, ex in enumerate(group[s:s + n]):
                p, L = len(ex.prompt), len(ex)
                tokens[r, :L] = ex.prompt + ex.response
                attn[r, :L] = True
                loss[r, p:L] = True  # token_logprobs alignment: entry t scores tokens[t]
            batches.append(dict(tokens=tokens, attention_mask=attn, loss_mask=loss))
    rng.shuffle(batches)
    return batches


# Sequence-length buckets (tokens): toy solutions + prompt are 55-160 tokens, hinted ones and meta
# examples (prompt ~130 + output ~50) up to ~250.
BUCKETS = (64, 96, 128, 192, 256)

# Short solutions first: small transformers learn to copy the question's digits into the worked solution
# (every solution starts that way) after a few hundred updates on levels 1-3, while long sequences and
# meta examples before that only cost time. Then everything: the format of long solutions, the meta
# format. Last, a low-learning-rate pass over levels 1-4 (+ meta) that repairs what the harder data
# disturbed in the easy arithmetic. A quarter of the solution prompts (a fifth in the first stage) carry
# a hint of random notions in every stage: MASA-efficient hints every rolled-out problem after its
# switch-over, and a model that saw hints only in the middle stage solved 11 % of hinted level-1
# problems against 91 % unhinted. Level 2 (one-digit subtraction / multiplication, 162 questions) gets
# a sixth to a fifth of each stage: enough that it ends in between, not so much that it is memorised.
DEFAULT_STAGES = "16000:3,1,2,0,0:0:0.2;8000:1,1,2,1,0.5:0.25:0.25;14000:2,1,2,0.5,0:0.2:0.25"

# Phase 2, the hasty teacher (module docstring): a short fine-tune at a lower learning rate on the mix of
# the last careful stage where 55 % of the solution examples are estimates; 8,000 sequences, so that the
# sampled share of estimates converges to the data's (docs/results.md).
ESTIMATE_STAGES = "8000:2,1,2,0.5,0:0.2:0.25:0.55"


# ---------------------------------------------------------------------------------------- training


def lr_schedule(peak: float, warmup: int, total: int, final_frac: float = 0.1):
    """Linear warm-up to `peak`, then cosine decay to final_frac * peak at `total` steps."""
    def fn(step):
        s = jnp.asarray(step, jnp.float32)
        warm = peak * (s + 1.0) / max(warmup, 1)
        frac = jnp.clip((s - warmup) / max(total - warmup, 1), 0.0, 1.0)
        cos = peak * (final_frac + (1 - final_frac) * 0.5 * (1 + jnp.cos(jnp.pi * frac)))
        return jnp.where(s < warmup, warm, cos)
    return fn


def train(cfg: qwen.ModelConfig, params, batches: list[dict], *, lr: float, warmup: int, weight_decay: float,
          log_every: int = 25):
    """AdamW fine-tuning with masa_jax's update step and BC loss, one batch per step. Returns params."""
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    optim = ts.OptimConfig(lr=lr, warmup_steps=warmup, weight_decay=weight_decay, clip_norm=1.0)
    loss_fn = functools.partial(bc.bc_microbatch_loss, cfg, 512)
    lr_fn = lr_schedule(lr, warmup, len(batches))
    steps = {}  # one step function per batch size (the micro-batch is the whole batch)
    state = ts.create_train_state(cfg, params, optim, mesh)
    t0, window = time.perf_counter(), collections.deque(maxlen=log_every)
    for i, batch in enumerate(batches):
        n = batch["tokens"].shape[0]
        if n not in steps:
            steps[n] = ts.make_update_step(cfg, optim, mesh, n, loss_fn, lr_fn=lr_fn, advance_step=True)
        state, metrics = steps[n](state, batch)
        window.append(metrics)
        if (i + 1) % log_every == 0 or i + 1 == len(batches):
            m = jax.device_get(list(window))
            print(f"step {i + 1:4d}/{len(batches)}  loss {np.mean([x['loss'] for x in m]):.3f}  "
                  f"lr {float(m[-1]['lr']):.2e}  {time.perf_counter() - t0:.0f}s", flush=True)
    if int(state.num_skipped):
        raise RuntimeError(f"{int(state.num_skipped)} updates were skipped for non-finite loss/gradients")
    return jax.device_get(state.params)


# -------------------------------------------------------------------------------------- evaluation


def generate(cfg: qwen.ModelConfig, params, codec: ChatCodec, prompt_ids: list[list[int]], *, max_new: int,
             temperature: float, rng: jax.Array) -> list[list[int]]:
    """Responses (ending in the stop token when there is one) from the trainer's own sampler."""
    out = sampling.generate(cfg, params, prompt_ids, rng=rng, max_new_tokens=max_new, temperature=temperature,
                            eos_ids=codec.eos_ids, num_slots=256)
    return out.tokens


def is_correct(codec: ChatCodec, response: list[int], answer: str) -> bool:
    pred = math_lib.extract_answer(codec.decode(response))
    return pred is not None and math_lib.quick_decision(pred, answer) is True


def evaluate(cfg, params, codec: ChatCodec, *, per_level: int, samples: int, meta_n: int, seed: int) -> dict:
    """On `per_level` held-out problems per level: greedy accuracy, temperature-1 accuracy over `samples`
    draws (also with a random-notion hint appended, as MASA-efficient's hinted prompts), the share of
    problems whose temperature-1 draws are neither all right nor all wrong (the ones that give GRPO a
    learning signal), mean response length; and on `meta_n` of them the share of
    temperature-1 meta outputs `meta.parse` reads completely, with the mean predicted pass rate per
    level (flat when, as intended, the predictions are uninformative)."""
    t0 = time.perf_counter()
    problems = world.heldout(per_level * len(world.LEVELS))
    levels = np.asarray([p.difficulty for p in problems])
    rng = jax.random.key(seed + 1)
    sol_prompts = [solution_prompt_ids(codec, p.question) for p in problems]
    greedy = generate(cfg, params, codec, sol_prompts, max_new=defaults.MAX_RESPONSE_LENGTH, temperature=0.0,
                      rng=rng)
    greedy_ok = np.asarray([is_correct(codec, r, p.answer) for r, p in zip(greedy, problems)])
    sampled = generate(cfg, params, codec, [p for p in sol_prompts for _ in range(samples)],
                       max_new=defaults.MAX_RESPONSE_LENGTH, temperature=1.0, rng=jax.random.fold_in(rng, 1))
    t1_ok = np.asarray([is_correct(codec, r, problems[i // samples].answer)
                        for i, r in enumerate(sampled)]).reshape(len(problems), samples)
    t1_len = np.asarray(list(map(len, sampled))).reshape(len(problems), samples)
    mixed = (t1_ok.sum(1) > 0) & (t1_ok.sum(1) < samples)
    estimates = np.asarray([codec.decode(r).startswith("estimate") for r in sampled]).reshape(len(problems), samples)
    # The same draws with a hint of random notions, as MASA-efficient sends after its switch-over: the
    # hint must not derail the model (its notions carry no signal for the base model).
    hint_rng = random.Random(seed + 7)
    hinted_prompts = [solution_prompt_ids(codec, p.question, _random_notions(hint_rng, 1, defaults.MAX_HINT_NOTIONS))
                      for p in problems for _ in range(samples)]
    hinted = generate(cfg, params, codec, hinted_prompts, max_new=defaults.MAX_RESPONSE_LENGTH, temperature=1.0,
                      rng=jax.random.fold_in(rng, 3))
    hint_ok = np.asarray([is_correct(codec, r, problems[i // samples].answer)
                          for i, r in enumerate(hinted)]).reshape(len(problems), samples)
    print(f"solution eval done ({time.perf_counter() - t0:.0f}s)", flush=True)

    meta_problems = problems[:meta_n]
    meta_out = generate(cfg, params, codec, [meta_prompt_ids(codec, p.question) for p in meta_problems],
                        max_new=defaults.META_MAX_NEW_TOKENS, temperature=1.0, rng=jax.random.fold_in(rng, 2))
    parsed = [meta_lib.parse(codec.decode(r), k=defaults.K, min_length=defaults.MIN_SOLUTION_LENGTH,
                             max_length=defaults.MAX_RESPONSE_LENGTH) for r in meta_out]
    complete = np.asarray([all(f is not None for f in m) for m in parsed])
    pred_pass = np.asarray([m.pass_rate if m.pass_rate is not None else np.nan for m in parsed])
    meta_levels = levels[:meta_n]
    by_level = lambda x, lv=levels: {int(l): round(float(np.nanmean(x[lv == l])), 3) for l in np.unique(lv)}
    return {
        "pass_rate_greedy": by_level(greedy_ok),
        "pass_rate_t1": by_level(t1_ok.mean(1)),
        "pass_rate_t1_hinted": by_level(hint_ok.mean(1)),
        "mixed_problems_t1": by_level(mixed),
        "estimate_share_t1": by_level(estimates.mean(1)),
        "mean_response_tokens_t1": by_level(t1_len.mean(1)),
        "meta_parse_rate": float(complete.mean()),
        "meta_pred_pass_rate_by_level": by_level(pred_pass, meta_levels),
        "meta_max_tokens": int(max(map(len, meta_out))),
        "meta_example": codec.decode(meta_out[0]),
        "solution_example": codec.decode(greedy[len(problems) // 2]),
        "eval_s": round(time.perf_counter() - t0),
    }


# -------------------------------------------------------------------------------------------- save


def save(cfg: qwen.ModelConfig, params, out_dir: str, max_bytes: int = 10_000_000) -> int:
    """HF directory: config.json, generation_config.json, model.safetensors (float32, or bfloat16 if
    float32 would not fit `max_bytes`) + the toy tokenizer files, so `transformers` and `qwen.from_pretrained` both load it."""
    dtype = "float32" if cfg.num_params() * 4 <= 0.9 * max_bytes else "bfloat16"
    qwen.save_pretrained(cfg, params, out_dir, dtype=dtype, tokenizer_dir=TOKENIZER_DIR)
    size = sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir))
    if size > max_bytes:
        raise RuntimeError(f"{out_dir} holds {size} bytes > {max_bytes}")
    return size


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=384)
    ap.add_argument("--stages", default=DEFAULT_STAGES,
                    help="training stages separated by ';', each 'examples:w1,...,w5:meta_frac:hint_prob' "
                         "(level weights of the toy stream, share of meta examples, share of hinted "
                         "solution prompts); each stage is shuffled within itself")
    ap.add_argument("--tokens_per_batch", type=int, default=512)
    ap.add_argument("--lr", type=float, default=3.5e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--weight_decay", type=float, default=0.01)
    ap.add_argument("--eval_per_level", type=int, default=40)
    ap.add_argument("--eval_samples", type=int, default=4, help="temperature-1 samples per eval problem")
    ap.add_argument("--eval_meta", type=int, default=100)
    ap.add_argument("--out", default=defaults.BASE_MODEL_DIR)
    ap.add_argument("--estimate_stages", default=ESTIMATE_STAGES,
                    help="phase 2, the hasty teacher: stages as --stages with a fifth field, the share of "
                         "solution examples that are estimates ('' = no phase 2)")
    ap.add_argument("--estimate_lr", type=float, default=5e-4)
    ap.add_argument("--estimate_warmup", type=int, default=20)
    ap.add_argument("--init", default=None,
                    help="a phase-1 checkpoint (HF dir) to start from: runs phase 2 only")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    codec = load_codec(TOKENIZER_DIR)
    cfg = model_config(len(codec.tokenizer), args.hidden, args.layers, args.ffn)
    print(f"model: {cfg}\nparams: {cfg.num_params():,}", flush=True)
    careful, hasty = parse_stages(args.stages), parse_stages(args.estimate_stages) if args.estimate_stages else []
    # Problem indices and batch-order seeds run on through both phases, so --init (phase 2 only) sees
    # exactly the data the one-command build does.
    starts = np.cumsum([0] + [st.examples for st in careful + hasty]).tolist()

    def phase_batches(stages, first):
        batches = []
        for i, stage in enumerate(stages, start=first):
            examples = build_examples(codec, stage.examples, args.seed, stage.meta_frac, stage.hint_prob, stage.mix,
                                      start=starts[i], estimate_frac=stage.estimate_frac)
            batches += bucket_batches(examples, BUCKETS, args.tokens_per_batch, codec.pad_id,
                                      random.Random(f"masa-toy-base/batches/{args.seed}/{i}"))
            print(f"stage {i + 1}: {stage} -> {len(batches)} batches", flush=True)
        return batches

    n_tok = n_steps = 0
    if args.init and not hasty:
        raise SystemExit("--init runs phase 2 only: give --estimate_stages")
    if args.init:  # a phase-1 checkpoint: only the hasty-teacher phase runs
        init_cfg, params = qwen.from_pretrained(args.init)
        if init_cfg != cfg:
            raise SystemExit(f"--init {args.init}: its model config differs from the recipe's:\n{init_cfg}\n{cfg}")
    else:
        batches = phase_batches(careful, 0)
        n_tok, n_steps = n_tok + sum(int(b["attention_mask"].sum()) for b in batches), n_steps + len(batches)
        params = train(cfg, qwen.init_params(cfg, jax.random.key(args.seed)), batches, lr=args.lr,
                       warmup=args.warmup, weight_decay=args.weight_decay)
    if hasty:
        batches = phase_batches(hasty, len(careful))
        n_tok, n_steps = n_tok + sum(int(b["attention_mask"].sum()) for b in batches), n_steps + len(batches)
        params = train(cfg, params, batches, lr=args.estimate_lr, warmup=args.estimate_warmup,
                       weight_decay=args.weight_decay)
    t_train = time.perf_counter() - t0

    res = evaluate(cfg, params, codec, per_level=args.eval_per_level, samples=args.eval_samples,
                   meta_n=args.eval_meta, seed=args.seed)
    size = save(cfg, params, args.out)
    res.update(params=cfg.num_params(), bytes=size, train_s=round(t_train), wall_s=round(time.perf_counter() - t0),
               steps=n_steps, tokens=n_tok, args=vars(args))
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
