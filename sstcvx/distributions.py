"""``torch.distributions`` objects for the stochastic argmax and softmax tricks.

All draw U = theta + noise with theta of shape ``(*batch_shape, *P.event_shape)``:

* :class:`StochasticArgmax`: ``sample`` gives the hard vertex (detached);
* :class:`RelaxedStochasticArgmax`: ``rsample`` gives X_tau, differentiable;
* :class:`StraightThroughStochasticArgmax`: ``rsample`` gives the vertex in the
  forward pass and the Jacobian of X_tau in the backward pass.

``log_prob`` is not offered: the law of the LP argmax under Gumbel noise has no
closed form on structured sets (it is not the Gibbs distribution).
"""

from __future__ import annotations

import torch
from torch.distributions import Distribution

from .noise import get_noise
from .regularizers import get_regularizer
from .sampling import _hard, _relaxed, relaxation_solver, straight_through
from .validation import check_polytope, check_solver, check_tau, check_utility, shape_tau, validation_enabled


class StochasticArgmax(Distribution):
    """The distribution of X = argmax_{x in P} <theta + eps, x> (the stochastic argmax trick)."""

    arg_constraints: dict = {}
    has_rsample = False

    def __init__(self, polytope, theta, noise="gumbel", solver="auto", generator=None, validate_args=None):
        #: whether samples check their outputs (the arguments are checked here, once)
        self.validate = validation_enabled(validate_args)
        if self.validate:
            check_polytope(polytope)
            theta = check_utility(polytope, theta, "theta")
        self.polytope = polytope
        self.theta = theta
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
            return _hard(self.polytope, self.utilities(sample_shape), self.solver, self.validate)

    def log_prob(self, value):
        raise NotImplementedError(
            "the stochastic argmax law has no closed-form density on a general polytope; estimate it by sampling"
        )


class RelaxedStochasticArgmax(StochasticArgmax):
    """The distribution of X_tau = argmax_{x in P} <theta + eps, x> - tau f(x) (the stochastic softmax trick)."""

    has_rsample = True

    def __init__(
        self,
        polytope,
        theta,
        tau=1.0,
        regularizer="entropy",
        noise="gumbel",
        solver="auto",
        generator=None,
        validate_args=None,
    ):
        super().__init__(polytope, theta, noise, solver, generator, validate_args)
        if self.validate:
            check_tau(tau, self.theta, polytope.event_dim)
        self.tau = tau
        self.regularizer = get_regularizer(regularizer)

    def _relaxed(self, U: torch.Tensor) -> torch.Tensor:
        """X_tau for utilities U of shape ``sample_shape + batch_shape + event_shape``."""
        # tau broadcasts against the batch shape, so it is shaped for U's own batch dimensions
        tau = shape_tau(self.tau, U, self.polytope.event_dim)
        fn, path = relaxation_solver(self.polytope, self.regularizer, self.solver)
        return _relaxed(self.polytope, U, tau, fn, path, None, self.validate)

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        return self._relaxed(self.utilities(sample_shape))

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)


class StraightThroughStochasticArgmax(RelaxedStochasticArgmax):
    """Hard vertices in the forward pass, the relaxed Jacobian in the backward pass (same U)."""

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        U = self.utilities(sample_shape)
        return straight_through(_hard(self.polytope, U.detach(), self.solver, self.validate), self._relaxed(U))

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            return _hard(self.polytope, self.utilities(sample_shape), self.solver, self.validate)
