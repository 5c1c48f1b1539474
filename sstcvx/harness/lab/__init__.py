"""The estimator lab: how good is a gradient estimator of E[L(X)] on a polytope?

For the hard sample X = argmax_{x in P} <theta + eps, x> and a user's loss L, the lab
measures estimators of grad_theta E[L(X)] (the relaxed stochastic softmax trick,
straight-through, the score function with baselines, or the user's own) against an
unbiased reference gradient with a confidence interval: bias (norm and cosine, with
intervals), variance, mean squared error, time and samples needed per sample.

* :mod:`.estimators`: the estimators, one signature ``fn(P, theta, loss, noise, num, generator)``;
* :mod:`.reference`: the Monte Carlo reference with control variates, and exact gradients;
* :mod:`.stats`: streaming moments and confidence regions;
* :mod:`.report`: the report (table, JSON, CSV, plots);
* :mod:`.losses`: built-in losses by name;
* :mod:`.run`: :func:`run_lab`;
* :mod:`.command`: the ``sstcvx lab`` subcommand.
"""

from .estimators import (
    BASELINES,
    CustomEstimator,
    Estimator,
    LossError,
    Relaxed,
    ScoreFunction,
    StraightThrough,
    as_estimator,
    score,
)
from .losses import LOSSES, make_loss
from .reference import Reference, exact_gradient, exact_reference, reference_gradient
from .report import LabReport, LabRow
from .run import ESTIMATORS, measure, run_lab

__all__ = [
    "BASELINES",
    "ESTIMATORS",
    "LOSSES",
    "CustomEstimator",
    "Estimator",
    "LabReport",
    "LabRow",
    "LossError",
    "Reference",
    "Relaxed",
    "ScoreFunction",
    "StraightThrough",
    "as_estimator",
    "exact_gradient",
    "exact_reference",
    "make_loss",
    "measure",
    "reference_gradient",
    "run_lab",
    "score",
]
