"""Wall time of lm-eval with the `masa_jax` backend against lm-eval's own `hf` backend on the same model and
local tasks (docs/benchmarks.md, "lm-eval backend").

    python experiments/bench_lm_eval.py [--rounds 3] [--hf_batch_size 16] [--hf_device cuda --dtype bfloat16]

Builds offline, under a temporary directory: a random Qwen3 (hidden 256, 4 layers, 4 / 2 heads, head_dim 64,
ffn 768, context 512) over the toy character-level tokenizer, and three local tasks: multiple choice (200
questions x 4 choices = 800 log-likelihood requests), generation (64 prompts, greedy, max_gen_toks 64,
until "\\n\\n") and rolling log-likelihood (32 documents of ~1,200 characters: 3 windows of 512 each). Each
task is evaluated by both backends in alternating rounds inside one process (float32, CPU); round 1
includes model loading and compilation ("cold"), the later rounds are "warm" (median). Per-request
log-likelihoods / generations are compared too (max |delta|, identical generations).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402

WORDS = ("alpha beta gamma delta add carry borrow first multiply the a of to is seven nine twelve sum "
         "product number value answer question compute then").split()


def build_model(root: str) -> str:
    from masa_jax.models import qwen
    from masa_jax.toy import tokenizer as toy_tokenizer
    path = os.path.join(root, "model")
    tok = toy_tokenizer.load_tokenizer()
    cfg = qwen.ModelConfig(family="qwen3", vocab_size=len(tok), hidden_size=256, intermediate_size=768, num_layers=4,
                           num_heads=4, num_kv_heads=2, head_dim=64, tie_word_embeddings=True,
                           max_position_embeddings=512, rope_theta=10000.0, eos_token_id=tok.eos_token_id)
    qwen.save_pretrained(cfg, qwen.init_params(cfg, jax.random.key(0), std=0.2), path)
    for name in os.listdir(toy_tokenizer.TOKENIZER_DIR):
        shutil.copy(os.path.join(toy_tokenizer.TOKENIZER_DIR, name), path)
    return path


def build_tasks(root: str) -> str:
    rng = np.random.RandomState(0)
    sentence = lambda n: " ".join(rng.choice(WORDS, n))
    docs = {
        "bench_mc": [{"question": sentence(12), "choices": [sentence(rng.randint(1, 6)) for _ in range(4)],
                      "label": int(rng.randint(4))} for _ in range(200)],
        "bench_gen": [{"question": sentence(rng.randint(8, 30)), "answer": "x"} for _ in range(64)],
        "bench_ppl": [{"text": sentence(200)} for _ in range(32)],
    }
    spec = {
        "bench_mc": ('output_type: multiple_choice\ndoc_to_text: "Question: {{question}}\\nAnswer:"\n'
                     'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\nmetric_list:\n  - metric: acc\n'),
        "bench_gen": ('output_type: generate_until\ndoc_to_text: "Q: {{question}}\\nA:"\ndoc_to_target: "{{answer}}"\n'
                      'generation_kwargs:\n  until: ["\\n\\n"]\n  do_sample: false\n  max_gen_toks: 64\n'
                      'metric_list:\n  - metric: exact_match\n'),
        "bench_ppl": ('output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
                      'metric_list:\n  - metric: word_perplexity\n'),
    }
    path = os.path.join(root, "tasks")
    os.makedirs(path)
    for name, rows in docs.items():
        data = os.path.join(path, f"{name}.jsonl")
        with open(data, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        with open(os.path.join(path, f"{name}.yaml"), "w") as f:
            f.write(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
                    f"test_split: test\n{spec[name]}metadata:\n  version: 1.0\n")
    return path


def run(model, model_args, tasks_dir, task, batch_size):
    import lm_eval
    from lm_eval.tasks import TaskManager
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[task], batch_size=batch_size,
                                  task_manager=TaskManager(include_path=tasks_dir, include_defaults=False),
                                  log_samples=True, bootstrap_iters=0, verbosity="ERROR")
    return time.perf_counter() - t0, {s["doc_id"]: s["resps"] for s in out["samples"][task]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hf_batch_size", type=int, default=16)
    ap.add_argument("--tasks", default="bench_mc,bench_gen,bench_ppl")
    ap.add_argument("--hf_device", default="cpu", help="torch device of the hf backend (cuda on a GPU)")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    from masa_jax.evaluation import lm_eval_backend  # noqa: F401  (registers "masa_jax")
    import torch
    root = tempfile.mkdtemp(prefix="bench_lm_eval_")
    model_dir, tasks_dir = build_model(root), build_tasks(root)
    backends = {"hf": dict(pretrained=model_dir, dtype=args.dtype, device=args.hf_device),
                "masa_jax": dict(pretrained=model_dir, dtype=args.dtype)}
    report = {"jax": jax.__version__, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
              "hf_batch_size": args.hf_batch_size, "load_average_start": os.getloadavg()[0]}
    for task in args.tasks.split(","):
        times = {b: [] for b in backends}
        resps = {}
        for r in range(args.rounds):
            order = list(backends) if r % 2 == 0 else list(reversed(backends))
            for b in order:
                t, out = run(b, backends[b], tasks_dir, task, args.hf_batch_size)
                times[b].append(t)
                resps[b] = out
                print(f"{task} round {r} {b}: {t:.1f} s", flush=True)
        a, b = resps["hf"], resps["masa_jax"]
        if task == "bench_gen":
            agree = f"identical generations: {sum(a[d] == b[d] for d in a)} of {len(a)}"
        else:
            lp = lambda r: [x[0] if isinstance(x, (list, tuple)) else x for req in r for x in req]
            delta = max(max(abs(float(x) - float(y)) for x, y in zip(lp(a[d]), lp(b[d]))) for d in a)
            agree = f"max |delta log-likelihood|: {delta:.2e}"
        report[task] = {"requests_docs": len(a), **{f"{k}_cold_s": round(v[0], 2) for k, v in times.items()},
                        **{f"{k}_warm_s": round(float(np.median(v[1:])), 2) for k, v in times.items() if len(v) > 1},
                        "agreement": agree}
        print(json.dumps({task: report[task]}), flush=True)
    report["load_average_end"] = os.getloadavg()[0]
    print(json.dumps(report, indent=2))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
