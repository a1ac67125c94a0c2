"""The thread count generation runs with: OMP_NUM_THREADS, else 1 on <= 2 cores, else torch's default capped at 4."""

from __future__ import annotations

import threading

import pytest
import torch

from ccm_sdk.cli import main
from ccm_sdk.errors import InputError
from ccm_sdk.utils import threads


@pytest.fixture()
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(("env", "cores", "torch_default", "expected"), [
    ("3", 2, 2, 3),    # OMP_NUM_THREADS wins
    (None, 1, 1, 1),
    (None, 2, 2, 1),   # a 2-core machine: one thread
    (None, 8, 8, 4),   # capped at 4
    (None, 4, 3, 3),   # torch's own choice below the cap
])  # fmt: skip
def test_default_threads(monkeypatch, env, cores, torch_default, expected):
    if env is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", env)
    monkeypatch.setattr(threads, "available_cores", lambda: cores)
    assert threads.default_threads(torch_default) == expected


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_a_bad_omp_num_threads_is_an_input_error(monkeypatch, value):
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    with pytest.raises(InputError, match=f"OMP_NUM_THREADS: expected a positive integer, got '{value}'"):
        threads.default_threads(4)


def test_set_threads_applies_to_threads_started_later(restore_threads):
    assert threads.set_threads(1) == 1 and torch.get_num_threads() == 1
    seen = []
    worker = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))  # as ccm serve's request threads
    worker.start()
    worker.join()
    assert seen == [1]
    assert threads.set_threads(2) == 2 and torch.get_num_threads() == 2
    with pytest.raises(InputError, match="--threads: expected a positive integer, got 0"):
        threads.set_threads(0)


def test_generate_takes_threads_and_checks_them_before_loading(tmp_path, capsys, restore_threads):
    assert main(["generate", "--model", str(tmp_path / "none"), "--prompt", "x", "--threads", "0"]) == 2
    err = capsys.readouterr().err
    assert "--threads: expected a positive integer, got 0" in err and "none" not in err
    assert main(["generate", "--model", str(tmp_path / "none"), "--prompt", "x", "--threads", "1"]) == 2  # the model is missing
    assert torch.get_num_threads() == 1
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "--threads N" in capsys.readouterr().out
