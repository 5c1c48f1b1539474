"""The Euclidean relaxation on the Birkhoff polytope: the projection onto the doubly stochastic matrices.

:func:`birkhoff_projection` solves argmin_{x doubly stochastic} ||x - Z||^2, the
``euclidean`` relaxation of :class:`polytopes.Permutation` (registered there, Z = U / tau),
by semi-smooth Newton on its dual with the row potentials exact (simplex projections),
and an exact backward (the Jacobian of the piecewise linear map).  It needs no polytope.

Tuning constants: its own below, and from :mod:`polytopes.sinkhorn` the continuation
(``_FIRST_SPREAD`` = 32, ``_SCALE_FACTOR`` = 8) and the Newton ridge (``_NEWTON_RIDGE``
= 1e-3 times the residual, at least ``_RIDGE_FLOOR`` = 1e-13).

======================  =====  ==============================================================
``BIRKHOFF_TOL``        1e-12  default largest |column sum - 1| accepted (plus rounding of X)
``BIRKHOFF_MAX_ITER``   200    default budget of Newton steps over all stages
``_BIRKHOFF_STAGE_TOL`` 1e-3   column-sum tolerance of the stages before the last
``_BIRKHOFF_HALVINGS``  12     trial steps per Newton step (each a quarter of the last)
``_BIRKHOFF_SWEEPS``    4      exact row/column steps before the Newton steps of a stage
======================  =====  ==============================================================
"""

from __future__ import annotations

import torch

from ._kernels import check_solver_arguments, sparsemax_threshold
from .sinkhorn import (
    _FIRST_SPREAD,
    _NEWTON_RIDGE,
    _RIDGE_FLOOR,
    _SCALE_FACTOR,
    grounded_laplacian,
    run_batched,
    sinkhorn_vjp,
    solve_spd,
)

# Projection defaults: largest |column sum - 1| accepted (plus rounding, see _birkhoff_forward),
# and the budget of Newton steps over all continuation stages.
BIRKHOFF_TOL = 1e-12
BIRKHOFF_MAX_ITER = 200
_EPS64 = float(torch.finfo(torch.float64).eps)
_BIRKHOFF_STAGE_TOL = 1e-3  # column-sum tolerance of the continuation stages before the last
_BIRKHOFF_HALVINGS = 12  # trial steps per Newton step (each a quarter of the last) before a column step
_BIRKHOFF_SWEEPS = 4  # alternating row and column projections before the Newton steps of each stage


def _project_rows(V: torch.Tensor):
    """Each row of V (..., n) onto the probability simplex: (max(V - alpha, 0), alpha), rows summing to 1.

    The threshold alpha is the sparsemax threshold, exact by sorting; O(n log n) per row.
    """
    alpha, _, _ = sparsemax_threshold(V)
    return (V - alpha).clamp_min(0.0), alpha.squeeze(-1)


def _birkhoff_stage(Z, beta, tol, budget, slack):
    """Damped semi-smooth Newton on the reduced dual of the projection of Z (B, n, n); returns (X, beta, err, steps).

    The projection is X = max(Z - alpha 1^T - 1 beta^T, 0) with unit row and column
    sums.  For given column potentials beta the row potentials alpha are exact (a
    simplex projection of each row), which leaves the convex, piecewise quadratic
    phi(beta) = sum_i (|X_i|^2 / 2 + alpha_i) + sum_j beta_j, with gradient 1 - c
    (c the column sums) and generalised Hessian the Laplacian diag(c_S) -
    S^T diag(1 / r_S) S of the support S = {X > 0} (r_S, c_S its row and column
    counts): the Sinkhorn Newton system with X replaced by S (see _newton).  A step
    is accepted by the Armijo test on phi (with ``slack`` for rounding) or when it
    reaches ``tol``; after _BIRKHOFF_HALVINGS trials an element takes an exact
    column step (beta from the column projections), which decreases phi too.
    """
    for _ in range(_BIRKHOFF_SWEEPS):  # exact row then column steps: cheap, and they save Newton steps
        _, alpha = _project_rows(Z - beta.unsqueeze(-2))
        _, beta = _project_rows((Z - alpha.unsqueeze(-1)).mT)
    X, alpha = _project_rows(Z - beta.unsqueeze(-2))
    g = X.sum(-2) - 1.0
    err = g.abs().amax(-1)
    phi = 0.5 * (X * X).sum((-2, -1)) + alpha.sum(-1) + beta.sum(-1)
    for step in range(budget):
        pending = err > tol
        if not bool(pending.any()):
            return X, beta, err, step
        S = (X > 0).to(Z.dtype)
        ridge = (_NEWTON_RIDGE * err).clamp_min(_RIDGE_FLOOR).unsqueeze(-1)
        d = solve_spd(grounded_laplacian(S, S.sum(-1), ridge), g)
        decrease = 1e-4 * (g * d).sum(-1)
        t = torch.ones_like(err)
        for _ in range(_BIRKHOFF_HALVINGS):
            trial_beta = beta + t.unsqueeze(-1) * d
            trial_X, trial_alpha = _project_rows(Z - trial_beta.unsqueeze(-2))
            trial_phi = 0.5 * (trial_X * trial_X).sum((-2, -1)) + trial_alpha.sum(-1) + trial_beta.sum(-1)
            trial_err = (trial_X.sum(-2) - 1.0).abs().amax(-1)
            ok = pending & ((trial_phi <= phi - t * decrease + slack) | (trial_err <= tol))
            beta = torch.where(ok.unsqueeze(-1), trial_beta, beta)
            X, alpha = torch.where(ok[:, None, None], trial_X, X), torch.where(ok.unsqueeze(-1), trial_alpha, alpha)
            pending = pending & ~ok
            if not bool(pending.any()):
                break
            t = 0.25 * t
        if bool(pending.any()):
            _, column_beta = _project_rows((Z - alpha.unsqueeze(-1)).mT)
            column_X, column_alpha = _project_rows(Z - column_beta.unsqueeze(-2))
            beta = torch.where(pending.unsqueeze(-1), column_beta, beta)
            X = torch.where(pending[:, None, None], column_X, X)
            alpha = torch.where(pending.unsqueeze(-1), column_alpha, alpha)
        g = X.sum(-2) - 1.0
        err = g.abs().amax(-1)
        phi = 0.5 * (X * X).sum((-2, -1)) + alpha.sum(-1) + beta.sum(-1)
    return X, beta, err, budget


@torch.no_grad()
def _birkhoff_forward(Z: torch.Tensor, tol: float, max_iter: int):
    """The projection of Z float64 (B, n, n) onto the Birkhoff polytope; returns (X, unconverged, violation).

    Continuation as in :func:`_sinkhorn_forward`: for a large spread of Z the
    projection is nearly a linear program, where Newton from a cold start crawls, so
    it solves Z / s for s decreasing 8x per stage from spread / 32 down to 1, each
    stage to a column-sum tolerance of 1e-3 and warm-started by the previous dual
    beta scaled by s / s_next.  The last stage's tolerance is ``tol`` plus the
    rounding of X = Z - alpha - beta, 16 n eps max|Z| (1e-9 at |Z| = 1e6).
    """
    B, n, _ = Z.shape
    spread = Z.amax((-2, -1)) - Z.amin((-2, -1))
    s = (spread / _FIRST_SPREAD).clamp_min(1.0)
    beta = Z.new_zeros(B, n)
    steps = 0
    while True:
        Zs = Z / s[:, None, None]
        scale = Zs.abs().amax((-2, -1))
        final = s == 1.0
        stage_tol = torch.where(final, tol + 16 * n * _EPS64 * scale, torch.full_like(s, max(_BIRKHOFF_STAGE_TOL, tol)))
        slack = 64 * n * n * _EPS64 * (scale + 1.0)
        X, beta, err, used = _birkhoff_stage(Zs, beta, stage_tol, max_iter - steps, slack)
        steps += used
        if bool(final.all()) or steps >= max_iter:
            break
        s_next = (s / _SCALE_FACTOR).clamp_min(1.0)
        beta = beta * (s / s_next).unsqueeze(-1)
        s = s_next
    unconverged = (err > stage_tol) | ~final
    return X, int(unconverged.sum()), float(err.max())


class _BirkhoffProjection(torch.autograd.Function):
    @staticmethod
    def forward(ctx, Z, tol, max_iter, report):
        X, report["unconverged"], report["violation"] = _birkhoff_forward(Z, tol, max_iter)
        ctx.save_for_backward((X > 0).to(Z.dtype))
        return X

    @staticmethod
    def backward(ctx, G):
        # X = max(Z - alpha - beta, 0) is piecewise linear: on the support S its Jacobian is the
        # orthogonal projection onto {D supported on S with zero row and column sums}, which is the
        # Sinkhorn adjoint with X replaced by the indicator of S
        (support,) = ctx.saved_tensors
        return sinkhorn_vjp(support, G), None, None, None


def birkhoff_projection(Z: torch.Tensor, tol: float = BIRKHOFF_TOL, max_iter: int = BIRKHOFF_MAX_ITER) -> torch.Tensor:
    """argmin_{x in Birkhoff} ||x - Z||^2: the Euclidean projection onto the doubly stochastic matrices.

    Z: (..., n, n) -> X (..., n, n), Z's dtype and device, X = max(Z - a 1^T - 1 b^T, 0)
    with rows summing to 1 to rounding and columns to within ``tol`` (default 1e-12)
    plus the rounding of X, 16 n eps max|Z|.  It is the ``euclidean`` relaxation of
    :class:`Permutation` (Z = U / tau): sparse, with exact zeros.

    Forward: semi-smooth Newton on the dual in b, the row potentials a exact by
    sorting (see :func:`_birkhoff_stage`), with continuation in the scale of Z for
    large spreads; typically 5-15 steps at max|Z| ~ 1, 10-50 at spreads up to 1e6,
    each an n x n Cholesky solve and a few row sorts (O(n^3 + n^2 log n)).  Warns
    (RuntimeWarning) if ``max_iter`` steps do not reach ``tol``.

    Backward: the exact Jacobian of the piecewise linear map, the orthogonal projection
    onto the matrices supported on X's support with zero row and column sums (one
    n x n Cholesky solve).

    Precision: float64 internally whatever the input (the potentials reach |Z|, 1e6
    at tau = 1e-3 with |theta| = 1e3, and X is their difference with Z).
    """
    check_solver_arguments(Z, tol, max_iter)
    return _birkhoff(Z, float(tol), max_iter, stacklevel=3)


def _birkhoff(Z, tol=BIRKHOFF_TOL, max_iter=BIRKHOFF_MAX_ITER, stacklevel=2):
    """:func:`birkhoff_projection` without argument checks (the registered solver's inputs are checked by sstcvx)."""
    return run_batched(_BirkhoffProjection, "birkhoff_projection", Z, tol, max_iter, stacklevel)
