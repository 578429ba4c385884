"""The pool that runs a study's and a demo's runs side by side: order, threads, logs and failures."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from echogen_rl.experiments.jobs import Job, JobError, follow_thread_share, run_jobs


def record(path: str, needs: str | None = None) -> dict:
    """Writes what it saw (its threads, the file it waits for) to `path`, prints a line, returns the same."""
    seen = {"threads": torch.get_num_threads(), "needed": Path(needs).read_text() if needs else None}
    print(f"recorded {path}")
    Path(path).write_text(json.dumps(seen))
    return seen


def fail(message: str) -> None:
    print("about to fail")
    raise ValueError(message)


def test_jobs_run_after_what_they_wait_for_on_a_share_of_the_cores(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    jobs = [
        Job("b", record, {"path": b, "needs": a}, after=("a",)),  # listed first, must still wait for a
        Job("a", record, {"path": a}, log=tmp_path / "logs" / "a.log"),
        Job("c", record, {"path": c}),
    ]
    results = run_jobs(jobs, workers=2, cores=2, quiet=True)
    assert results["b"]["needed"] == Path(a).read_text()
    # a and c were ready together: one core each; never more threads than cores.
    assert results["a"]["threads"] == 1 and results["c"]["threads"] == 1
    assert "recorded" in (tmp_path / "logs" / "a.log").read_text()
    # One job alone gets every core; a light job (scoring) takes none from a long one ready with it.
    assert run_jobs([Job("a", record, {"path": a})], workers=2, cores=2, quiet=True)["a"]["threads"] == 2
    jobs = [Job("long", record, {"path": a}), Job("light", record, {"path": b}, light=True)]
    results = run_jobs(jobs, workers=2, cores=2, quiet=True)
    assert results["long"]["threads"] == 2 and results["light"]["threads"] == 1


def test_in_process_jobs_keep_the_order_and_restore_the_threads(tmp_path):
    before = torch.get_num_threads()
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    jobs = [Job("b", record, {"path": b, "needs": a}, after=("a",)), Job("a", record, {"path": a})]
    results = run_jobs(jobs, workers=1, cores=1, quiet=True)
    assert results["b"]["needed"] is not None and results["a"]["threads"] == 1
    assert torch.get_num_threads() == before


def follow(limit: float = 60.0) -> list[int]:
    """Follows the pool's thread share until it has gone from 1 to 2 threads (or `limit` seconds pass); returns the
    counts it took up, in order."""
    seen: list[int] = []
    deadline = time.monotonic() + limit
    while seen[-2:] != [1, 2] and time.monotonic() < deadline:
        threads = follow_thread_share()
        if not seen or seen[-1] != threads:
            seen.append(threads)
        time.sleep(0.02)
    return seen


def pause(seconds: float) -> int:
    time.sleep(seconds)
    return torch.get_num_threads()


def test_a_running_job_takes_the_core_a_finished_job_left():
    # Both ready at once: one core each. When the short one ends, the one running gets its core.
    jobs = [Job("follower", follow), Job("short", pause, {"seconds": 1.0})]
    results = run_jobs(jobs, workers=2, cores=2, quiet=True)
    assert results["follower"] == [1, 2]
    assert results["short"] == 1


def test_a_long_job_gives_a_core_back_to_a_job_ready_beside_it():
    # The long job alone could take both cores; the light one ready with it gets one of them, and gives it back.
    jobs = [Job("follower", follow), Job("light", pause, {"seconds": 1.0}, light=True)]
    results = run_jobs(jobs, workers=2, cores=2, quiet=True)
    assert results["follower"][-2:] == [1, 2]
    assert results["light"] == 1


def test_following_a_share_outside_a_pool_changes_nothing():
    before = torch.get_num_threads()
    assert follow_thread_share() == before
    # In-process jobs (one worker) keep the threads they were given.
    assert run_jobs([Job("p", pause, {"seconds": 0.0})], workers=1, cores=1, quiet=True)["p"] == 1
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failing_job_is_named_with_its_log_and_what_waits_for_it_never_starts(tmp_path, workers):
    log = tmp_path / "bad.log"
    jobs = [
        Job("bad", fail, {"message": "no such layout"}, log=log),
        Job("after-bad", record, {"path": str(tmp_path / "never")}, after=("bad",)),
    ]
    with pytest.raises(JobError, match=r"job bad failed: no such layout \(log: .*bad.log\)"):
        run_jobs(jobs, workers=workers, cores=2, quiet=True)
    assert "about to fail" in log.read_text()
    assert not (tmp_path / "never").exists()


def sleep_and_report(path: str) -> None:
    Path(path).write_text(str(os.getpid()))
    time.sleep(60)


def test_workers_end_when_the_pool_process_is_killed(tmp_path):
    pid_file = tmp_path / "worker.pid"
    script = (
        "from echogen_rl.experiments.jobs import Job, run_jobs\n"
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from test_jobs import sleep_and_report\n"
        "if __name__ == '__main__':\n"
        f"    run_jobs([Job('sleep', sleep_and_report, {{'path': {str(pid_file)!r}}})], workers=2, quiet=True)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script, str(Path(__file__).parent)])
    deadline = time.monotonic() + 60
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    worker = int(pid_file.read_text())
    parent.kill()  # SIGKILL: no cleanup runs in the pool's process
    parent.wait()
    deadline = time.monotonic() + 10
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(worker), "the worker outlived its pool"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_unknown_dependencies_repeated_names_and_cycles_are_refused():
    with pytest.raises(ValueError, match="unknown jobs"):
        run_jobs([Job("a", record, {"path": "x"}, after=("b",))], quiet=True)
    with pytest.raises(ValueError, match="repeat"):
        run_jobs([Job("a", record), Job("a", record)], quiet=True)
    with pytest.raises(ValueError, match="cycle"):
        run_jobs([Job("a", record, after=("b",)), Job("b", record, after=("a",))], quiet=True)
