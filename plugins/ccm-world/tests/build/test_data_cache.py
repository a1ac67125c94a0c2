"""The data cache: items identical to the rendered ones, posteriors of the VAE, resuming by chunk,
the build wiring (ControlNet and adapter units read it), and clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import AutoencoderKL

from ccm_sdk.errors import InputError, TrainingError
from ccm_world import WorldDataset
from ccm_world.build.config import load_preset
from ccm_world.build.data_cache import CachedWorldDataset, _to_uint8, build_data_cache, scene_bytes
from ccm_world.build.stages import plan_units
from ccm_world.dataset import WORLD_CONDITIONS


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8).eval()  # fmt: skip


@pytest.fixture(scope="module")
def world():
    return WorldDataset(size=32, length=10, seed=3, conditions=WORLD_CONDITIONS, sr_factor=4)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, world, vae):
    return build_data_cache(world, vae, tmp_path_factory.mktemp("cache") / "cache", chunk=4, batch_size=3, log=lambda m: None)


def test_cached_items_are_the_rendered_ones(cache, world, vae):
    cached = CachedWorldDataset(cache, WORLD_CONDITIONS)
    assert len(cached) == 10 and sorted(p.name for p in cache.glob("chunk-*")) == ["chunk-00000", "chunk-00001", "chunk-00002"]
    for index in (0, 3, 4, 9):  # both sides of a chunk boundary and the short last chunk
        item, rendered = cached[index], world[index]
        assert item["index"] == index and item["caption"] == rendered["caption"] and torch.equal(item["labels"], rendered["labels"])
        assert item["image"].dtype == torch.float32 and torch.equal(item["image"], rendered["image"])
        assert item["controls"].keys() == rendered["controls"].keys()
        assert all(torch.equal(item["controls"][c], rendered["controls"][c]) for c in WORLD_CONDITIONS)
        with torch.no_grad():
            expected = vae.encode(rendered["image"][None] * 2 - 1).latent_dist.parameters[0]
        assert item["latent_parameters"].shape == (8, 16, 16) and torch.allclose(item["latent_parameters"], expected, atol=1e-5)
    only = CachedWorldDataset(cache, ("sketch",))[5]
    assert list(only["controls"]) == ["sketch"]


def test_an_interrupted_build_resumes_at_the_missing_chunk(cache, world, vae, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    shutil.rmtree(copy / "chunk-00001")
    (copy / ".tmp-chunk-00001").mkdir()  # the missing chunk, cut off while being written
    (copy / ".tmp-chunk-00001" / "image.npy").write_bytes(b"cut off")
    lines: list[str] = []
    build_data_cache(world, vae, copy, chunk=4, batch_size=3, log=lines.append)
    assert lines == ["    data cache: 2 of 3 chunks already built", "    data cache: chunk 2 of 3 written (4 scenes)"]
    assert not (copy / ".tmp-chunk-00001").exists()
    for name in ("image.npy", "labels.npy", "sketch.npy", "latents.npy", "captions.json"):
        assert (copy / "chunk-00001" / name).read_bytes() == (cache / "chunk-00001" / name).read_bytes()


def test_rendering_in_worker_processes_writes_the_same_bytes(cache, world, vae, tmp_path):
    built = build_data_cache(world, vae, tmp_path / "cache", chunk=4, batch_size=3, workers=2, log=lambda m: None)
    files = sorted(p.relative_to(cache) for p in cache.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(built) for p in built.rglob("*") if p.is_file())
    assert all((built / f).read_bytes() == (cache / f).read_bytes() for f in files)
    with pytest.raises(InputError, match="workers >= 0"):
        build_data_cache(world, vae, tmp_path / "bad", workers=-1, log=lambda m: None)


def test_errors(cache, world, vae, tmp_path):
    with pytest.raises(InputError, match="describes another cache.*remove"):
        build_data_cache(world, vae, cache, chunk=5, log=lambda m: None)
    with pytest.raises(TrainingError, match="no data cache in .*build it with the data-cache stage"):
        CachedWorldDataset(tmp_path)
    with pytest.raises(InputError, match=r"holds \[.*\], not \['pose2'\]"):
        CachedWorldDataset(cache, ("pose2",))
    with pytest.raises(IndexError, match="index 10 is outside this data cache of length 10"):
        CachedWorldDataset(cache)[10]
    broken = tmp_path / "broken"
    shutil.copytree(cache, broken)
    shutil.rmtree(broken / "chunk-00002")
    with pytest.raises(TrainingError, match="incomplete: chunk 2 of 3 is missing"):
        CachedWorldDataset(broken)
    (broken / "cache.json").write_text("{")
    with pytest.raises(TrainingError, match="is not valid JSON"):
        CachedWorldDataset(broken)
    truncated = tmp_path / "truncated"
    shutil.copytree(cache, truncated)
    (truncated / "chunk-00000" / "image.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(TrainingError, match="chunk-00000.* cannot be read"):
        CachedWorldDataset(truncated)[0]
    with pytest.raises(InputError, match="not on the 1/255 grid"):
        _to_uint8(torch.full((3, 2, 2), 0.5), "a test map")
    with pytest.raises(InputError, match="expected chunk >= 1"):
        build_data_cache(world, vae, tmp_path / "zero", chunk=0)


def test_the_disk_space_is_checked_first(cache, world, vae, tmp_path, monkeypatch):
    per_scene = scene_bytes(world, vae)
    written = sum(p.stat().st_size for p in cache.glob("chunk-*/*.npy"))
    assert per_scene * 10 <= written < 1.05 * per_scene * 10  # the estimate is what was written, less the npy headers
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12, 1000))
    with pytest.raises(InputError, match=r"needs 0\.0 GB more in .*only 0\.0 GB are free"):
        build_data_cache(world, vae, tmp_path / "full", chunk=4, log=lambda m: None)
    assert not list((tmp_path / "full").glob("chunk-*"))


def test_every_stage_after_the_vae_reads_the_cache():
    preset = load_preset("tiny")
    units = plan_units(preset)
    readers = {u.name for u in units if "data-cache" in u.needs}
    assert readers == {u.name for u in units if u.trainer in ("t2i", "lcd", "dm_controlnet", "ct_controlnet", "adapter")
                       or u.kind in ("feature-net", "map-net")}  # fmt: skip
    order = [u.name for u in units]
    assert order.index("vae") < order.index("data-cache") < order.index("teacher")
    assert "data-cache" not in next(u for u in plan_units(preset) if u.name == "pack").needs
    without = load_preset({**json.loads(preset.model_dump_json()), "data_cache": None})
    assert not any("data-cache" in u.needs or u.name == "data-cache" for u in plan_units(without))


def test_a_grounding_cache_serves_regions_and_word_regions(cache, vae, tmp_path):
    """With a teacher that trains with the grounding loss, the cache stores the regions: the items are the
    rendered ones, the teacher alone asks for them, and the data-cache fingerprint changes only then."""
    from ccm_world.build.run import WorldBuild
    from ccm_world.build.stages import teacher_grounding, training_data

    world = WorldDataset(size=32, length=6, seed=3, conditions=("sketch",), grounding=True)
    built = build_data_cache(world, vae, tmp_path / "cache", chunk=4, batch_size=3, log=lambda m: None)
    cached = CachedWorldDataset(built, ("sketch",), grounding=True)
    assert scene_bytes(world, vae) == scene_bytes(WorldDataset(size=32, length=6, seed=3, conditions=("sketch",)), vae) + 32 * 32
    for index in (0, 5):
        item, rendered = cached[index], world[index]
        assert torch.equal(item["regions"], rendered["regions"]) and torch.equal(item["word_regions"], rendered["word_regions"])
    assert "regions" not in CachedWorldDataset(built, ("sketch",))[0]
    with pytest.raises(InputError, match="was built without grounding"):
        CachedWorldDataset(cache, (), grounding=True)
    preset = load_preset("tiny")
    grounded = load_preset({**json.loads(preset.model_dump_json()),
                            "teacher": {**preset.teacher.model_dump(), "config": {**preset.teacher.config, "grounding_weight": 0.1}}})  # fmt: skip
    assert not teacher_grounding(preset) and teacher_grounding(grounded)
    units = {u.name: u for u in plan_units(grounded)}
    assert "grounding" not in WorldBuild(preset, tmp_path / "a").spec(units["data-cache"])
    assert WorldBuild(grounded, tmp_path / "b").spec(units["data-cache"])["grounding"] is True
    work = tmp_path / "work"
    shutil.copytree(built, work / "data-cache" / "cache")
    assert training_data(grounded, units["teacher"], work).grounding is True
    assert training_data(grounded, units["lcm"], work).grounding is False
    assert training_data(preset, units["teacher"], work).grounding is False
