"""tooling.ranks: a multi-rank run that hangs or fails ends within its deadline, with every rank's stack (the
runs that finish are every test in test_distributed.py)."""

import time

import pytest
from tooling.ranks import run_ranks


def _rank_one_skips_the_collective(rank, world):
    import torch
    import torch.distributed as dist

    if rank == 0:
        dist.all_reduce(torch.ones(1))  # waits for rank 1, which never comes
    else:
        time.sleep(600)


def _rank_one_fails(rank, world):
    import torch.distributed as dist

    if rank == 1:
        raise RuntimeError("rank 1 gives up")
    dist.barrier()


def test_a_hang_ends_at_the_deadline_with_every_rank_stack(tmp_path):
    start = time.monotonic()
    with pytest.raises(AssertionError) as err:
        run_ranks(_rank_one_skips_the_collective, 2, tmp_path, deadline_s=5)
    assert time.monotonic() - start < 40
    report = str(err.value)
    assert "--- rank 0" in report and "--- rank 1" in report
    assert "_rank_one_skips_the_collective" in report.split("--- rank 1")[1]  # rank 1's own stack, in the sleep
    assert "_rank_one_skips_the_collective" in report.split("--- rank 1")[0]  # rank 0's, in the all-reduce


def test_a_failed_rank_is_reported_without_waiting_for_the_deadline(tmp_path):
    start = time.monotonic()
    with pytest.raises(AssertionError, match="rank 1 gives up"):
        run_ranks(_rank_one_fails, 2, tmp_path, deadline_s=300)
    assert time.monotonic() - start < 60
