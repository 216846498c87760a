"""CPU threads that share a busy machine well: as many threads as cores that are free at the start.

PyTorch's OpenMP threads spin-wait between parallel regions. On a machine where another process
holds a core, a spinning thread burns the time slice its partner needs, and every region waits for a
thread that is not running: generation on 2 cores beside one busy process ran 4-15x slower than on a
quiet machine (BENCHMARKS.md, "Speed on a busy machine"). The ``saereward`` command therefore
measures, before torch (and its OpenMP runtime) starts, how many cores other processes leave idle,
and when that is fewer than the cores it may use it sets:

* ``OMP_NUM_THREADS`` to the free cores (at least 1), so no thread waits for a core it cannot get;
* ``OMP_WAIT_POLICY=PASSIVE`` when that still leaves a team of two or more threads, so idle threads
  sleep instead of spinning on a core another process needs.

On a quiet machine it changes nothing: passive waiting there cost 40 % of generation speed (the same
benchmark), more than it saves. Either variable set by the user wins, and
``SAEREWARD_TAME_THREADS=0`` turns this off. A stage's own ``threads`` setting (``--threads``) still
calls ``torch.set_num_threads`` afterwards. The count is taken once, at the start: load that arrives
later is not followed.

Once torch is imported, :func:`warm_vector_math` makes the process's first call into MKL's vector math
on one thread, so that no first call races between threads (see its docstring for the measurement).
"""

from __future__ import annotations

import os
import time
from collections.abc import MutableMapping

OFF = "SAEREWARD_TAME_THREADS"


def _cpu_times() -> tuple[int, int] | None:
    """``(busy, total)`` jiffies of all CPUs since boot, from ``/proc/stat`` (None off Linux)."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def free_cores(window: float = 0.2) -> int | None:
    """Cores this process may use that other processes left idle over ``window`` seconds (>= 1)."""
    a = _cpu_times()
    time.sleep(window)
    b = _cpu_times()
    if a is None or b is None or b[1] <= a[1]:
        return None
    ncpu_all = os.cpu_count() or 1
    busy = (b[0] - a[0]) / (b[1] - a[1]) * ncpu_all  # cores' worth of work by everyone else
    return max(1, min(usable_cores(), round(ncpu_all - busy)))


def tame_threads(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """On a busy machine, set a free-core thread count (and passive waiting for a team of two or
    more) in ``environ`` (default ``os.environ``), each unless already set; returns what it set.
    Must run before torch is imported to take effect."""
    env = os.environ if environ is None else environ
    if env.get(OFF, "1") == "0" or "OMP_NUM_THREADS" in env:
        return {}
    free = free_cores()
    if free is None or free >= usable_cores():
        return {}  # a quiet machine: torch's defaults are fastest
    done = {"OMP_NUM_THREADS": str(free)}
    if free > 1 and "OMP_WAIT_POLICY" not in env:
        done["OMP_WAIT_POLICY"] = "PASSIVE"
    env.update(done)
    return done


_VML_WARM = False


def warm_vector_math() -> None:
    """Make this process's first call into MKL's vector math functions on one thread (idempotent).

    PyTorch's CPU wheel computes ``cos``, ``sin``, ``exp``, ``log``, ``tanh``, ``erf`` and more through
    MKL's vector math library. When the process's first such call is made by several OpenMP threads at
    once, one of them can run it on a less accurate code path. Measured (torch 2.13.0 CPU wheel, MKL
    2024.0, 2-core AVX-512 VM, 2 threads, ``x.cos()`` on 16,384 values up to 16.4 rad, the first call
    against the second in a fresh process): the first call was off by up to 1.5e-4 on one thread's share
    of the rows in 7 of 44 processes; in none of 44 after a one-thread call first (24 with this one's
    ``sin``, 20 with ``cos`` and ``sin``), nor of 24 with MKL held to AVX2
    (``MKL_ENABLE_INSTRUCTIONS=AVX2``). In a model that first call is the rotary embedding's ``cos``:
    the first forward of a process (an evaluation's clean run, a run's first rollouts) then differed
    from the same forward run later. One call on 8 values, below ATen's parallel grain, runs on the
    calling thread and settles it. :func:`~saereward.model.lm.load_model`, the SAE worker pool and the
    command call this.
    """
    global _VML_WARM
    if _VML_WARM:
        return
    import torch

    torch.sin(torch.zeros(8))
    _VML_WARM = True
