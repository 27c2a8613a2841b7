"""Run by test_lm_eval_backend.py in a subprocess with 4 fake CPU devices (XLA_FLAGS must be set before jax
starts): the `masa_jax` lm-eval model on each mesh given scores log-likelihoods and greedy generations;
prints one JSON line "RESULT {mesh: {"ll": [...], "greedy": [...], "gen": [...]}}".

usage: python sharded_backend_check.py MODEL_DIR 1x4x1 2x1x2
"""
from __future__ import annotations

import json
import sys

from lm_eval.api.instance import Instance

from masa_jax.evaluation import lm_eval_backend

LL = [("Question: 2 + 3\nAnswer:", " 5"), ("Question: 7 * 6\nAnswer:", " 42"), ("x", " yz"), ("", "hello"),
      ("A longer context that pads the short ones on the left.", " ok")]
GEN = ["Q: Name a colour.\nA:", "Q: Add 2 and 2.\nA:", "Hi", "Q: Spell cat backwards.\nA:"]


def main(model_dir: str, meshes: list[str]) -> None:
    out = {}
    for mesh in meshes:
        lm = lm_eval_backend.MasaJaxLM(pretrained=model_dir, dtype="float32", mesh=mesh)
        ll = lm.loglikelihood([Instance("loglikelihood", {}, pair, 0) for pair in LL])
        gen = lm.generate_until([Instance("generate_until", {}, (c, {"until": ["."], "max_gen_toks": 12}), 0)
                                 for c in GEN])
        out[mesh] = {"ll": [x for x, _ in ll], "greedy": [g for _, g in ll], "gen": gen,
                     "mesh": dict(zip(lm.mesh.axis_names, map(int, lm.mesh.axis_sizes)))}
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
