"""The statistics of the lab: streaming moments of vector samples and confidence regions for their mean.

All in float64 on theta's device.  A mean of N independent d-vectors with covariance S is
treated as Gaussian N(m, S / N) (the central limit theorem; N is in the thousands).  The
confidence region for a vector is a ball: ||mean - m||^2 is a weighted sum of chi-squares
with the eigenvalues of C = S / N as weights, approximated by a scaled chi-square with the
same mean tr C and variance 2 tr C^2 (Satterthwaite); the ball's radius is the square root of
its quantile.  A norm then lies in [||mean|| - r, ||mean|| + r] with the same confidence.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import torch


def normal_quantile(confidence: float) -> float:
    """z with P(|N(0, 1)| <= z) = confidence."""
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def ball_radius(cov_of_mean: torch.Tensor, confidence: float) -> float:
    """r with P(||mean - m|| <= r) ~= confidence, for a Gaussian mean with covariance ``cov_of_mean`` (d, d)."""
    from scipy.stats import chi2

    t1 = float(torch.diagonal(cov_of_mean).sum())
    t2 = float((cov_of_mean * cov_of_mean).sum())
    if t1 <= 0 or t2 <= 0:
        return 0.0
    scale, dof = t2 / t1, t1 * t1 / t2
    return math.sqrt(scale * float(chi2.ppf(confidence, dof)))


class Moments:
    """Streaming mean and covariance of d-vectors, added in batches ``(m, d)``.

    Sums are taken around a shift (the first batch's mean) so that the covariance does not
    lose digits to a large mean.  Cost O(m d^2) per batch (one matmul).
    """

    def __init__(self):
        self.count = 0
        self._shift = None
        self._sum = None
        self._outer = None

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().to(torch.float64).reshape(rows.shape[0], -1)
        if self._shift is None:
            self._shift = rows.mean(0)
            self._sum = torch.zeros_like(self._shift)
            self._outer = torch.zeros(rows.shape[1], rows.shape[1], dtype=rows.dtype, device=rows.device)
        centered = rows - self._shift
        self._sum += centered.sum(0)
        self._outer += centered.T @ centered
        self.count += rows.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self._shift + self._sum / self.count

    @property
    def cov(self) -> torch.Tensor:
        """The unbiased sample covariance (d, d) of one row (zero with a single row)."""
        if self.count < 2:
            return torch.zeros_like(self._outer)
        centered_mean = self._sum / self.count
        return (self._outer - self.count * torch.outer(centered_mean, centered_mean)) / (self.count - 1)


def cosine_with_interval(a, cov_a, r, cov_r, confidence):
    """cos(a, r) and its delta-method interval (clipped to [-1, 1]); ``cov_*``: covariances of the means a, r."""
    na, nr = float(a.norm()), float(r.norm())
    if na == 0 or nr == 0:
        return None, None
    cos = float(a @ r) / (na * nr)
    grad_a = (r / nr - cos * a / na) / na
    grad_r = (a / na - cos * r / nr) / nr
    var = float(grad_a @ cov_a @ grad_a + grad_r @ cov_r @ grad_r)
    half = normal_quantile(confidence) * math.sqrt(max(var, 0.0))
    return cos, [max(-1.0, cos - half), min(1.0, cos + half)]
