"""The run's problems from its config: this host's share of the training files (config.data) and of the
held-out files (config.eval), with the held-out questions dropped from training and overlong prompts
filtered. A malformed row is a one-line error naming the file and row (or skipped: data.on_error)."""
from __future__ import annotations

import collections
import logging

import jax

from masa_jax import errors
from masa_jax import fs
from masa_jax.data import pipeline, sources
from masa_jax.data.problem import question_key
from masa_jax.rl import prompts

log = logging.getLogger(__name__)

SKIP_HINT = ", or skip malformed rows with --config.data.on_error=skip"


def tfds_data_dir(config) -> str | None:
    """config.data.tfds_data_dir for the tfds: specs (None: TFDS's own default, $TFDS_DATA_DIR)."""
    return fs.absolute(config.data.tfds_data_dir) or None


def load_eval_problems(config, process_index: int | None = None, process_count: int | None = None
                       ) -> tuple[list, frozenset[str]]:
    """This host's share of the held-out problems (config.eval.files) and the questions of all of them.

    Every host reads the held-out files whole (they are small: MATH's test set is 5000 rows) because
    every host must drop all held-out questions from its training share."""
    h = jax.process_index() if process_index is None else process_index
    p = jax.process_count() if process_count is None else process_count
    share, questions = [], set()
    for spec in config.eval.files:
        with errors.data_file_errors(spec, field="config.eval.files"):
            every = sources.load_problems(spec, data_dir=tfds_data_dir(config)).problems
        if not every:
            raise errors.no_problems(spec, "config.eval.files")
        questions.update(question_key(q.question) for q in every)
        block = sources.host_block(len(every), h, p)
        share += every[block.start:block.stop]
    return share, frozenset(questions)


def load_training_problems(config, codec, rcfg, process_index: int | None = None,
                           process_count: int | None = None, exclude_questions: frozenset[str] = frozenset()
                           ) -> tuple[list, dict]:
    """This host's share of the training problems, overlong prompts filtered (counted): each host parses
    only its block of rows of every file (`pipeline.load_host_problems`; the whole set on one host).
    Problems whose question is in `exclude_questions` (the held-out questions, `question_key`) are
    dropped and counted, so held-out accuracy is measured on problems the run never trains on.
    process_index / process_count default to jax's. An empty share is an error only on a single host
    (build_run checks all hosts' shares together)."""
    h = jax.process_index() if process_index is None else process_index
    p = jax.process_count() if process_count is None else process_count
    problems, stats = [], collections.Counter()
    for spec in config.data.train_files:
        with errors.data_file_errors(spec, skip_hint=SKIP_HINT):  # a malformed row: one line naming it
            loaded = pipeline.load_host_problems(spec, process_index=h, process_count=p, on_error=config.data.on_error,
                                                 data_dir=tfds_data_dir(config))
        if p == 1 and not loaded.problems:  # on a pod a host's share of a small file may be empty
            raise errors.no_problems(spec)
        stats["skipped_malformed"] += loaded.num_skipped
        for msg in loaded.skipped[:5]:
            log.warning("skipped malformed row: %s", msg)
        fresh = [q for q in loaded.problems if question_key(q.question) not in exclude_questions]
        stats["dropped_held_out"] += len(loaded.problems) - len(fresh)
        problems.extend(fresh)
    if stats["dropped_held_out"]:
        log.info("dropped %d training problems whose question is held out (config.eval.files)",
                 stats["dropped_held_out"])

    def prompt_len(p):
        meta = codec.encode_chat(prompts.meta_prompt(
            p.question, max_length=rcfg.max_response_length, k=rcfg.k, min_length=rcfg.min_solution_length,
            template=rcfg.meta_template or None))
        sol = codec.encode_chat(prompts.solution_prompt(p.question, template=rcfg.solution_template or None))
        return max(len(meta), len(sol))

    kept, dropped = sources.filter_overlong(problems, prompt_len, config.data.max_prompt_length)
    stats["dropped_overlong"] = dropped
    if dropped:
        log.warning("dropped %d problems whose prompt exceeds %d tokens", dropped, config.data.max_prompt_length)
    if not kept and p == 1:
        raise errors.UserError(f"no training problems left from {list(config.data.train_files)}: every prompt is "
                               f"held out (config.eval.files) or longer than data.max_prompt_length="
                               f"{config.data.max_prompt_length}")
    return kept, dict(stats)
