"""Per-sample gradient estimators of grad_theta E[L(X)], X = argmax_{x in P} <theta + eps, x>.

Every estimator is a callable with one signature,

    estimator(P, theta, loss, noise, num, generator) -> G

where ``P`` is an :class:`sstcvx.Polytope`, ``theta`` a floating tensor of shape
``P.event_shape``, ``loss`` a batched torch function ``(B, *event_shape) -> (B,)``, ``noise``
an :class:`sstcvx.Noise`, ``num`` the number of samples and ``generator`` an optional
``torch.Generator``; ``G`` has shape ``(num, *event_shape)``, theta's dtype and device, row k
being the k-th sample's gradient estimate.  A user's function with this signature can be
passed to :func:`sstcvx.harness.lab.run_lab` beside the built-in ones (wrap it in
:class:`CustomEstimator` to name it or to declare a group size).

Samples are independent unless an estimator says otherwise: ``group_size = K > 1`` declares
that rows come in consecutive groups of K that are correlated within a group and independent
across groups (the leave-one-out baseline); the lab then computes its statistics from group
means.  A stateful estimator (the running-mean baseline) has ``reset()``, called before each
measurement.

All estimators draw the utilities U = theta + eps in one batch of ``num`` rows, so the cost
is one batched solver call (plus its backward pass) per call.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ...noise import Exponential, Noise
from ...regularizers import get_regularizer
from ...sampling import argmax, relax, straight_through

BASELINES = ("none", "running_mean", "leave_one_out")


class LossError(ValueError):
    """The user's loss returned something other than ``num`` finite values."""


def evaluate_loss(loss: Callable, X: torch.Tensor, where: str) -> torch.Tensor:
    """``loss(X)`` checked to be a floating tensor of shape ``(B,)`` with finite values.

    Raises :class:`LossError` (a ValueError) naming ``where`` and the first bad sample.
    """
    values = loss(X)
    B = X.shape[0]
    if not isinstance(values, torch.Tensor) or not values.is_floating_point():
        raise LossError(
            f"loss: expected a floating torch.Tensor of shape ({B},) from loss(X), got {type(values).__name__}"
            + (f" of dtype {values.dtype}" if isinstance(values, torch.Tensor) else "")
        )
    if values.shape != (B,):
        raise LossError(
            f"loss: expected one value per sample, shape ({B},), for X of shape {tuple(X.shape)}; "
            f"got shape {tuple(values.shape)}"
        )
    finite = torch.isfinite(values.detach())
    if not bool(finite.all()):
        k = int((~finite).nonzero()[0])
        raise LossError(
            f"loss: non-finite value {float(values.detach()[k])} at sample {k} of {B} ({where}); "
            "the lab needs a finite loss on every point of P"
        )
    return values


def check_noise_for_score(noise: Noise) -> None:
    """Raise unless the score function grad_theta log p(U - theta) is an unbiased gradient for ``noise``.

    Differentiating under the integral needs a density that is positive and differentiable
    everywhere: the exponential law's support [theta, inf) moves with theta, which adds a
    boundary term the score function misses.
    """
    if isinstance(noise, Exponential):
        raise ValueError(
            "noise: the score-function estimator (and the lab's reference) needs a density positive "
            "on all of R; the exponential law's support moves with theta, so the score function is "
            "biased. Use gumbel, gaussian or logistic noise"
        )
    probe = torch.zeros(1, dtype=torch.float64)
    try:
        noise.log_prob(probe)
    except NotImplementedError:
        raise TypeError(
            f"noise: {noise!r} has no log_prob; the score-function estimator needs the log-density"
        ) from None


def score(noise: Noise, theta: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """grad_theta log p(U - theta) per sample, shape ``U.shape`` (U: (num, *event_shape), no gradient).

    Computed by autograd through ``noise.log_prob`` on a per-sample copy of theta, so any
    :class:`sstcvx.Noise` with a differentiable log-density works.
    """
    with torch.enable_grad():
        rows = theta.detach().expand_as(U).clone().requires_grad_(True)
        log_p = noise.log_prob(U.detach() - rows)
        (grad,) = torch.autograd.grad(log_p.sum(), rows)
    if not bool(torch.isfinite(grad).all()):
        raise ValueError(f"noise: the score of {noise!r} is not finite at some sample (log_prob returned -inf or nan)")
    return grad


def _draw(P, theta, noise, num, generator):
    shape = (num,) + tuple(P.event_shape)
    return noise.sample(shape, dtype=theta.dtype, device=theta.device, generator=generator)


def _check_num(num, group_size=1):
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num: expected a positive int, got {num!r}")
    if num % group_size:
        raise ValueError(f"num: expected a multiple of the group size {group_size}, got {num}")


class Estimator:
    """Base class of the built-in estimators: a name, the settings that identify it, a group size."""

    name = "estimator"
    group_size = 1
    tau: float | None = None
    regularizer: str | None = None
    baseline: str | None = None

    def reset(self) -> None:
        """Forget any state (called by the lab before each measurement)."""

    def settings(self) -> dict:
        """The fields that identify this estimator in a report (besides its name)."""
        return {"tau": self.tau, "regularizer": self.regularizer, "baseline": self.baseline}

    def __call__(self, P, theta, loss, noise, num, generator=None) -> torch.Tensor:
        raise NotImplementedError


class Relaxed(Estimator):
    """The stochastic softmax trick: grad_theta L(X_tau(theta + eps)), X_tau = relax(P, U, tau, regularizer).

    Biased (it differentiates E[L(X_tau)], not E[L(X)]), with a bias that vanishes as tau -> 0
    and a variance that grows.  Cost: one batched relaxation and its backward pass.
    """

    name = "relaxed"

    def __init__(self, tau: float = 1.0, regularizer="entropy", solver: str = "auto"):
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (math.isfinite(tau) and tau > 0):
            raise ValueError(f"tau: expected a positive finite number, got {tau!r}")
        self.tau = float(tau)
        self.regularizer = get_regularizer(regularizer).name
        self._regularizer = regularizer
        self.solver = solver

    def _forward(self, P, U):
        return relax(P, U, self.tau, self._regularizer, self.solver)

    def __call__(self, P, theta, loss, noise, num, generator=None):
        _check_num(num)
        eps = _draw(P, theta, noise, num, generator)
        with torch.enable_grad():
            rows = theta.detach().expand_as(eps).clone().requires_grad_(True)
            X = self._forward(P, rows + eps)
            values = evaluate_loss(loss, X, f"{self.name}, tau={self.tau:g}")
            (grad,) = torch.autograd.grad(values.sum(), rows, allow_unused=True)
        return torch.zeros_like(rows) if grad is None else grad.detach()

    def __repr__(self):
        return f"{type(self).__name__}(tau={self.tau:g}, regularizer={self.regularizer!r})"


class StraightThrough(Relaxed):
    """Straight-through: the loss sees the hard vertex X, the gradient flows through X_tau of the same U.

    grad_theta L(X + X_tau - stopgrad(X_tau)) = J_{X_tau}(theta)^T grad L(X).  Biased at every tau.
    """

    name = "straight_through"

    def _forward(self, P, U):
        return straight_through(
            argmax(P, U.detach(), self.solver), relax(P, U, self.tau, self._regularizer, self.solver)
        )


class ScoreFunction(Estimator):
    """The score function in utility space: (L(X) - b) grad_theta log p(U - theta), X = argmax(P, U).

    Unbiased because X is a deterministic function of U and U has density p(u - theta) (the
    noise law must have a smooth positive density on R: gumbel, gaussian, logistic).
    Baselines b (each independent of the sample it multiplies, so the estimator stays unbiased):

    * ``"none"``: b = 0;
    * ``"running_mean"``: b = the mean loss of all earlier samples since the last ``reset()``
      (0 for the very first), computed with a cumulative sum within a batch;
    * ``"leave_one_out"``: samples in consecutive groups of ``k``; b = the mean loss of the
      other k - 1 samples of the group (``group_size = k``; ``num`` must be a multiple of k).

    Cost: one batched hard argmax, the loss, and the noise's log-density gradient.
    """

    name = "score_function"

    def __init__(self, baseline: str = "none", k: int = 8, solver: str = "auto"):
        if baseline not in BASELINES:
            raise ValueError(f"baseline: expected one of {', '.join(BASELINES)}, got {baseline!r}")
        if baseline == "leave_one_out" and (isinstance(k, bool) or not isinstance(k, int) or k < 2):
            raise ValueError(f"k: the leave-one-out baseline needs groups of at least 2 samples, got {k!r}")
        self.baseline = baseline
        self.k: int | None = k if baseline == "leave_one_out" else None
        self.group_size = k if baseline == "leave_one_out" else 1
        self.solver = solver
        self.reset()

    def reset(self):
        self._sum = 0.0
        self._count = 0

    def settings(self):
        return {**super().settings(), "k": self.k}

    def _baselines(self, values: torch.Tensor) -> torch.Tensor:
        if self.baseline == "none":
            return torch.zeros_like(values)
        if self.baseline == "leave_one_out":
            k = self.group_size  # the leave-one-out group: k samples
            groups = values.reshape(-1, k)
            return ((groups.sum(-1, keepdim=True) - groups) / (k - 1)).reshape(-1)
        earlier = torch.cumsum(values, 0) - values + self._sum  # sum of the losses before each sample
        counts = self._count + torch.arange(values.shape[0], dtype=values.dtype, device=values.device)
        baseline = torch.where(counts > 0, earlier / counts.clamp_min(1), torch.zeros_like(values))
        self._sum += float(values.sum())
        self._count += values.shape[0]
        return baseline

    def __call__(self, P, theta, loss, noise, num, generator=None):
        _check_num(num, self.group_size)
        check_noise_for_score(noise)
        U = theta.detach() + _draw(P, theta, noise, num, generator)
        X = argmax(P, U, self.solver)
        with torch.no_grad():
            values = evaluate_loss(loss, X, f"{self.name}, baseline={self.baseline}").detach()
        weights = values - self._baselines(values)
        return weights.reshape((-1,) + (1,) * P.event_dim) * score(noise, theta, U)

    def __repr__(self):
        extra = f", k={self.k}" if self.k else ""
        return f"ScoreFunction(baseline={self.baseline!r}{extra})"


class CustomEstimator(Estimator):
    """A user's estimator ``fn(P, theta, loss, noise, num, generator) -> (num, *event_shape)`` with a name.

    ``group_size``: as for the built-in ones (1: independent samples); ``tau``: the temperature
    it uses, if any (places it on the lab's plots against tau); ``reset``: optional callable.
    """

    def __init__(
        self, fn: Callable, name: str | None = None, group_size: int = 1, tau: float | None = None, reset=None
    ):
        if not callable(fn):
            raise TypeError(
                f"fn: expected a callable estimator(P, theta, loss, noise, num, generator), got {type(fn).__name__}"
            )
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size: expected a positive int, got {group_size!r}")
        self.fn = fn
        self.name = str(name or getattr(fn, "__name__", type(fn).__name__))
        self.group_size = group_size
        self.tau = None if tau is None else float(tau)
        self._reset = reset

    def reset(self):
        if self._reset is not None:
            self._reset()

    def __call__(self, P, theta, loss, noise, num, generator=None):
        return self.fn(P, theta, loss, noise, num, generator)

    def __repr__(self):
        return f"CustomEstimator({self.name!r})"


def as_estimator(obj) -> Estimator:
    """An :class:`Estimator` from an estimator object or a plain callable with the estimator signature."""
    if isinstance(obj, Estimator):
        return obj
    if callable(obj):
        return CustomEstimator(obj)
    raise TypeError(f"estimators: expected a name, an Estimator or a callable, got {type(obj).__name__}")
