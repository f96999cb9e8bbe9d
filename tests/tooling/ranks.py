"""Multi-rank tests that cannot hang: each rank a child process under one deadline, each rank's stack on a hang.

``run_ranks(worker, world, tmp_path, args, deadline_s)`` starts ``world`` processes (spawned) that join one
gloo process group over a ``file://`` store in ``tmp_path`` (no port to race for) and call
``worker(rank, world, *args)``. It returns when every rank has exited, or raises ``AssertionError`` with every
rank's exit status and log (its stderr: a traceback, or the stacks of all its threads) when

* a rank fails: the others get a short grace period to finish or fail on their own (a collective the failed
  rank never joins raises on the others once the group's timeout passes), then each prints its stacks and is
  killed;
* the deadline passes: each rank prints the stacks of all its threads (``faulthandler``) and exits.

The process group's timeout is the deadline too, so a collective that one rank skips fails with gloo's own
error on the others rather than waiting for the default 30 minutes.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import time

GRACE_S = 10.0  # how long the other ranks may take to finish or fail after one has failed


def _rank_main(worker, rank: int, world: int, store: str, log_path: str, deadline_s: float, args: tuple) -> None:
    log = open(log_path, "w", buffering=1)
    os.dup2(log.fileno(), 2)  # tracebacks and faulthandler's stacks go to this rank's log
    sys.stderr = log
    faulthandler.enable(file=log, all_threads=True)
    faulthandler.register(signal.SIGUSR1, file=log, all_threads=True)  # the parent's "print your stacks"
    faulthandler.dump_traceback_later(deadline_s, exit=True, file=log)  # past the deadline: stacks, then exit
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    # The ranks share this machine's cores: each on one thread (two ranks of two threads each on two cores
    # run a step many times slower, waiting on each other in every collective).
    torch.set_num_threads(1)

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=deadline_s))  # fmt: skip
    try:
        worker(rank, world, *args)
    finally:
        dist.destroy_process_group()
        faulthandler.cancel_dump_traceback_later()


def run_ranks(worker, world: int, tmp_path, args: tuple = (), deadline_s: float = 120.0) -> None:
    """Run ``worker(rank, world, *args)`` on ``world`` gloo ranks; see the module docstring."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    store = os.path.join(str(tmp_path), "ranks.store")
    logs = [os.path.join(str(tmp_path), f"rank{rank}.log") for rank in range(world)]
    procs = [ctx.Process(target=_rank_main, args=(worker, rank, world, store, logs[rank], deadline_s, args))
             for rank in range(world)]  # fmt: skip
    for p in procs:
        p.start()
    started = time.monotonic()
    failed_at = None
    # (the ranks' own deadline fires first; this one covers a rank that cannot even print its stacks)
    while any(p.is_alive() for p in procs) and time.monotonic() - started < deadline_s + 2 * GRACE_S:
        if failed_at is None and any(p.exitcode not in (None, 0) for p in procs):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > GRACE_S:
            break
        time.sleep(0.05)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        os.kill(p.pid, signal.SIGUSR1)
    if hung:
        time.sleep(1.0)  # (time to write the stacks)
    for p in hung:
        p.kill()
    for p in procs:
        p.join()
    if all(p.exitcode == 0 for p in procs):
        return
    report = []
    for rank, (p, log) in enumerate(zip(procs, logs)):
        status = "killed after printing its stacks" if p in hung else f"exit code {p.exitcode}"
        with open(log) as f:
            text = f.read()
        report.append(f"--- rank {rank}: {status} ---\n{text[-6000:]}")
    elapsed = time.monotonic() - started
    raise AssertionError(f"{world} ranks did not all finish ({elapsed:.0f} s, deadline {deadline_s:.0f} s):\n"
                         + "\n".join(report))  # fmt: skip
