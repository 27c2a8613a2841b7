"""Per-host loading (masa_jax.data.pipeline.load_host_problems and the sharded pipeline): each of the
simulated hosts (process_index / process_count passed as arguments) parses only its block of rows, and
the hosts' shares together are exactly what one host loads."""

import collections
import json
import os
import sys
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from masa_jax import components
from masa_jax.data import run_problems
from masa_jax.errors import UserError
from masa_jax.config import base_config
from masa_jax.data import pipeline, sources

SAMPLE = os.path.join(os.path.dirname(__file__), "math_sample.parquet")


@pytest.fixture
def parsed(monkeypatch):
    """Counts the rows turned into Problems (verl rows and flat JSONL / TFDS records)."""
    counts = collections.Counter()

    def counting(name):
        real = getattr(sources, name)

        def wrapper(*args, **kwargs):
            counts[name] += 1
            return real(*args, **kwargs)
        return wrapper

    for name in ("verl_row_to_problem", "dict_to_problem"):
        monkeypatch.setattr(sources, name, counting(name))
    return counts


@pytest.fixture
def parquet_rows_read(monkeypatch):
    """Rows that pyarrow materialises from a parquet file through ParquetFile.read_row_groups."""
    read = []
    real = pq.ParquetFile.read_row_groups

    def wrapper(self, row_groups, *args, **kwargs):
        table = real(self, row_groups, *args, **kwargs)
        read.append(table.num_rows)
        return table

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", wrapper)
    return read


def _multi_group_parquet(tmp_path, rows_per_group=5):
    path = str(tmp_path / "math.parquet")
    pq.write_table(pq.read_table(SAMPLE), path, row_group_size=rows_per_group)
    assert pq.ParquetFile(path).metadata.num_row_groups == 7  # 32 rows
    return path


def test_host_blocks_partition_the_rows():
    for n in (0, 1, 7, 32):
        for hosts in (1, 2, 3, 5):
            blocks = [pipeline.host_block(n, h, hosts) for h in range(hosts)]
            assert [i for b in blocks for i in b] == list(range(n))
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    with pytest.raises(ValueError, match="process_index"):
        pipeline.host_block(4, 2, 2)


@pytest.mark.parametrize("hosts", [1, 2, 3])
def test_parquet_hosts_parse_and_read_only_their_rows(tmp_path, parsed, parquet_rows_read, hosts):
    path = _multi_group_parquet(tmp_path)
    single = sources.load_verl_parquet(path).problems
    parsed.clear()
    shares = []
    for h in range(hosts):
        parquet_rows_read.clear()
        before = parsed["verl_row_to_problem"]
        shares.append(pipeline.load_host_problems(path, process_index=h, process_count=hosts).problems)
        assert parsed["verl_row_to_problem"] - before == len(shares[-1]) == len(pipeline.host_block(32, h, hosts))
        # Only the row groups (of 5 rows) overlapping the block are read from the file.
        assert sum(parquet_rows_read) <= len(shares[-1]) + 2 * 5 - 2
        if hosts > 1:
            assert sum(parquet_rows_read) < 32
    assert tuple(p for s in shares for p in s) == single  # same Problems, uids and rows, in order
    assert parsed["verl_row_to_problem"] == 32


def test_jsonl_hosts_parse_only_their_lines_and_keep_skip_messages(tmp_path, parsed):
    path = tmp_path / "train.jsonl"
    lines = [json.dumps({"problem": f"q{i}", "answer": str(i), "level": "Level 2"}) for i in range(9)]
    lines[4] = "{not json"
    lines.insert(2, "")  # blank lines count as rows but hold no record
    path.write_text("\n".join(lines) + "\n")
    single = sources.load_jsonl(path, on_error="skip")
    parsed.clear()
    shares = [pipeline.load_host_problems(str(path), process_index=h, process_count=2, on_error="skip")
              for h in range(2)]
    assert tuple(p for s in shares for p in s.problems) == single.problems
    assert tuple(m for s in shares for m in s.skipped) == single.skipped
    assert [len(s.problems) + s.num_skipped for s in shares] == [4, 5]  # 9 records over 2 hosts
    assert parsed["dict_to_problem"] == 8  # the invalid-JSON line never reaches it
    with pytest.raises(sources.DataError, match=r"train.jsonl row 5: field \(line\): invalid JSON"):
        pipeline.load_host_problems(str(path), process_index=1, process_count=2)
    pipeline.load_host_problems(str(path), process_index=0, process_count=2)  # its rows are all valid


def test_tfds_and_toy_specs_are_sharded_too(monkeypatch):
    records = [{"problem": f"q{i}".encode(), "answer": str(i).encode()} for i in range(7)]
    accessed = []

    class Source:
        def __len__(self):
            return len(records)

        def __getitem__(self, i):
            accessed.append(i)
            return records[i]

    fake = types.SimpleNamespace(data_source=lambda name, *, split, data_dir, download: Source())
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    single = sources.load_problems("tfds:m:test").problems
    accessed.clear()
    shares = [pipeline.load_host_problems("tfds:m:test", process_index=h, process_count=2).problems for h in range(2)]
    assert shares[0] + shares[1] == single and sorted(accessed) == list(range(7))
    assert accessed[:len(shares[0])] == [0, 1, 2]
    toy = [pipeline.load_host_problems("toy:10", process_index=h, process_count=3).problems for h in range(3)]
    assert toy[0] + toy[1] + toy[2] == sources.load_problems("toy:10").problems


def test_load_host_all_concatenates_each_files_share(tmp_path):
    path = _multi_group_parquet(tmp_path)
    specs = [path, "", "toy:6"]
    shares = [pipeline.load_host_all(specs, process_index=h, process_count=2).problems for h in range(2)]
    assert [p.uid for p in shares[0]] == [f"math:{i}" for i in range(16)] + ["toy-0:0", "toy-0:1", "toy-0:2"]
    assert sorted(p.uid for s in shares for p in s) == sorted(p.uid for p in sources.load_all(specs).problems)


def _stub_codec():
    # Prompt length in "tokens" = characters / 4: enough for the overlong filter.
    return types.SimpleNamespace(encode_chat=lambda msgs: [0] * (sum(len(m["content"]) for m in msgs) // 4))


@pytest.mark.parametrize("max_prompt_length", [100_000, 230])
def test_trainer_loads_each_hosts_share_only(tmp_path, parsed, max_prompt_length):
    """Two simulated hosts of run_problems.load_training_problems: the union is the single-host set (also after
    the overlong filter) and each host parsed only its half of the rows."""
    path = _multi_group_parquet(tmp_path)
    c = base_config()
    c.data.train_files = (path, "toy:8")
    c.data.max_prompt_length = max_prompt_length
    rcfg = components.rollout_config(c)
    one, one_stats = run_problems.load_training_problems(c, _stub_codec(), rcfg, process_index=0, process_count=1)
    parsed.clear()
    hosts = []
    for h in range(2):
        before = parsed["verl_row_to_problem"]
        hosts.append(run_problems.load_training_problems(c, _stub_codec(), rcfg, process_index=h, process_count=2))
        assert parsed["verl_row_to_problem"] - before == 16
    # Host 0 holds the first half of each file, host 1 the second (before the overlong filter).
    assert {p.uid for p in hosts[0][0]} <= {f"math:{i}" for i in range(16)} | {f"toy-0:{i}" for i in range(4)}
    assert sorted(p.uid for s, _ in hosts for p in s) == sorted(p.uid for p in one)
    assert not set(p.uid for p in hosts[0][0]) & set(p.uid for p in hosts[1][0])
    assert sum(st["dropped_overlong"] for _, st in hosts) == one_stats["dropped_overlong"]
    if max_prompt_length == 230:
        assert one_stats["dropped_overlong"] > 0


def _sharded(problems, hosts, **kwargs):
    shares = [problems[b.start:b.stop] for b in (pipeline.host_block(len(problems), h, hosts) for h in range(hosts))]
    sizes = [len(s) for s in shares]
    return [pipeline.batches(s, process_index=h, process_count=hosts, sharded=True, shard_sizes=sizes, **kwargs)
            for h, s in enumerate(shares)]


def _problems(n):
    return tuple(sources.Problem(uid=f"p:{i}", question=f"q{i}", answer=str(i), row=i) for i in range(n))


def test_sharded_pipeline_covers_each_epoch_and_keeps_hosts_in_step():
    problems = _problems(24)
    its = _sharded(problems, 2, batch_size=3, seed=5)
    # Each epoch (4 global batches of 6) every problem once; the hosts' shards are disjoint.
    for _ in range(2):
        epoch = [p.uid for _ in range(4) for it in its for p in next(it)]
        assert sorted(epoch) == sorted(p.uid for p in problems)
    assert its[0].epoch == pytest.approx(2.0)
    # Deterministic, and the two hosts are not permuted alike.
    again = _sharded(problems, 2, batch_size=3, seed=5)
    first = [[p.row for p in next(it)] for it in again]
    assert first == [[p.row for p in b] for b in (next(it) for it in _sharded(problems, 2, batch_size=3, seed=5))]
    assert [r - 12 for r in first[1]] != first[0]


def test_sharded_single_host_is_the_unsharded_stream():
    problems = _problems(10)
    a = pipeline.batches(problems, batch_size=4, seed=3, num_epochs=2, process_index=0, process_count=1)
    b = pipeline.batches(problems, batch_size=4, seed=3, num_epochs=2, process_index=0, process_count=1,
                         sharded=True, shard_sizes=[10])
    assert [[p.uid for p in x] for x in a] == [[p.uid for p in x] for x in b]
    assert b.get_state()["config"]["sharded"] is False  # so states of earlier single-host runs resume


def test_sharded_finite_epochs_stop_together_and_resume():
    problems = _problems(11)  # shards of 5 and 6
    its = _sharded(problems, 2, batch_size=2, seed=1, num_epochs=2)
    counts = [len(list(it)) for it in its]
    assert counts == [5, 5]  # 2 epochs of the smaller shard: 10 problems = 5 batches on each host
    its = _sharded(problems, 2, batch_size=2, seed=1)
    for _ in range(4):
        next(its[1])
    state = json.loads(json.dumps(its[1].get_state()))
    expected = [[p.uid for p in next(its[1])] for _ in range(5)]
    resumed = _sharded(problems, 2, batch_size=2, seed=1)[1]
    resumed.set_state(state)
    assert [[p.uid for p in next(resumed)] for _ in range(5)] == expected
    other = pipeline.batches(problems[5:], batch_size=2, seed=1, process_index=1, process_count=2)
    with pytest.raises(ValueError, match="different configuration.*sharded"):
        other.set_state(state)
    with pytest.raises(ValueError, match="unbounded"):
        from masa_jax.toy import world
        pipeline.batches(world.source(seed=0), batch_size=2, process_index=0, process_count=2, sharded=True)
    with pytest.raises(ValueError, match="shard_sizes"):
        pipeline.batches(problems[5:], batch_size=2, process_index=1, process_count=2, sharded=True,
                         shard_sizes=[5, 5])


def test_states_saved_before_the_sharded_fields_still_resume():
    problems = _problems(9)
    it = pipeline.batches(problems, batch_size=2, seed=0, process_index=1, process_count=2)
    next(it)
    state = it.get_state()
    for key in ("sharded", "shard_sizes"):
        del state["config"][key]
    again = pipeline.batches(problems, batch_size=2, seed=0, process_index=1, process_count=2)
    again.set_state(state)
    assert [p.uid for p in next(again)] == [p.uid for p in next(it)]


def test_an_empty_share_is_an_error_on_one_host_and_left_to_build_run_on_several():
    from masa_jax.errors import UserError
    c = base_config()
    c.data.train_files = ("toy:3",)
    c.data.max_prompt_length = 1
    rcfg = components.rollout_config(c)
    with pytest.raises(UserError, match="no training problems left"):
        run_problems.load_training_problems(c, _stub_codec(), rcfg, process_index=0, process_count=1)
    # Several hosts: every host reports its (empty) share and build_run raises on all of them together.
    kept, stats = run_problems.load_training_problems(c, _stub_codec(), rcfg, process_index=1, process_count=2)
    assert kept == [] and stats["dropped_overlong"] == 2


def test_held_out_questions_are_dropped_from_every_hosts_training_share(tmp_path):
    """A training problem whose question (up to whitespace) is in config.eval.files is never trained on,
    whichever host owns it; each host evaluates its own block of the held-out rows."""
    all_toy = sources.load_problems("toy:300").problems
    wanted = [all_toy[i].question for i in (5, 17, 40)]
    rows = [{"problem": wanted[0].replace(" ", "  ", 1), "answer": all_toy[5].answer},  # whitespace differs
            {"problem": wanted[1], "answer": all_toy[17].answer}, {"problem": wanted[2], "answer": all_toy[40].answer}]
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = base_config()
    c.data.train_files = ("toy:300",)
    c.eval.files = (str(heldout),)
    rcfg = components.rollout_config(c)
    in_train = [p for p in all_toy if p.question in wanted]
    kept, dropped = [], 0
    for h in range(2):
        share, questions = run_problems.load_eval_problems(c, process_index=h, process_count=2)
        block = pipeline.host_block(3, h, 2)
        assert [p.question for p in share] == [r["problem"] for r in rows[block.start:block.stop]]
        assert questions == set(wanted)
        problems, stats = run_problems.load_training_problems(c, _stub_codec(), rcfg, process_index=h, process_count=2,
                                                       exclude_questions=questions)
        kept += problems
        dropped += stats["dropped_held_out"]
    assert not {p.question for p in kept} & set(wanted)
    assert dropped == len(in_train) > 3 and len(kept) == 300 - len(in_train)


def test_an_empty_held_out_file_is_a_one_line_error_naming_it(tmp_path):
    empty = tmp_path / "heldout.jsonl"
    empty.write_text("")
    c = base_config()
    c.eval.files = (str(empty),)
    with pytest.raises(UserError, match=rf"^data file {empty} holds no problems: fill it or remove it from "
                                        r"config.eval.files$"):
        run_problems.load_eval_problems(c, process_index=0, process_count=1)


def test_config_tfds_data_dir_reaches_tfds_for_training_and_held_out_specs(tmp_path, monkeypatch):
    """config.data.tfds_data_dir is the data_dir of every tfds: spec (made absolute once); "" leaves TFDS's
    default ($TFDS_DATA_DIR) alone by passing None."""
    calls = []

    def data_source(name, *, split, data_dir, download):
        calls.append((name, split, data_dir))
        return [{"problem": f"{name} {i}".encode(), "answer": b"1"} for i in range(4)]

    monkeypatch.setitem(sys.modules, "tensorflow_datasets", types.SimpleNamespace(data_source=data_source))
    monkeypatch.chdir(tmp_path)
    c = base_config()
    c.data.train_files = ("tfds:train_set:train",)
    c.eval.files = ("tfds:held:test",)
    c.data.tfds_data_dir = "prepared"
    rcfg = components.rollout_config(c)
    share, questions = run_problems.load_eval_problems(c, process_index=0, process_count=1)
    problems, _ = run_problems.load_training_problems(c, _stub_codec(), rcfg, process_index=0, process_count=1,
                                               exclude_questions=questions)
    assert calls == [("held", "test", str(tmp_path / "prepared")), ("train_set", "train", str(tmp_path / "prepared"))]
    assert [p.question for p in share] == [f"held {i}" for i in range(4)] and len(problems) == 4
    calls.clear()
    c.data.tfds_data_dir = ""
    run_problems.load_eval_problems(c, process_index=0, process_count=1)
    assert calls == [("held", "test", None)]
