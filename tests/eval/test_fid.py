"""FID: the Fréchet distance against scipy's sqrtm and closed forms, and its errors."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from ccm_sdk.errors import InputError, NonFiniteError, ShapeError
from ccm_sdk.eval.fid import (
    FeatureStatistics,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    sqrtm_psd,
    trace_sqrt_product,
)


def _random_covariance(rng, dim):
    a = rng.standard_normal((dim, 2 * dim))
    return a @ a.T / (2 * dim)


def _scipy_fid(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("dim", [1, 3, 16, 64])
def test_matches_scipy_sqrtm_on_full_rank_covariances(dim):
    rng = np.random.default_rng(dim)
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    s1, s2 = _random_covariance(rng, dim), _random_covariance(rng, dim)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_scipy_fid(mu1, s1, mu2, s2), rel=1e-8, abs=1e-9)


def test_closed_form_for_diagonal_covariances():
    # FID = ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2
    mu1, mu2 = np.array([1.0, -2.0, 0.5]), np.array([0.0, 1.0, 0.5])
    a, b = np.array([4.0, 1.0, 0.25]), np.array([1.0, 9.0, 0.25])
    expected = 1 + 9 + 0 + (2 - 1) ** 2 + (1 - 3) ** 2 + 0
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, abs=1e-12)


def test_sqrtm_psd_squares_back_and_trace_of_product():
    rng = np.random.default_rng(0)
    s1, s2 = _random_covariance(rng, 8), _random_covariance(rng, 8)
    root = sqrtm_psd(s1)
    np.testing.assert_allclose(root @ root, s1, atol=1e-10)
    assert trace_sqrt_product(s1, s2) == pytest.approx(np.trace(scipy.linalg.sqrtm(s1 @ s2)).real, rel=1e-9)


def test_feature_sets_identity_symmetry_and_shift():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((200, 5))
    assert fid_from_features(x, x) == pytest.approx(0.0, abs=1e-8)
    y = rng.standard_normal((150, 5)) * 2
    assert fid_from_features(x, y) == pytest.approx(fid_from_features(y, x), rel=1e-10)
    shift = np.array([1.0, 2.0, 0.0, -1.0, 0.5])
    assert fid_from_features(x, x + shift) == pytest.approx(shift @ shift, rel=1e-9)
    assert fid_from_features(torch.from_numpy(x), torch.from_numpy(y).float()) == pytest.approx(fid_from_features(x, y), rel=1e-6)


def test_singular_covariances_fewer_samples_than_dimensions_stay_finite():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((4, 50)), rng.standard_normal((4, 50))
    value = fid_from_features(x, y)
    assert np.isfinite(value) and value > 0
    assert fid_from_features(x, x) == pytest.approx(0.0, abs=1e-8)


def test_statistics_use_the_unbiased_covariance_and_round_trip(tmp_path):
    x = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 8.0]])
    stats = feature_statistics(x)
    np.testing.assert_allclose(stats.mean, [2.0, 4.0])
    np.testing.assert_allclose(stats.covariance, np.cov(x, rowvar=False))
    stats.save(tmp_path / "stats.npz")
    loaded = FeatureStatistics.load(tmp_path / "stats.npz")
    np.testing.assert_array_equal(loaded.covariance, stats.covariance)
    assert loaded.count == 3


def test_empty_feature_set_raises():
    with pytest.raises(ShapeError, match="empty"):
        fid_from_features(np.zeros((0, 4)), np.ones((3, 4)))


def test_mismatched_dimensions_raise():
    with pytest.raises(ShapeError, match="different dimensions: 4 and 5"):
        fid_from_features(np.random.rand(3, 4), np.random.rand(3, 5))
    with pytest.raises(ShapeError, match="covariance 2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))


def test_fewer_than_two_samples_raise():
    with pytest.raises(InputError, match="at least 2 feature vectors, got 1"):
        fid_from_features(np.random.rand(1, 4), np.random.rand(3, 4))


def test_nan_features_raise():
    x = np.random.rand(3, 4)
    x[1, 2] = np.nan
    with pytest.raises(NonFiniteError, match="NaN"):
        fid_from_features(x, np.random.rand(3, 4))


def test_features_must_be_a_matrix():
    with pytest.raises(ShapeError, match=r"\[N, D\]"):
        fid_from_features(np.random.rand(3, 4, 2), np.random.rand(3, 4))
