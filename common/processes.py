"""Fresh worker processes: what a task loads (models, threads, a fragmented heap) leaves with it.

On a CPU, work that trains several small models at once runs each in its own process on one core:
two one-thread processes on two cores train 1.2x the tokens/s of one two-thread process, and an
OpenMP thread that waits for a busy core stalls its whole team.
"""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
from collections.abc import Sequence


def fresh_processes(jobs: int = 1, one_thread: bool = False, preload: Sequence[str] = ()) -> concurrent.futures.Executor:
    """A pool of ``jobs`` processes, a new one for every task. With ``preload``, they fork from a
    server that imported those modules once (a task starts in a fraction of a second instead of
    importing torch again; nothing has run in the server, so a fork starts as clean as a spawned
    process); without, each is spawned."""
    if preload:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(list(preload))
    else:
        context = multiprocessing.get_context("spawn")
    return concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context, max_tasks_per_child=1,
                                                  initializer=_one_torch_thread if one_thread else None)


def _one_torch_thread() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
