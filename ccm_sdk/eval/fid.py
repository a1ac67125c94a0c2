"""Fréchet distance between two sets of feature vectors (FID when the features are Inception's).

    FID = ||mu_1 - mu_2||^2 + tr(S_1) + tr(S_2) - 2 tr( (S_1 S_2)^(1/2) )

The trace of the square root is computed as the sum of the square roots of the eigenvalues of the
symmetric positive semi-definite matrix sqrt(S_1) S_2 sqrt(S_1), which has the same eigenvalues
as S_1 S_2. Unlike ``scipy.linalg.sqrtm(S_1 @ S_2)`` this stays real and well defined when the
covariances are singular (fewer samples than dimensions), with no offset added to the diagonal.
Everything runs in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError, NonFiniteError, ShapeError


@dataclass(frozen=True)
class FeatureStatistics:
    """Mean [D] and covariance [D, D] of a feature set, with its size."""

    mean: np.ndarray
    covariance: np.ndarray
    count: int

    def save(self, path) -> None:
        np.savez(path, mean=self.mean, covariance=self.covariance, count=self.count)

    @classmethod
    def load(cls, path) -> FeatureStatistics:
        data = np.load(path)
        return cls(data["mean"], data["covariance"], int(data["count"]))


def _as_features(features, name: str) -> np.ndarray:
    array = features.detach().cpu().double().numpy() if isinstance(features, torch.Tensor) else np.asarray(features, np.float64)
    if array.ndim != 2:
        raise ShapeError(f"expected {name} as a [N, D] matrix of feature vectors, got shape {tuple(array.shape)}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ShapeError(f"{name} is empty: shape {tuple(array.shape)}")
    if not np.isfinite(array).all():
        raise NonFiniteError(f"{name} contains NaN or infinite values")
    return array


def feature_statistics(features, *, name: str = "features") -> FeatureStatistics:
    """Mean and unbiased covariance (divided by N - 1) of [N, D] features; N must be at least 2."""
    array = _as_features(features, name)
    if array.shape[0] < 2:
        raise InputError(f"{name}: a covariance needs at least 2 feature vectors, got {array.shape[0]}")
    return FeatureStatistics(array.mean(axis=0), np.cov(array, rowvar=False).reshape(array.shape[1], array.shape[1]), array.shape[0])


def _check_covariance(covariance: np.ndarray, dim: int, name: str) -> np.ndarray:
    covariance = np.asarray(covariance, np.float64)
    if covariance.shape != (dim, dim):
        raise ShapeError(f"expected {name} of shape {(dim, dim)}, got {tuple(covariance.shape)}")
    if not np.isfinite(covariance).all():
        raise NonFiniteError(f"{name} contains NaN or infinite values")
    return (covariance + covariance.T) / 2


def sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative round-off eigenvalues -> 0)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def trace_sqrt_product(sigma_1: np.ndarray, sigma_2: np.ndarray) -> float:
    """tr( (S_1 S_2)^(1/2) ) for symmetric PSD S_1, S_2, via the eigenvalues of sqrt(S_1) S_2 sqrt(S_1)."""
    root = sqrtm_psd(sigma_1)
    values = np.linalg.eigvalsh(root @ sigma_2 @ root)
    return float(np.sqrt(np.clip(values, 0.0, None)).sum())


def frechet_distance(mu_1, sigma_1, mu_2, sigma_2) -> float:
    """Fréchet distance between the Gaussians N(mu_1, S_1) and N(mu_2, S_2); at least 0."""
    mu_1, mu_2 = np.asarray(mu_1, np.float64).reshape(-1), np.asarray(mu_2, np.float64).reshape(-1)
    if mu_1.shape != mu_2.shape:
        raise ShapeError(f"the two feature sets have different dimensions: {mu_1.shape[0]} and {mu_2.shape[0]}")
    if not (np.isfinite(mu_1).all() and np.isfinite(mu_2).all()):
        raise NonFiniteError("a mean contains NaN or infinite values")
    dim = mu_1.shape[0]
    sigma_1 = _check_covariance(sigma_1, dim, "covariance 1")
    sigma_2 = _check_covariance(sigma_2, dim, "covariance 2")
    diff = mu_1 - mu_2
    distance = diff @ diff + np.trace(sigma_1) + np.trace(sigma_2) - 2.0 * trace_sqrt_product(sigma_1, sigma_2)
    return max(float(distance), 0.0)


def frechet_distance_from_stats(a: FeatureStatistics, b: FeatureStatistics) -> float:
    return frechet_distance(a.mean, a.covariance, b.mean, b.covariance)


def fid_from_features(features_1, features_2) -> float:
    """FID between two [N, D] feature sets (each N >= 2, same D)."""
    a, b = _as_features(features_1, "features 1"), _as_features(features_2, "features 2")
    if a.shape[1] != b.shape[1]:
        raise ShapeError(f"the two feature sets have different dimensions: {a.shape[1]} and {b.shape[1]}")
    return frechet_distance_from_stats(feature_statistics(a, name="features 1"), feature_statistics(b, name="features 2"))
