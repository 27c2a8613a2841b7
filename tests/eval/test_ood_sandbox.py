"""MBPP's sandbox (masa_jax.evaluation.ood.sandbox): a correct program passes; hostile programs each score 0,
nothing escapes, the evaluator survives. The child runs as an unprivileged uid (checked first: root ignores
RLIMIT_NPROC), so the fork-bomb test runs only once that holds; each program is bounded by a short wall clock."""
import os
import socket
import threading
import time
import uuid

import pytest

from masa_jax.evaluation.ood import sandbox

FAST = sandbox.SandboxLimits(wall_s=5.0, cpu_s=2, memory_bytes=512 << 20, file_bytes=1 << 16, processes=4)


def _run(src, limits=FAST):
    return sandbox.run_program(src, limits)


def test_child_is_unprivileged_and_limited():
    # Before any fork bomb: the program does not run as root, and the process limit is in force.
    r = _run("import os, resource\n"
             "assert os.getuid() != 0 and os.geteuid() != 0 and os.getgid() != 0, os.getuid()\n"
             "assert resource.getrlimit(resource.RLIMIT_NPROC) == (4, 4)\n"
             "assert resource.getrlimit(resource.RLIMIT_CPU)[0] == 2\n"
             "assert resource.getrlimit(resource.RLIMIT_FSIZE) == (65536, 65536)\n")
    assert r.status == "passed", r


def test_correct_program_passes_and_wrong_one_fails():
    assert _run("def add(a, b):\n    return a + b\nassert add(1, 2) == 3\nimport re, math, collections\n").passed
    r = _run("def add(a, b):\n    return a - b\nassert add(1, 2) == 3\n")
    assert r.status == "failed" and "AssertionError" in r.stderr_tail


@pytest.mark.parametrize("src", ["import sys\nsys.exit(0)\nassert False\n", "import os\nos._exit(0)\n",
                                 "quit()\n"])
def test_exiting_before_the_asserts_is_a_failure(src):
    assert not _run(src).passed


def test_infinite_loop_and_sleep_are_stopped():
    t = time.monotonic()
    spin = _run("while True:\n    pass\n")
    sleep = _run("import time\ntime.sleep(60)\n", sandbox.SandboxLimits(wall_s=2.0, cpu_s=2))
    assert spin.status == "timeout" and sleep.status == "timeout"
    assert time.monotonic() - t < 15


def test_memory_bomb_fails():
    r = _run("blocks = []\nwhile True:\n    blocks.append(bytearray(10 ** 7))\n")
    assert r.status == "failed" and "MemoryError" in r.stderr_tail


def test_fork_bomb_is_bounded():
    # Only once the child is known to be unprivileged (test_child_is_unprivileged_and_limited's check).
    probe = _run("import os\nassert os.getuid() != 0\n")
    assert probe.passed
    t = time.monotonic()
    for src in ("import os\nwhile True:\n    os.fork()\n",
                "import multiprocessing\n",
                # Threads are processes to RLIMIT_NPROC: the kernel's own bound, past the audit hook.
                "import threading, time\nts = [threading.Thread(target=time.sleep, args=(3,)) for _ in range(100)]\n"
                "[t.start() for t in ts]\n"):
        assert not _run(src).passed
    assert time.monotonic() - t < 20
    assert _run("assert 1 + 1 == 2\n").passed  # the machine is fine afterwards


def test_writes_outside_the_working_directory_do_not_happen(tmp_path):
    outside = f"/tmp/masa_sandbox_escape_{uuid.uuid4().hex}"
    mine = tmp_path / "victim.txt"
    mine.write_text("keep")
    for src in (f"open({outside!r}, 'w').write('x')\n",
                f"import os\nfd = os.open({outside!r}, os.O_CREAT | os.O_WRONLY)\n",
                f"import os\nos.remove({str(mine)!r})\n",
                f"open({str(mine)!r}, 'w').write('gone')\n",
                f"import shutil\nshutil.rmtree({str(tmp_path)!r})\n",
                "open('../../escape', 'w').write('x')\n",
                "open('x' * 10 + '.txt', 'w').write('y' * 10 ** 6)\n"):  # inside, but past the file-size limit
        assert not _run(src).passed, src
    assert not os.path.exists(outside) and mine.read_text() == "keep"
    # Its own working directory is writable, and thrown away afterwards.
    assert _run("open('scratch.txt', 'w').write('ok')\nassert open('scratch.txt').read() == 'ok'\n").passed


def test_environment_secrets_are_not_readable(monkeypatch):
    monkeypatch.setenv("MASA_TEST_SECRET", "hunter2")
    assert _run("import os\nassert 'MASA_TEST_SECRET' not in os.environ, os.environ\n").passed
    parent = os.getpid()
    r = _run(f"print(open('/proc/{parent}/environ').read())\n")
    assert r.status == "failed" and "hunter2" not in r.stderr_tail


def test_os_system_and_subprocess_are_refused():
    marker = f"/tmp/masa_sandbox_system_{uuid.uuid4().hex}"
    for src in (f"import os\nos.system('touch {marker}')\n", f"import subprocess\nsubprocess.run(['touch', '{marker}'])\n",
                f"import os\nos.execv('/usr/bin/touch', ['touch', '{marker}'])\n",
                f"import os\nos.posix_spawn('/usr/bin/touch', ['touch', '{marker}'], {{}})\n",
                "import ctypes\nctypes.CDLL(None).fork()\n",
                "import os, signal\nos.kill(1, signal.SIGTERM)\n"):
        assert not _run(src).passed, src
    assert not os.path.exists(marker)


def test_no_network():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    accepted = []

    def accept():
        try:
            accepted.append(server.accept())
        except OSError:
            pass

    r = _run(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n")
    thread = threading.Thread(target=accept)
    thread.start()
    thread.join()
    server.close()
    assert r.status == "failed" and not accepted
    if os.geteuid() == 0:  # root can always make a network namespace: it holds the loopback only
        devs = _run("lines = open('/proc/self/net/dev').read().splitlines()[2:]\n"
                    "assert [l.split(':')[0].strip() for l in lines] == ['lo'], lines\n")
        assert devs.passed, devs


def test_many_programs_in_parallel_keep_their_order():
    srcs = [f"assert {i} % 2 == 0\n" for i in range(8)]
    assert [r.passed for r in sandbox.run_programs(srcs, FAST, workers=2)] == [i % 2 == 0 for i in range(8)]
