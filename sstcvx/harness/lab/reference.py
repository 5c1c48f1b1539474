"""The lab's reference gradient of E[L(X)]: unbiased Monte Carlo with control variates, and exact cases.

:func:`reference_gradient` estimates g = grad_theta E[L(X)] = E[L(X) s(U)], with
s(U) = grad_theta log p(U - theta) the noise's score, from many hard samples drawn in large
batches through ``sstcvx.argmax`` (the specialized oracle when one is registered).  The
score has mean zero, so every linear combination of its coordinates is a control variate:
each sample contributes h = L(X) s - B s, with the d x d matrix B the least-squares
regression of L(X) s on s fitted on a separate pilot batch (so B is independent of the
samples it corrects and h stays unbiased).  B absorbs the per-coordinate baseline
b_i s_i (the optimal constant baseline) and the cross terms.  The interval is the
mean +- z * standard error per coordinate, and a ball of radius ``radius`` around the mean
(see :mod:`.stats`).

:func:`exact_gradient` returns the exact gradient, by enumeration and autograd in float64,
where the law of X is known in closed form:

* a simplex (the vertices are the d one-hot vectors) with Gumbel noise of scale s: the
  Gumbel-max law, P(X = e_i) = softmax(theta / s)_i, so E[L(X)] = sum_i softmax(theta / s)_i L(e_i);
* a hypercube (the vertices are all 2^d 0/1 vectors) with Gumbel, Gaussian or logistic noise:
  X_i = 1 exactly when theta_i + eps_i > 0, independently, with probability
  p_i = 1 - exp(-exp(theta_i / s)) (Gumbel), Phi(theta_i / s), sigmoid(theta_i / s), and
  E[L(X)] = sum_v prod_i p_i^v_i (1 - p_i)^(1 - v_i) L(v).

Both recognize the polytope by its vertex list (``P.vertices``), so they apply to the
families and to ``Polytope.from_vertices`` alike.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ...noise import Gaussian, Gumbel, Logistic, get_noise
from ...sampling import argmax
from .estimators import check_noise_for_score, evaluate_loss, score
from .stats import Moments, ball_radius, normal_quantile


@dataclass
class Reference:
    """An estimate of grad_theta E[L(X)].

    Attributes:
        mean: the estimate, shape ``P.event_shape``.
        cov: the covariance (d, d) of the estimate (the per-sample covariance / samples; zero if exact).
        low, high: the per-coordinate confidence interval, shape ``P.event_shape``.
        radius: the radius of the confidence ball around ``mean`` (0 if exact).
        samples: the samples behind the estimate (pilot excluded; 0 if exact).
        kind: ``"score_function"`` (Monte Carlo with control variates) or ``"exact"``.
        confidence: the confidence level of ``low``/``high``/``radius``.
        seconds: the wall time it took.
        variance_reduction: per-sample total variance without the control variates over with them.
    """

    mean: torch.Tensor
    cov: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    radius: float
    samples: int
    kind: str
    confidence: float
    seconds: float
    variance_reduction: float | None = None

    def contains(self, g: torch.Tensor) -> bool:
        """Whether ``g`` lies in the confidence ball."""
        return float((g.to(self.mean) - self.mean).norm()) <= self.radius

    def summary(self) -> dict:
        return {
            "kind": self.kind,
            "samples": self.samples,
            "confidence": self.confidence,
            "gradient": self.mean.flatten().tolist(),
            "norm": float(self.mean.norm()),
            "radius": self.radius,
            "standard_error": torch.sqrt(torch.diagonal(self.cov).clamp_min(0)).tolist(),
            "seconds": self.seconds,
            "variance_reduction": self.variance_reduction,
        }


def _check_theta(P, theta):
    if not isinstance(theta, torch.Tensor) or not theta.is_floating_point():
        raise TypeError(
            f"theta: expected a floating torch.Tensor of shape {tuple(P.event_shape)}, got {type(theta).__name__}"
        )
    if theta.shape != P.event_shape:
        raise ValueError(f"theta: expected shape {tuple(P.event_shape)} (P.event_shape), got {tuple(theta.shape)}")
    if not bool(torch.isfinite(theta).all()):
        raise ValueError("theta: expected finite values")
    return theta.detach()


def reference_gradient(
    P,
    theta,
    loss,
    noise="gumbel",
    samples: int = 100_000,
    batch: int = 20_000,
    confidence: float = 0.95,
    generator: torch.Generator | None = None,
    solver: str = "auto",
    pilot: int | None = None,
    progress=None,
) -> Reference:
    """An unbiased estimate of grad_theta E[L(X)] with a confidence interval (score function + control variates).

    Args:
        P: a polytope; theta: ``P.event_shape``; loss: ``(B, *event_shape) -> (B,)``.
        noise: a name or :class:`sstcvx.Noise` with a smooth positive density on R.
        samples: hard samples behind the estimate (the pilot batch comes on top).
        batch: rows per argmax call.  pilot: samples of the pilot batch that fits the
            control-variate matrix (default max(1000, samples // 10), at most ``samples``
            and 50 000, at least 4 d).
        generator: a torch.Generator on theta's device, for reproducibility.
        progress: optional callable ``progress(done_samples)`` called after each batch.

    Cost: (samples + pilot) / batch argmax calls, the loss, O((samples + pilot) d^2) for the
    covariances.  Precision: the standard error shrinks as 1 / sqrt(samples).
    """
    theta = _check_theta(P, theta)
    law = get_noise(noise)
    check_noise_for_score(law)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
        raise ValueError(f"samples: expected an int >= 2, got {samples!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch: expected a positive int, got {batch!r}")
    if not (isinstance(confidence, float) and 0 < confidence < 1):
        raise ValueError(f"confidence: expected a float in (0, 1), got {confidence!r}")
    d = theta.numel()
    pilot = max(4 * d, min(samples, 50_000, max(1000, samples // 10))) if pilot is None else pilot
    if isinstance(pilot, bool) or not isinstance(pilot, int) or pilot < 2:
        raise ValueError(f"pilot: expected an int >= 2, got {pilot!r}")
    start = time.perf_counter()

    def draw(num):
        U = theta + law.sample(
            (num,) + tuple(P.event_shape), dtype=theta.dtype, device=theta.device, generator=generator
        )
        X = argmax(P, U, solver)
        values = evaluate_loss(loss, X, "reference").detach().to(torch.float64)
        S = score(law, theta, U).reshape(num, d).to(torch.float64)
        return values[:, None] * S, S

    # the pilot batch: fit B (d x d) by least squares of G on S (with an intercept)
    G, S = (torch.cat(parts) for parts in zip(*(draw(min(batch, pilot - i)) for i in range(0, pilot, batch))))
    Gc, Sc = G - G.mean(0), S - S.mean(0)
    ridge = 1e-10 * float((Sc * Sc).sum()) / max(pilot, 1)
    B_t = torch.linalg.solve(
        Sc.T @ Sc + ridge * torch.eye(d, dtype=Sc.dtype, device=Sc.device), Sc.T @ Gc
    )  # (d, d) = B^T
    plain, corrected = Moments(), Moments()
    done = 0
    while done < samples:
        num = min(batch, samples - done)
        G, S = draw(num)
        plain.add(G)
        corrected.add(G - S @ B_t)
        done += num
        if progress is not None:
            progress(done)
    cov = corrected.cov / samples
    mean = corrected.mean.to(theta.dtype).reshape(P.event_shape)
    half = (
        (normal_quantile(confidence) * torch.sqrt(torch.diagonal(cov).clamp_min(0)))
        .to(theta.dtype)
        .reshape(P.event_shape)
    )
    total_plain, total_corrected = float(torch.diagonal(plain.cov).sum()), float(torch.diagonal(corrected.cov).sum())
    return Reference(
        mean=mean,
        cov=cov,
        low=mean - half,
        high=mean + half,
        radius=ball_radius(cov, confidence),
        samples=samples,
        kind="score_function",
        confidence=confidence,
        seconds=time.perf_counter() - start,
        variance_reduction=total_plain / total_corrected if total_corrected > 0 else None,
    )


def _vertex_structure(P):
    """``("simplex", index)``, ``("hypercube", V)`` or ``None`` from P's vertex list (flattened)."""
    d = math.prod(P.event_shape)
    if d > 4096:
        return None
    V = P.vertices
    if V is None:
        return None
    V = V.reshape(V.shape[0], -1)
    if not bool(((V == 0) | (V == 1)).all()):
        return None
    if V.shape[0] == d and bool((V.sum(1) == 1).all()) and bool((V.sum(0) == 1).all()):
        return "simplex", V.argmax(1)
    if d <= 12 and V.shape[0] == 2**d and torch.unique(V, dim=0).shape[0] == 2**d:
        return "hypercube", V
    return None


def _positive_probability(law, theta):
    """P(theta + eps > 0) elementwise, differentiable, or None for a law without a closed form here."""
    z = theta / law.scale
    kind = type(law)
    if kind is Gumbel:
        return -torch.expm1(-torch.exp(z))  # 1 - exp(-e^z): P(G > -z) for a standard Gumbel G
    if kind is Gaussian:
        return 0.5 * torch.erfc(-z / math.sqrt(2))
    if kind is Logistic:
        return torch.sigmoid(z)
    return None


def exact_gradient(P, theta, loss, noise="gumbel") -> torch.Tensor | None:
    """The exact grad_theta E[L(X)] when the law of X is known in closed form (see the module), else None.

    Returns a tensor of theta's shape, dtype and device.  Cost: one loss call on the vertex
    list (d or 2^d rows) and its backward pass; float64 throughout.
    """
    theta = _check_theta(P, theta)
    law = get_noise(noise)
    structure = _vertex_structure(P)
    if structure is None:
        return None
    kind, info = structure
    t = theta.to(torch.float64).reshape(-1).clone().requires_grad_(True)
    with torch.enable_grad():
        if kind == "simplex":
            if type(law) is not Gumbel:
                return None
            d = t.shape[0]
            V = torch.eye(d, dtype=torch.float64, device=theta.device)[info.to(theta.device)]  # vertex j is e_info[j]
            probs = torch.softmax(t / law.scale, 0)[info.to(theta.device)]
        else:
            p = _positive_probability(law, t)
            if p is None:
                return None
            V = info.to(device=theta.device)
            probs = torch.where(V > 0, p, 1 - p).prod(1)
        X = V.reshape((-1,) + tuple(P.event_shape)).to(theta.dtype)
        values = evaluate_loss(loss, X, "exact enumeration").to(torch.float64)
        (grad,) = torch.autograd.grad((probs * values.detach()).sum(), t)
    return grad.reshape(P.event_shape).to(theta.dtype)


def exact_reference(P, theta, loss, noise="gumbel", confidence: float = 0.95) -> Reference | None:
    """:func:`exact_gradient` as a :class:`Reference` (zero covariance), or None."""
    start = time.perf_counter()
    g = exact_gradient(P, theta, loss, noise)
    if g is None:
        return None
    d = g.numel()
    return Reference(
        mean=g,
        cov=torch.zeros(d, d, dtype=torch.float64, device=g.device),
        low=g,
        high=g,
        radius=0.0,
        samples=0,
        kind="exact",
        confidence=confidence,
        seconds=time.perf_counter() - start,
    )
