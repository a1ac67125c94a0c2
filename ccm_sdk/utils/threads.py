"""The CPU thread count for generation: chosen deliberately, not left to torch's default.

On a busy machine with few cores, torch's default (one thread per core) lets its threads wait on
one another and on other processes: generation on a loaded 2-core machine ran 20-40x slower with
the default than with one thread. ``benchmarks/bench_threads.py`` measures 1, 2 and the default
side by side on this machine.
"""

from __future__ import annotations

import os

from ..errors import InputError

MAX_DEFAULT_THREADS = 4  # past this, small models gain little on CPU and lose to synchronisation
FEW_CORES = 2  # at most this many cores: one thread


def available_cores() -> int:
    """CPU cores this process may run on (its affinity where the platform tells it, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def env_threads() -> int | None:
    """``OMP_NUM_THREADS`` as a positive integer, or None when unset; any other value is an InputError."""
    text = os.environ.get("OMP_NUM_THREADS", "").strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise InputError(f"OMP_NUM_THREADS: expected a positive integer, got {text!r}")
    return value


def default_threads(torch_default: int | None = None) -> int:
    """``OMP_NUM_THREADS`` when set; else 1 on a machine with at most 2 cores; else torch's default, at most 4.

    ``torch_default``: torch's own choice (``torch.get_num_threads()`` before any change), read when not given.
    """
    from_env = env_threads()
    if from_env is not None:
        return from_env
    if available_cores() <= FEW_CORES:
        return 1
    if torch_default is None:
        import torch

        torch_default = torch.get_num_threads()
    return max(1, min(torch_default, MAX_DEFAULT_THREADS))


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op thread count to ``threads`` (None: :func:`default_threads`); returns the count set."""
    import torch

    if threads is None:
        threads = default_threads()
    elif isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise InputError(f"--threads: expected a positive integer, got {threads!r}")
    torch.set_num_threads(threads)
    return threads


THREADS_HELP = ("CPU threads for generation (default: $OMP_NUM_THREADS when set; else 1 on a machine with at most 2 cores, "
                "where more threads measured many times slower under load; else torch's default, at most 4)")
