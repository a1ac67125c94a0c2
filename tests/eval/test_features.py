"""Feature extractors: the protocol, batching and checks, pixels, the registry of extractors, and the FID
Inception-v3 architecture."""

from __future__ import annotations

import pytest
import torch

from ccm_sdk.errors import ImageSizeError, IncompatibleModelsError, InputError, MissingModelError, NonFiniteError, ShapeError
from ccm_sdk.eval.features import (
    FeatureConfig,
    FeatureExtractor,
    ModuleExtractor,
    PixelExtractor,
    extract_features,
    load_extractor,
)
from ccm_sdk.eval.inception import FIDInceptionV3, InceptionExtractor, convert_pytorch_fid_weights, load_inception


def test_pixel_features_are_the_averaged_image():
    images = torch.rand(3, 3, 16, 16)
    features = PixelExtractor(4)(images)
    assert features.shape == (3, 48)
    torch.testing.assert_close(features[:, 0], images[:, 0, :4, :4].mean(dim=(1, 2)))
    assert isinstance(PixelExtractor(), FeatureExtractor)


def test_batched_extraction_equals_one_batch():
    images = torch.rand(7, 3, 8, 8)
    extractor = PixelExtractor(2)
    out = extract_features(extractor, images, batch_size=3)
    assert out.dtype == torch.float64 and out.shape == (7, 12)
    torch.testing.assert_close(out, extract_features(extractor, images, batch_size=100))


def test_module_extractor_flattens_any_module():
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.AdaptiveAvgPool2d(1))
    assert ModuleExtractor(module)(torch.rand(2, 3, 8, 8)).shape == (2, 5)


def test_extractor_with_a_wrong_output_shape_is_caught():
    class Broken:
        name = "broken"

        def __call__(self, images):
            return images.mean(dim=1)  # [B, H, W]

    with pytest.raises(ShapeError, match="broken"):
        extract_features(Broken(), torch.rand(2, 3, 8, 8))


def test_extractor_producing_nan_is_caught():
    class Nan:
        name = "nan"

        def __call__(self, images):
            return torch.full((images.shape[0], 2), float("nan"))

    with pytest.raises(NonFiniteError, match="nan"):
        extract_features(Nan(), torch.rand(2, 3, 8, 8))


def test_images_are_checked_before_extraction():
    with pytest.raises(ImageSizeError):
        extract_features(PixelExtractor(), torch.rand(0, 3, 8, 8))


def test_load_extractor_by_kind():
    assert load_extractor({"kind": "pixels", "size": 2}).name == "pixels-2"
    with pytest.raises(InputError, match="need a 'path'"):
        load_extractor(FeatureConfig(kind="inception"))


def test_builtin_extractors_register_through_the_hook():
    from ccm_sdk.registry import feature_extractors

    assert feature_extractors.names() == ["feature-net", "inception", "pixels"]
    assert {e.plugin for e in feature_extractors.entries()} == {"ccm_sdk.builtin.feature_extractors"}


def test_an_unknown_kind_lists_the_registered_extractors():
    with pytest.raises(InputError, match=r"features: kind: Value error, unknown feature extractor 'inceptoin'; "
                                         r"available: feature-net, inception, pixels"):  # fmt: skip
        load_extractor({"kind": "inceptoin"})
    with pytest.raises(InputError, match="unknown key|Extra inputs"):
        load_extractor({"kind": "pixels", "sise": 4})


def test_a_plugin_extractor_is_chosen_by_its_kind():
    import types

    import ccm_sdk
    from ccm_sdk import plugins

    seen = []

    def channel_means(config, *, device="cpu"):
        seen.append((config.path, str(device)))
        return ModuleExtractor(torch.nn.AdaptiveAvgPool2d(1), name="channel-means")

    plugin = types.ModuleType("means")
    plugin.register_feature_extractors = ccm_sdk.hookimpl(lambda register: register(channel_means, name="test-means"))
    plugins.load_plugins()
    plugins.pm.register(plugin, name="means-plugin")
    try:
        extractor = load_extractor({"kind": "test-means", "path": "anywhere"})
        assert seen == [("anywhere", "cpu")]
        images = torch.rand(5, 3, 8, 8)
        torch.testing.assert_close(extract_features(extractor, images), images.mean(dim=(2, 3)).double())
    finally:
        plugins.pm.unregister(name="means-plugin")
    with pytest.raises(InputError, match="unknown feature extractor 'test-means'"):
        load_extractor({"kind": "test-means"})


# --- FID Inception-v3 --------------------------------------------------------------------


@pytest.fixture(scope="module")
def inception():
    torch.manual_seed(0)
    return FIDInceptionV3(resize_input=False).eval()


def test_inception_has_torchvision_names_and_the_fid_parameter_count(inception):
    keys = set(inception.state_dict())
    assert {"Conv2d_1a_3x3.conv.weight", "Conv2d_1a_3x3.bn.running_var", "Mixed_5b.branch_pool.conv.weight",
            "Mixed_6e.branch7x7dbl_5.bn.bias", "Mixed_7c.branch3x3dbl_3b.conv.weight"} <= keys  # fmt: skip
    assert not any(k.startswith(("fc.", "AuxLogits.")) for k in keys)
    # torchvision's inception_v3 has 27,161,264 parameters; without its 1000-way fc (2,049,000)
    # and aux classifier (3,326,696) that leaves the 21,785,568 of pytorch-fid's pool3 network.
    assert sum(p.numel() for p in inception.parameters()) == 27_161_264 - 2_049_000 - 3_326_696


def test_inception_gives_2048_features(inception):
    with torch.no_grad():
        assert inception(torch.rand(1, 3, 75, 75)).shape == (1, 2048)


def test_pytorch_fid_checkpoint_converts_and_loads(inception, tmp_path):
    state = dict(inception.state_dict())
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}  # the 2015 port has none
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
    torch.save(state, tmp_path / "pt_inception.pth")
    folder = convert_pytorch_fid_weights(tmp_path / "pt_inception.pth", tmp_path / "inception")
    loaded = load_inception(folder)
    torch.testing.assert_close(loaded.Mixed_7c.branch_pool.conv.weight, inception.Mixed_7c.branch_pool.conv.weight)
    assert isinstance(load_extractor({"kind": "inception", "path": str(folder)}), InceptionExtractor)


def test_wrong_checkpoint_and_missing_folder_raise(tmp_path):
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(IncompatibleModelsError, match="not an FID Inception-v3"):
        convert_pytorch_fid_weights(tmp_path / "other.pth", tmp_path / "out")
    with pytest.raises(MissingModelError, match="convert_pytorch_fid_weights"):
        load_inception(tmp_path / "nowhere")
