"""common/processes.py: a new process for every task, one torch thread each when asked."""
import os

from common.processes import fresh_processes


def threads_and_pid() -> tuple[int, int]:
    import torch

    return torch.get_num_threads(), os.getpid()


def test_every_task_gets_a_new_one_thread_process():
    with fresh_processes(2, one_thread=True, preload=["torch"]) as pool:
        seen = [f.result() for f in [pool.submit(threads_and_pid) for _ in range(3)]]
    assert [threads for threads, _ in seen] == [1, 1, 1]
    assert len({pid for _, pid in seen} | {os.getpid()}) == 4
