"""The small feature network: training as an attribute classifier, saving, loading, and as an FID extractor."""

from __future__ import annotations

import pytest
import torch

from ccm_sdk.errors import CorruptWeightsError, InputError, MissingModelError
from ccm_sdk.eval.feature_net import FeatureNetConfig, FeatureNetExtractor, SmallFeatureNet, train_feature_net
from ccm_sdk.eval.features import extract_features, load_extractor


class Squares(torch.utils.data.Dataset):
    """A red or a blue square, large or small, on grey: labels [red, blue, large]."""

    def __init__(self, length: int = 96):
        self.length = length

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        g = torch.Generator().manual_seed(index)
        red, large = index % 2 == 0, (index // 2) % 2 == 0
        side = 10 if large else 4
        image = torch.full((3, 16, 16), 0.5)
        top, left = (int(v) for v in torch.randint(0, 16 - side + 1, (2,), generator=g))
        image[:, top : top + side, left : left + side] = torch.tensor([0.9, 0.1, 0.1] if red else [0.1, 0.1, 0.9])[:, None, None]
        return {"image": image, "labels": torch.tensor([float(red), float(not red), float(large)])}


def test_training_learns_the_attributes_and_round_trips(tmp_path):
    result = train_feature_net(Squares(), steps=30, batch_size=16, lr=1e-2, holdout=16, widths=(8, 16),
                               feature_dim=16, output_dir=tmp_path / "net", label_names=("red", "blue", "large"))  # fmt: skip
    assert sum(result.losses[-5:]) / 5 < 0.5 * sum(result.losses[:5]) / 5
    assert result.accuracy is not None and result.accuracy > 0.85
    loaded = SmallFeatureNet.from_pretrained(tmp_path / "net")
    assert loaded.config.label_names == ("red", "blue", "large") and loaded.config.image_size == 16
    images = torch.stack([Squares()[i]["image"] for i in range(4)])
    with torch.no_grad():
        torch.testing.assert_close(loaded.embed(images), result.net.embed(images))
    extractor = load_extractor({"kind": "feature-net", "path": str(tmp_path / "net")})
    assert isinstance(extractor, FeatureNetExtractor)
    assert extract_features(extractor, images).shape == (4, 16)


def test_inputs_of_another_size_are_resized():
    net = SmallFeatureNet(FeatureNetConfig(num_labels=2, image_size=16, widths=(4,), feature_dim=3))
    assert net.embed(torch.rand(2, 3, 40, 24)).shape == (2, 3)


def test_dataset_without_labels_raises():
    class NoLabels(Squares):
        def __getitem__(self, index):
            return {"image": super().__getitem__(index)["image"]}

    with pytest.raises(InputError, match="'labels'"):
        train_feature_net(NoLabels(), steps=1)


def test_bad_folders_raise(tmp_path):
    with pytest.raises(MissingModelError):
        SmallFeatureNet.from_pretrained(tmp_path)
    SmallFeatureNet(FeatureNetConfig(num_labels=2, widths=(4,), feature_dim=3)).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"num_labels": 5, "widths": [4], "feature_dim": 3}')
    with pytest.raises(CorruptWeightsError):
        SmallFeatureNet.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")  # an unreadable weights file is corrupt, not a crash
    (tmp_path / "config.json").write_text('{"num_labels": 2, "widths": [4], "feature_dim": 3}')
    with pytest.raises(CorruptWeightsError, match="cannot load the feature net"):
        SmallFeatureNet.from_pretrained(tmp_path)
