"""Runs that do not depend on each other, side by side: a small pool of worker processes for the study and the demo.

The shapes world's model is tiny, and torch spreads its small matrix products over cores poorly: on 2 cores, two
CycleRL runs of one thread each finished in 55 s together where one run of two threads took 46 s alone (1.66x the
work per second). So a job gets a share of the cores, never more in all than there are, and jobs wait for the jobs
they start from (`after`).

A long job's share can change while it runs: when a core falls free and no job waits for it, a running long job
gets it; when a job is ready and no core is free, a long job holding more than one gives one back. A job takes up
its share between steps by calling [`follow_thread_share`] (a training run does so through
[`echogen_rl.scripts.runner.FollowThreadShare`]); one that never calls it keeps the threads it started with
(and a core it gave back is then shared until it ends).

Each job's output goes to its own log file; the pool logs one line as each job ends (this module's logger, at
INFO). When a job fails, the jobs already running finish (their results are saved, and a study resumes from them),
the rest are not started, and the error names the job and its log.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainerCallback

from echogen_rl.models.architectures import SHIPPED_CONFIGS

logger = logging.getLogger(__name__)


@dataclass
class Job:
    """One unit of work: `fn(**kwargs)` in a worker, after the jobs named in `after` have ended.

    Args:
        name (`str`): names the job in progress lines and errors; unique in a pool.
        fn (`Callable`): a module-level function (workers are spawned: it must pickle by name).
        kwargs (`dict`): its arguments, picklable.
        after (`tuple[str, ...]`, *optional*): jobs that must end first.
        log (`Path`, *optional*): where the job's standard output and error go; the terminal when unset.
        light (`bool`, *optional*, defaults to `False`): a short job (seconds: scoring a model). It runs on one
            thread, and long jobs that could start with it start first, with every free core; it then takes a core
            back from a long job running on more than one (see the module docstring).
    """

    name: str
    fn: Callable
    kwargs: dict = field(default_factory=dict)
    after: tuple[str, ...] = ()
    log: Path | None = None
    light: bool = False


class JobError(RuntimeError):
    """A job raised; the message names it and its log."""


def default_workers() -> int:
    """One worker per core, at most 4: the tiny model's runs gain little from a second thread (module docstring)."""
    return max(1, min(4, os.cpu_count() or 1))


# In a worker: the pool's thread shares (one slot per job running) and the slot of the job running here.
_SHARES = None
_SLOT: int | None = None


def follow_thread_share() -> int:
    """In a job: takes up the threads the pool now gives it, and returns the count. Outside a pool's worker, or in a
    job run in-process, the threads stay as they are."""
    import torch

    if _SHARES is not None and _SLOT is not None:
        share = _SHARES[_SLOT]
        if share > 0 and share != torch.get_num_threads():
            torch.set_num_threads(share)
    return torch.get_num_threads()


def _start_worker(shares) -> None:
    global _SHARES
    _SHARES = shares
    _end_with_parent()


def _end_with_parent() -> None:
    """In a worker, as it starts: end when the pool's process ends (Linux). A study stopped with a signal would
    otherwise leave its workers training on, unseen, and slowing whatever runs next."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _run(fn: Callable, kwargs: dict, threads: int, log: str | None, slot: int | None = None):
    """In a worker: `fn(**kwargs)` on `threads` torch threads (then on the share of `slot`, see
    [`follow_thread_share`]), its output (Python's and C's) appended to `log`."""
    import torch

    global _SLOT
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    _SLOT = slot
    try:
        if log is None:
            return fn(**kwargs)
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush(), sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        # Both the file descriptors (C and subprocess output) and Python's streams, which a caller (pytest, a
        # notebook) may have replaced.
        with open(log, "a") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            os.dup2(sink.fileno(), 1), os.dup2(sink.fileno(), 2)
            try:
                return fn(**kwargs)
            finally:
                sys.stdout.flush(), sys.stderr.flush()
                os.dup2(saved[0], 1), os.dup2(saved[1], 2)
                os.close(saved[0]), os.close(saved[1])
    finally:
        _SLOT = None
        torch.set_num_threads(before)


def _failed(job: Job, err: Exception) -> str:
    return f"job {job.name} failed: {err}" + (f" (log: {job.log})" if job.log else "")


def _ordered(jobs: Sequence[Job]) -> list[Job]:
    """`jobs` in an order that runs each after the jobs it waits for, otherwise as listed; a clear error for a
    repeated name, an unknown dependency or a cycle."""
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise ValueError(f"job names repeat: {sorted(n for n in set(names) if names.count(n) > 1)}")
    for job in jobs:
        unknown = [a for a in job.after if a not in names]
        if unknown:
            raise ValueError(f"job {job.name!r} waits for unknown jobs {unknown}")
    order: list[Job] = []
    pending = list(jobs)
    while pending:
        done = {j.name for j in order}
        job = next((j for j in pending if set(j.after) <= done), None)
        if job is None:
            raise ValueError(f"jobs wait for each other in a cycle: {[j.name for j in pending]}")
        order.append(job)
        pending.remove(job)
    return order


def run_jobs(
    jobs: Sequence[Job], workers: int | None = None, cores: int | None = None, prefix: str = "", quiet: bool = False
) -> dict:
    """Runs `jobs`, each when the jobs it waits for have ended, at most `workers` at a time; returns `{name: result}`.

    Args:
        jobs (`Sequence[Job]`): in order of preference: of the jobs ready to start, the first listed starts first.
        workers (`int`, *optional*, defaults to [`default_workers`]): jobs at a time. With 1, jobs run one after
            another in this process (no workers are spawned), each on `cores` threads.
        cores (`int`, *optional*, defaults to `torch.get_num_threads()`): torch threads shared out among the jobs
            running (torch's default is the machine's physical cores; a caller that set fewer keeps to them):
            a long job starts with `free cores // long jobs that could start now` threads (at least 1), a light one
            with 1, and each only when that many are free; long jobs' shares then follow what falls free and what
            waits (module docstring).
        prefix (`str`, *optional*): begins each progress line, e.g. `"[study]"`.
        quiet (`bool`, *optional*): no progress lines.

    Raises:
        `JobError`: a job raised. Jobs running then end first; jobs not started are not started.
    """
    jobs = _ordered(jobs)
    workers = workers or default_workers()
    if cores is None:
        import torch

        cores = torch.get_num_threads()
    say = (lambda line: None) if quiet else (lambda line: logger.info("%s", f"{prefix} {line}".strip()))
    if workers == 1:
        return _run_in_process(jobs, cores, say)
    return _run_in_pool(jobs, workers, cores, say)


def _run_in_process(jobs: list[Job], cores: int, say: Callable[[str], None]) -> dict:
    """[`run_jobs`] with one worker: the jobs one after another in this process, each on `cores` threads."""
    results: dict = {}
    for job in jobs:
        clock = time.perf_counter()
        try:
            results[job.name] = _run(job.fn, job.kwargs, cores, str(job.log) if job.log else None)
        except Exception as err:
            raise JobError(_failed(job, err)) from err
        say(f"{len(results)}/{len(jobs)} {job.name}: {time.perf_counter() - clock:.0f} s")
    return results


def _run_in_pool(jobs: list[Job], workers: int, cores: int, say: Callable[[str], None]) -> dict:
    """[`run_jobs`] with `workers` spawned processes sharing `cores` threads (see the module docstring)."""
    results: dict = {}
    pending, running, failures = list(jobs), {}, []
    free, slots = cores, list(range(workers))
    context = multiprocessing.get_context("spawn")  # forking a process that has run torch's threads can hang
    shares = context.Array("i", workers, lock=False)  # written here, read by the jobs (one int per slot)
    most: dict[str, int] = {}  # the most threads each job was given
    pool = concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=context, initializer=_start_worker, initargs=(shares,)
    )
    with pool:
        while pending or running:
            ready = [j for j in pending if set(j.after) <= set(results)] if not failures else []
            while ready and len(running) < workers:
                job = ready[0]
                long_ready = sum(not j.light for j in ready)
                threads = 1 if job.light else max(1, free // min(long_ready, workers - len(running)))
                if threads > free:
                    # A long job running on more than one thread gives one back (at its next step).
                    donors = [s for j, s, _ in running.values() if not j.light and shares[s] > 1]
                    if not donors:
                        break
                    shares[max(donors, key=lambda s: shares[s])] -= 1
                    free += 1
                    continue
                ready.pop(0)
                pending.remove(job)
                slot = slots.pop(0)
                shares[slot] = most[job.name] = threads
                log = str(job.log) if job.log else None
                future = pool.submit(_run, job.fn, job.kwargs, threads, log, slot)
                running[future] = (job, slot, time.perf_counter())
                free -= threads
            free = _give_free_cores(free, running, shares, most)
            if not running:
                break
            finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in finished:
                job, slot, clock = running.pop(future)
                free += shares[slot]
                slots.append(slot)
                threads = most[job.name]
                try:
                    results[job.name] = future.result()
                except Exception as err:
                    failures.append((job, err))
                    say(_failed(job, err))
                    continue
                others = ", ".join(j.name for j, _, _ in running.values())
                say(
                    f"{len(results)}/{len(jobs)} {job.name}: {time.perf_counter() - clock:.0f} s on {'up to ' * (threads > 1)}"
                    f"{threads} thread{'s' if threads > 1 else ''}" + (f" (running: {others})" if others else "")
                )
    if failures:
        job, err = failures[0]
        skipped = f"; {len(pending)} jobs not started" if pending else ""
        raise JobError(_failed(job, err) + skipped) from err
    return results


def _give_free_cores(free: int, running: dict, shares, most: dict[str, int]) -> int:
    """Cores no job can start on go to the long jobs running, fewest threads first; records each job's most
    threads in `most`. Returns the cores still free."""
    takers = [s for j, s, _ in running.values() if not j.light]
    while free > 0 and takers:
        slot = min(takers, key=lambda s: shares[s])
        shares[slot] += 1
        free -= 1
    for job, slot, _ in running.values():
        most[job.name] = max(most[job.name], shares[slot])
    return free


# PMTP's second phase on the shapes world, the grounder's shape curriculum (kind negatives from the trained PMTP):
# the demo's and the study's `pmtp` is the model after it.
PMTP_KINDS_CONFIG = "pmtp/shapes_tiny_kinds"


def shapes_config(stage: str) -> Path:
    """The shipped shapes config of `stage` (`recipes/configs/<stage>/shapes_tiny.yaml`), which demo and study runs
    start from; `"<stage>/<name>"` names another of the stage's configs (`recipes/configs/<stage>/<name>.yaml`)."""
    if "/" in stage:
        return SHIPPED_CONFIGS / f"{stage}.yaml"
    return SHIPPED_CONFIGS / stage / "shapes_tiny.yaml"


def run_settings(output_dir, seed: int = 0) -> dict:
    """What a run inside a demo or a study changes besides its budget: where it writes, its seed, and no
    intermediate saving, evaluation or reporting."""
    return {
        "output_dir": str(output_dir),
        "seed": seed,
        "save_strategy": "no",
        "eval_strategy": "no",
        "num_eval_samples": 0,
        "report_to": "none",
    }


class FollowThreadShare(TrainerCallback):
    """Before each step, takes up the threads a job pool now gives the run ([`echogen_rl.experiments.jobs.follow_thread_share`]):
    a stage on the critical path gets the core a finished job left. `threads` lists the counts it ran on, in order."""

    def __init__(self):
        self.threads: list[int] = []

    def on_step_begin(self, args, state, control, **kwargs):
        threads = follow_thread_share()
        if not self.threads or self.threads[-1] != threads:
            self.threads.append(threads)
