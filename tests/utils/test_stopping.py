"""Stop signals, time limits and durations (ccm_sdk.utils.stopping), apart from any loop that uses them."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from ccm_sdk.errors import InputError
from ccm_sdk.utils import stopping
from ccm_sdk.utils.stopping import TIME_LIMIT, StopSignals, parse_duration, time_limit, time_limit_reached


def test_a_signal_is_recorded_and_the_handlers_are_put_back():
    before = {number: signal.getsignal(number) for number in stopping.SIGNALS}
    with StopSignals() as stop:
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.name == "SIGTERM" and stop.requested()
    assert {number: signal.getsignal(number) for number in stopping.SIGNALS} == before


def test_a_second_signal_goes_to_the_previous_handler():
    calls: list[int] = []

    def handler(number, frame):
        calls.append(number)

    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        with StopSignals() as stop:
            os.kill(os.getpid(), signal.SIGUSR1)
            assert stop.name == "SIGUSR1" and stop.requested() and calls == []
            os.kill(os.getpid(), signal.SIGUSR1)  # asked again while stopping
            assert calls == [signal.SIGUSR1]
        assert signal.getsignal(signal.SIGUSR1) is handler
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_outside_the_main_thread_no_handler_is_installed():
    before = signal.getsignal(signal.SIGTERM)
    seen = []

    def enter():
        with StopSignals():
            seen.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=enter)
    thread.start()
    thread.join()
    assert seen == [before]


def test_a_time_limit_runs_out_and_ends_with_its_block(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(stopping, "monotonic", lambda: now[0])
    assert not time_limit_reached()
    with time_limit(60):
        assert not time_limit_reached()
        with StopSignals() as stop:
            assert not stop.requested()
            now[0] = 161.0
            assert time_limit_reached() and stop.requested() and stop.name == TIME_LIMIT
    assert not time_limit_reached()


def test_time_limits_nest_and_none_means_no_limit(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(stopping, "monotonic", lambda: now[0])
    with time_limit(10):
        with time_limit(None):
            now[0] = 20.0
            assert not time_limit_reached()
        assert time_limit_reached()  # the outer limit is back


@pytest.mark.parametrize("seconds", [0, -1.0, float("nan")])
def test_a_time_limit_must_be_positive(seconds):
    with pytest.raises(InputError, match="positive number of seconds"):
        with time_limit(seconds):
            pass


@pytest.mark.parametrize("text, seconds", [("90", 90.0), ("45s", 45.0), ("20m", 1200.0), ("2h", 7200.0), ("1h30m", 5400.0), (" 1.5H ", 5400.0)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "1d", "h", "-5m", "0", "0m0s"])
def test_bad_durations_say_what_was_expected(text):
    with pytest.raises(InputError, match="duration"):
        parse_duration(text)
