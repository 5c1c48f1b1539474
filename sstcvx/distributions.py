"""``torch.distributions`` objects for the stochastic argmax and softmax tricks.

All draw U = theta + noise with theta of shape ``(*batch_shape, *P.event_shape)``:

* :class:`StochasticArgmax`: ``sample`` gives the hard vertex (detached);
* :class:`RelaxedStochasticArgmax`: ``rsample`` gives X_tau, differentiable;
* :class:`StraightThroughStochasticArgmax`: ``rsample`` gives the vertex in the
  forward pass and the Jacobian of X_tau in the backward pass.

``log_prob`` is not offered: the law of the LP argmax under Gumbel noise has no
closed form on structured sets (it is not the Gibbs distribution; DESIGN.md §1).
"""

from __future__ import annotations

import torch
from torch.distributions import Distribution

from ._checks import check_polytope, check_solver, check_tau, check_utility
from .noise import get_noise
from .regularizers import get_regularizer
from .sampling import argmax, relax, straight_through


class StochasticArgmax(Distribution):
    """The distribution of X = argmax_{x in P} <theta + eps, x> (the stochastic argmax trick)."""

    arg_constraints: dict = {}
    has_rsample = False

    def __init__(self, polytope, theta, noise="gumbel", solver="auto", generator=None):
        check_polytope(polytope)
        self.polytope = polytope
        self.theta = check_utility(polytope, theta, "theta")
        self.noise = get_noise(noise)
        self.solver = check_solver(solver)
        self.generator = generator
        batch_shape = theta.shape[: theta.dim() - polytope.event_dim]
        super().__init__(batch_shape, polytope.event_shape, validate_args=False)

    def utilities(self, sample_shape=torch.Size()) -> torch.Tensor:
        """Draw U = theta + eps of shape ``sample_shape + batch_shape + event_shape``."""
        shape = self._extended_shape(torch.Size(sample_shape))
        eps = self.noise.sample(shape, dtype=self.theta.dtype, device=self.theta.device, generator=self.generator)
        return self.theta.expand(shape) + eps

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            return argmax(self.polytope, self.utilities(sample_shape), self.solver)

    def log_prob(self, value):
        raise NotImplementedError(
            "the stochastic argmax law has no closed-form density on a general polytope; "
            "estimate it by sampling"
        )


class RelaxedStochasticArgmax(StochasticArgmax):
    """The distribution of X_tau = argmax_{x in P} <theta + eps, x> - tau f(x) (the stochastic softmax trick)."""

    has_rsample = True

    def __init__(self, polytope, theta, tau=1.0, regularizer="entropy", noise="gumbel", solver="auto", generator=None):
        super().__init__(polytope, theta, noise, solver, generator)
        check_tau(tau, self.theta, polytope.event_dim)
        self.tau = tau
        self.regularizer = get_regularizer(regularizer)

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        return relax(self.polytope, self.utilities(sample_shape), self.tau, self.regularizer, self.solver)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)


class StraightThroughStochasticArgmax(RelaxedStochasticArgmax):
    """Hard vertices in the forward pass, the relaxed Jacobian in the backward pass (same U)."""

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        U = self.utilities(sample_shape)
        soft = relax(self.polytope, U, self.tau, self.regularizer, self.solver)
        return straight_through(argmax(self.polytope, U, self.solver), soft)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            return argmax(self.polytope, self.utilities(sample_shape), self.solver)
