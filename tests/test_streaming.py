"""StreamEngine on the tiny model: the similarity filter, the latest-frame queue, batching, seeds, the prompt encoded once."""

from __future__ import annotations

import threading

import pytest
import torch

from ccm_sdk.errors import InputError, InputTypeError, ValueRangeError
from ccm_sdk.pipeline import CCMPipeline
from ccm_sdk.streaming import LatestFrameQueue, StreamEngine, StreamOutput


@pytest.fixture(scope="module")
def pipe(lcm_dir, controlnet_dir):
    p = CCMPipeline.from_pretrained(lcm_dir, controlnet=controlnet_dir)
    p.set_progress_bar_config(disable=True)
    return p


def _frame(seed: int) -> torch.Tensor:
    return torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def _nudged(frame: torch.Tensor, amount: float) -> torch.Tensor:
    """``frame`` with a mean absolute change of ``amount``: half of the pixels moved by 2 * amount."""
    delta = torch.zeros_like(frame)
    delta[..., ::2] = 2 * amount
    return (frame + torch.where(frame < 0.5, delta, -delta)).clamp(0, 1)


def test_filter_skips_frames_that_barely_changed(pipe):
    a, b = _frame(1), _frame(2)
    frames = [a, a, _nudged(a, 0.002), b, b, _nudged(b, 0.01), a]
    outs = list(pipe.stream(frames, "a red circle", num_inference_steps=2, output_type="pt"))
    assert [o.skipped for o in outs] == [False, True, True, False, True, False, False]
    assert [o.frame for o in outs] == list(range(7)) and all(isinstance(o, StreamOutput) for o in outs)
    assert [o.nfe for o in outs] == [2, 0, 0, 2, 0, 2, 2]
    assert outs[2].difference == pytest.approx(0.002, rel=0.05) and outs[5].difference == pytest.approx(0.01, rel=0.05)
    assert torch.equal(outs[1].images, outs[0].images) and torch.equal(outs[4].images, outs[3].images)
    assert torch.equal(outs[6].images, outs[0].images)  # the same frame and seed: the same image as at the start


def test_threshold_is_configurable_and_none_turns_the_filter_off(pipe):
    a = _frame(1)
    frames = [a, _nudged(a, 0.002), _nudged(a, 0.003), a]
    strict = StreamEngine(pipe, "x", num_inference_steps=1, similarity_threshold=0.001, output_type="pt")
    loose = StreamEngine(pipe, "x", num_inference_steps=1, similarity_threshold=0.01, output_type="pt")
    off = StreamEngine(pipe, "x", num_inference_steps=1, similarity_threshold=None, output_type="pt")
    for engine, generated in ((strict, 3), (loose, 1), (off, 4)):
        list(engine.run(frames))
        assert (engine.stats.frames, engine.stats.generated, engine.stats.skipped) == (4, generated, 4 - generated)
    # the filter compares with the last generated frame, so slow drift still generates once it adds up
    drift = [_nudged(a, 0.0015 * i) for i in range(6)]
    engine = StreamEngine(pipe, "x", num_inference_steps=1, output_type="pt")
    assert [o.skipped for o in engine.run(drift)] == [False, True, True, False, True, True]


def test_a_skipped_frame_gets_what_generating_it_would_give(pipe):
    a = _frame(3)
    filtered = list(pipe.stream([a, a], "a blue square", seed=4, output_type="pt"))
    unfiltered = list(pipe.stream([a, a], "a blue square", seed=4, output_type="pt", similarity_threshold=None))
    assert filtered[1].skipped and not unfiltered[1].skipped
    assert torch.equal(filtered[1].images, unfiltered[1].images)


def test_batching_gives_the_per_frame_results(pipe):
    frames = [_frame(i) for i in range(5)]
    kwargs = dict(num_inference_steps=2, output_type="pt", seed=7, seed_policy="increment", similarity_threshold=None)
    single = StreamEngine(pipe, "a green star", **kwargs)
    batched = StreamEngine(pipe, "a green star", batch_size=2, **kwargs)
    one = list(single.run(frames))
    two = list(batched.run(frames))
    assert (single.stats.batches, batched.stats.batches) == (5, 3)  # 2 + 2 + the last 1
    assert [o.seed for o in two] == [7, 8, 9, 10, 11] and [o.frame for o in two] == list(range(5))
    for a, b in zip(one, two):
        assert b.images.shape == (1, 3, 64, 64)
        torch.testing.assert_close(a.images, b.images, atol=1e-5, rtol=0)
    assert not torch.allclose(one[0].images, one[1].images, atol=1e-3)


def test_batching_keeps_skipped_frames_in_order(pipe):
    a, b = _frame(1), _frame(2)
    engine = StreamEngine(pipe, "x", num_inference_steps=1, batch_size=2, output_type="pt")
    outs = list(engine.run([a, a, b, b, a]))
    assert [o.skipped for o in outs] == [False, True, False, True, False]
    assert torch.equal(outs[1].images, outs[0].images) and torch.equal(outs[3].images, outs[2].images)
    assert engine.stats.batches == 2 and engine.stats.generated == 3


def test_seed_policies(pipe):
    a = _frame(5)
    fixed = list(pipe.stream([a, _nudged(a, 0.05)], "x", seed=3, output_type="pt"))
    moving = list(pipe.stream([a, a], "x", seed=3, seed_policy="increment", output_type="pt"))
    assert [o.seed for o in fixed] == [3, 3] and [o.seed for o in moving] == [3, 4]
    assert not moving[1].skipped  # another seed is another image: never skipped
    assert not torch.allclose(moving[0].images, moving[1].images, atol=1e-3)


def test_the_prompt_is_encoded_once(pipe):
    calls = []
    handle = pipe.text_encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        engine = StreamEngine(pipe, "a yellow moon", num_inference_steps=1, batch_size=2, similarity_threshold=None, output_type="pt")
        list(engine.run([_frame(i) for i in range(5)]))
        assert len(calls) == 1 and engine.prompt_encodings == 1
        engine.set_prompt("a red moon")  # a new prompt: encoded once more, and the next frame generated
        out = engine.process(_frame(4))
        assert len(calls) == 2 and not out.skipped
    finally:
        handle.remove()


def test_img2img_frames_are_also_the_init_image(pipe):
    a, b = _frame(1), _frame(2)
    engine = StreamEngine(pipe, "x", num_inference_steps=2, img2img=True, strength=0.5, output_type="pt")
    outs = [engine.process(f) for f in (a, a, b)]
    assert [o.skipped for o in outs] == [False, True, False]
    direct = pipe("x", a, image=a, strength=0.5, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt")
    torch.testing.assert_close(outs[0].images, direct.images, atol=1e-5, rtol=0)


def test_latest_frame_queue_keeps_only_the_newest():
    frames = LatestFrameQueue()
    assert frames.put(1) is False and frames.put(2) is True and frames.put(3) is True
    assert frames.get() == 3 and frames.dropped == 2 and frames.received == 3
    assert frames.get(timeout=0.01) is None  # empty
    frames.put(4)
    frames.close()
    assert frames.get() == 4 and frames.get() is None  # what was left, then the end
    with pytest.raises(InputError, match="closed"):
        frames.put(5)


def test_realtime_stream_drops_stale_frames(pipe):
    first, stale, newest = _frame(1), _frame(2), _frame(3)
    started, all_sent = threading.Event(), threading.Event()

    def camera():
        yield first
        assert started.wait(10)
        yield stale
        yield stale
        yield newest
        all_sent.set()

    def on_step(info):
        started.set()
        all_sent.wait(10)  # the first frame is still generating while the camera sends three more

    outs = list(pipe.stream(camera(), "x", realtime=True, num_inference_steps=1, output_type="pt", callback=on_step))
    assert len(outs) == 2 and not outs[1].skipped
    expected = next(pipe.stream([newest], "x", num_inference_steps=1, output_type="pt"))
    assert torch.equal(outs[1].images, expected.images)  # the newest frame, the two stale ones dropped


def test_realtime_stream_counts_drops_and_raises_the_source_error(pipe):
    def broken():
        yield _frame(1)
        raise OSError("camera unplugged")

    engine = StreamEngine(pipe, "x", num_inference_steps=1, output_type="pt")
    with pytest.raises(OSError, match="camera unplugged"):
        list(engine.follow(broken()))


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"similarity_threshold": 1.5}, ValueRangeError, r"similarity_threshold: expected .* \[0, 1\]"),
    ({"batch_size": 0}, ValueRangeError, r"batch_size: expected frames per network call in 1\.\.64, got 0"),
    ({"seed_policy": "random"}, InputError, r"seed_policy: expected one of 'fixed', 'increment', got 'random'"),
    ({"seed": -1}, ValueRangeError, r"seed: expected an int >= 0"),
    ({"generator": torch.Generator()}, InputError, r"generator: a stream sets it per frame"),
    ({"img2img": True, "image": torch.rand(1, 3, 64, 64)}, InputError, r"img2img=True takes each frame"),
])  # fmt: skip
def test_bad_options_fail_at_once(pipe, kwargs, error, match):
    with pytest.raises(error, match=match):
        StreamEngine(pipe, "x", **kwargs)


def test_bad_prompt_and_realtime_batching(pipe):
    with pytest.raises(InputTypeError, match="prompt: expected a non-empty str"):
        StreamEngine(pipe, "")
    with pytest.raises(InputError, match="realtime=True .* batch_size=1, got 2"):
        pipe.stream([_frame(1)], "x", realtime=True, batch_size=2)


def test_sdxl_batches_repeat_the_pooled_embeddings_too(sdxl_lcm_dir, sdxl_controlnet_dir):
    sdxl = CCMPipeline.from_pretrained(sdxl_lcm_dir, controlnet=sdxl_controlnet_dir)
    sdxl.set_progress_bar_config(disable=True)
    frames = [_frame(i) for i in range(3)]
    kwargs = dict(num_inference_steps=1, output_type="pt", seed_policy="increment", similarity_threshold=None)
    single = list(StreamEngine(sdxl, "a green star", **kwargs).run(frames))
    batched = list(StreamEngine(sdxl, "a green star", batch_size=3, **kwargs).run(frames))
    for a, b in zip(single, batched):
        torch.testing.assert_close(a.images, b.images, atol=1e-5, rtol=0)
