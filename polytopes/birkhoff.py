"""The Euclidean relaxation on the Birkhoff polytope: the projection onto the doubly stochastic matrices.

:func:`birkhoff_projection` solves argmin_{x doubly stochastic} ||x - Z||^2, the
``euclidean`` relaxation of :class:`polytopes.Permutation` (registered there, Z = U / tau),
by semi-smooth Newton on its dual (on both potentials when the spread of Z is moderate,
else on the column potentials with the rows exact, by continuation), and an exact backward
(the Jacobian of the piecewise linear map).  It needs no polytope.  On CPU tensors the forward
and the backward run as numba kernels (:mod:`polytopes._compiled_birkhoff`, see
:func:`_compiled_solve`), the torch code below being the path for other devices and the reference.

Tuning constants: its own below, and from :mod:`polytopes.sinkhorn` the continuation
(``_FIRST_SPREAD`` = 32, ``_SCALE_FACTOR`` = 8) and the Newton ridge (``_NEWTON_RIDGE``
= 1e-3 times the residual, at least ``_RIDGE_FLOOR`` = 1e-13).

========================  =====  ==============================================================
``BIRKHOFF_TOL``          1e-12  default largest |column sum - 1| accepted (plus rounding of X)
``BIRKHOFF_MAX_ITER``     200    default budget of Newton steps over all stages
``_BIRKHOFF_STAGE_TOL``   1e-3   column-sum tolerance of the stages before the last
``_BIRKHOFF_HALVINGS``    12     trial steps per Newton step (each a quarter of the last)
``_EXACT_SEARCH_N``       16     full-dual Newton: exact line search up to this n, else trials
``_BIRKHOFF_SWEEPS``      4      exact row/column steps before the Newton steps of a stage
``_NEWTON_SPREAD``        32     full-dual Newton when max(Z) - min(Z) <= 32 in every element
``_NEWTON_SWEEPS``        2      exact row/column steps before its Newton steps
``_NEWTON_MAX_ITER``      30     its step budget; what it leaves goes to the staged solver
``_SUPPORT_RIDGE``        1e-13  its ridge is this over the residual (at most the cap; see there)
``_SUPPORT_RIDGE_CAP``    1e-3   (reached at a residual of 1e-10)
``_SUPPORT_SLACK``        1e-13  its Newton system counts entries of Y above -1e-13 as support
``_COMPACT_BATCH``        32     from this batch on, its converged elements are set aside (once a fifth)
========================  =====  ==============================================================
"""

from __future__ import annotations

import numpy as np
import torch

from ._compiled import enabled_for
from ._kernels import check_solver_arguments, ones_matrix, set_aside, sparsemax_threshold
from .sinkhorn import (
    _FIRST_SPREAD,
    _NEWTON_RIDGE,
    _RIDGE_FLOOR,
    _SCALE_FACTOR,
    _VJP_RIDGE,
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
# The full-dual Newton path (see _birkhoff_newton): for spreads of Z up to _NEWTON_SPREAD; elements it
# leaves unconverged go to the staged solver.
_NEWTON_SPREAD = 32.0
_COMPACT_BATCH = 32
# Its ridge, min(_SUPPORT_RIDGE / residual, _SUPPORT_RIDGE_CAP) (1e-13 at a residual of 1), plus
# _NEWTON_RIDGE times the squared residual where the residual exceeds 1 (Levenberg-Marquardt damping far from
# the solution: without it elements of tied, integer-valued Z stall there).  Near the solution it is
# inversely proportional to the residual, so that a full step from a residual of 1e-2 on the right support
# lands within 1e-13 / (the Laplacian's smallest nonzero eigenvalue) of the solution (a ridge r leaves an
# error of about r times the step there), while a rounding-sized gradient along a null direction of the
# Laplacian (a disconnected support) becomes a step of gradient / ridge, at most 1e-16 / 1e-13 times the
# residual, small beside the step itself.
_SUPPORT_RIDGE = 1e-13
_SUPPORT_RIDGE_CAP = 1e-3
# The Newton system's support: the entries of Y above -_SUPPORT_SLACK.  Where the solution has entries of Y
# at 0 (to rounding) that join two otherwise disconnected blocks of the support, those entries, at +-1e-14,
# would leave and join the support at alternate steps, and the residual then falls only linearly; counted in,
# the support stays put (step counts in docs/benchmarks.md, "Permutation solvers", fifth pass).
_SUPPORT_SLACK = 1e-13
_MERIT_SWITCH = 1e-5  # below this residual its phi test is blind: a full step must not increase the residual
_EXACT_SEARCH_N = 16  # up to this n its failed full steps take the exact line search, beyond it backtracking
_NEWTON_MAX_ITER = 30  # its step budget (the staged solver gets max_iter for what is left)


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


def _evaluate(Y):
    """X = max(Y, 0), the gradient (1 - r, 1 - c) of phi and its max norm, for Y (B, n, n).

    r, c the row and column sums of X, shaped (B, n, 1) and (B, 1, n).
    """
    X = Y.clamp_min(0.0)
    gu, gv = torch.rsub(X.sum(-1, keepdim=True), 1.0), torch.rsub(X.sum(-2, keepdim=True), 1.0)
    # (one amax over both, side by side: vector_norm(ord=inf) is 3x slower at batch 128, and so are
    # broadcasts of (B, n, 1) against (B, 1, n))
    err = torch.cat((gu.mT, gv), -1).abs().amax((-2, -1))
    return X, gu, gv, err


def _square_norm(X):
    """|X|^2 per element, (B,): twice the quadratic part of phi."""
    return (X * X).sum((-2, -1))


def _exact_step(Y, du, dv):
    """The step length t in [0, 1] minimising phi along (du, dv) from Y = Z - u 1^T - 1 v^T; (m, 1, 1).

    phi(t) = 1/2 |max(Y - t D, 0)|^2 + t sum(du + dv) + const, D = du 1^T + 1 dv^T, is convex
    and piecewise quadratic: phi'(t) = A + B t between the breakpoints t = Y_ij / D_ij, where
    entries leave (D > 0) or enter (D < 0) the support.  Every entry is counted from
    t = -infinity, where exactly those with D > 0 are in the support: there
    A = sum(du + dv) - sum_{D > 0} D Y and B = sum_{D > 0} D^2, and at its breakpoint an entry
    changes A by |D| Y and B by -|D| D (entries with D = 0 change neither, whatever their
    breakpoint).  The breakpoints are sorted (n^2 per element), A and B accumulated across
    them, and the root of phi' (nondecreasing) taken on the piece after the breakpoints where
    phi' < 0 (phi' is continuous, so its value at a breakpoint is that of the piece after it),
    then clipped to [0, 1] (phi'(0) < 0 along a descent direction; B = 0 on that piece: the
    end of the range on the side phi' points to).  Counting from -infinity instead of from
    t = 0 needs no support masks: about 25 torch calls, one sort and a few passes over
    (m, n^2), no trial evaluations.
    """
    n = Y.shape[-1]
    D = (du + dv).flatten(1)
    Yf = Y.flatten(1)
    leaving = D.clamp_min(0.0)  # D where the entry is in the support at t = -infinity
    A0 = torch.addcmul(D * (1.0 / n), leaving, Yf, value=-1.0).sum(-1)  # (sum of D = n sum(du + dv))
    B0 = (leaving * D).sum(-1)
    breaks, order = (Yf / D).sort(-1)
    jumps = torch.stack((Yf, D.neg()), 1).mul_(D.abs().unsqueeze(1))  # (m, 2, n^2): of A, of B
    AB = torch.cat((torch.stack((A0, B0), 1).unsqueeze(-1), jumps.gather(-1, order.unsqueeze(1).expand_as(jumps))), -1)
    AB = AB.cumsum_(-1)  # (m, 2, n^2 + 1): A and B after k breakpoints
    piece = (torch.addcmul(AB[:, 0, 1:], AB[:, 1, 1:], breaks) < 0).sum(-1)  # the root lies after these
    A, B = AB.gather(-1, piece.view(-1, 1, 1).expand(-1, 2, 1)).unbind(1)
    return torch.nan_to_num_((A / B).neg_(), nan=1.0, posinf=1.0, neginf=0.0).clamp_(0.0, 1.0).unsqueeze(-1)


def _birkhoff_newton(Z, tol, max_iter):
    """Semi-smooth Newton on the full dual of the projection of Z (B, n, n); returns (X, err, steps).

    X = max(Y, 0) with Y = Z - u 1^T - 1 v^T minimises phi(u, v) = 1/2 |X|^2 + sum u + sum v,
    convex and piecewise quadratic with a continuous gradient (1 - r, 1 - c) (r, c the row and
    column sums of X) and generalised Hessian [[diag(r_S), S], [S^T, diag(c_S)]], S = {X > 0}
    the support and r_S, c_S its row and column counts (the steps take S = {Y > -_SUPPORT_SLACK},
    also an element of the generalised Hessian up to rounding, which keeps rounding-level
    entries from leaving and joining the support at alternate steps).  Eliminating du leaves the grounded
    Laplacian system of :func:`_birkhoff_stage` for dv (an n x n Cholesky solve); du then
    follows row by row.  On the right support phi is quadratic and one step is exact (finite
    termination).  The state is Y itself (u and v are never needed apart), updated by
    Y -= du 1^T + 1 dv^T.

    Start: the projection of Z onto the affine hull (row and column sums 1, signs free),
    Y = Z minus its row and column means plus its mean and 1 / n: every row and column
    of Y sums to 1, so every row has support, and no sorting is needed.

    A full step is taken when its largest residual does not grow (the common case: two calls,
    no values of phi), else when it decreases phi (up to rounding, computed as a difference of
    |X|^2 so that its rounding is that of |X|^2, not of |u|), except below residual
    _MERIT_SWITCH, where that test is blind.  (A full step from anywhere on a piece of phi lands
    on the minimiser of that piece's quadratic, so full steps that decrease phi visit each piece
    at most once; steps taken for a smaller residual carry no such guarantee, and the step
    budget with the staged solver behind it is the backstop.)  The elements whose full step
    fails both tests take, for n <= _EXACT_SEARCH_N, the exact minimiser of phi along
    the direction (see :func:`_exact_step`: far from the solution the Newton direction on a
    wrong support can be thousands of times too long; below batch _COMPACT_BATCH the
    search runs on the whole batch, t = 1 kept where the full step passed, which costs fewer
    calls than gathering the failed elements), and for larger n (where sorting the n^2
    breakpoints costs more than a few trials) t quartered per element (at most
    _BIRKHOFF_HALVINGS trials).  Converged elements stay put (their rounding-sized gradients
    may point along directions where the Laplacian is singular but for the ridge), and from
    batch _COMPACT_BATCH on they are set aside once they are at least a fifth of the batch (from
    the start most elements need about as many steps, so the bulk converges together).
    ``tol`` (B,): per element.  err (B,) is the largest |row or column sum - 1|; elements
    with err > tol after ``max_iter`` steps are left to the caller.  Cost per step: one
    batched n x n product, Cholesky solve and about 20 elementwise passes over (B, n, n);
    about 35 torch calls and two host synchronisations when every full step passes (the
    cost at small batches).
    """
    n = Z.shape[-1]
    row_means = Z.mean(-1, keepdim=True)
    Y = (Z - row_means).sub_(Z.mean(-2, keepdim=True)).add_(row_means.mean(-2, keepdim=True).add_(1.0 / n))
    X, gu, gv, err = _evaluate(Y)
    # twice the rounding of a change of phi, computed as below
    slack2 = 128 * n * n * _EPS64 * (0.5 * _square_norm(X) + 1.0)
    ones = ones_matrix(n, Z.dtype, Z.device)
    one = ones[:1, :1]
    X_out, err_out, index = None, None, None  # the whole batch, once a part has been set aside
    for step in range(max_iter + 1):
        pending = err > tol
        count = int(pending.sum())
        if count == 0 or step == max_iter:
            break
        batch = Y.shape[0]  # (len() of a tensor is a Python-level call)
        if count < batch:
            if batch >= _COMPACT_BATCH and 5 * count <= 4 * batch:
                # set converged elements aside once they are a fifth: the stragglers' steps are cheaper alone
                X_out, err_out, index = set_aside(index, X, err, X_out, err_out)
                keep = pending.nonzero().squeeze(-1)
                index, Y, X, gu, gv, err, tol, slack2 = (
                    T.index_select(0, keep) for T in (index, Y, X, gu, gv, err, tol, slack2)
                )
                batch = count
            else:
                moving = pending.to(Z.dtype)[:, None, None]
                gu, gv = gu * moving, gv * moving
        # the support indicator, entries within _SUPPORT_SLACK below 0 included (see there)
        S = torch.gt(Y, -_SUPPORT_SLACK, out=torch.empty_like(Y))  # (as 0/1 in Y's dtype: fewer calls than .to)
        counts = S.sum(-1, keepdim=True).clamp_min_(1.0)  # r_S, (B, n, 1); a row without support counts one
        S_rows_t = S.div(counts).mT
        # the grounded Laplacian 1 1^T + diag(c_S + ridge) - S^T diag(1 / r_S) S, the ridge as described at
        # _SUPPORT_RIDGE; the system is solved for -dv, and D = du 1^T + 1 dv^T is formed negated, E = -D,
        # which saves a negation
        laplacian = torch.baddbmm(ones, S_rows_t, S, alpha=-1.0)
        e = err.clamp_min(_SUPPORT_RIDGE / _SUPPORT_RIDGE_CAP).unsqueeze(-1)
        far = e * (e > 1.0)
        diagonal = S.sum(-2).addcdiv_(one, e, value=_SUPPORT_RIDGE).addcmul_(far, far, value=_NEWTON_RIDGE)
        laplacian.diagonal(dim1=-2, dim2=-1).add_(diagonal)
        L = torch.linalg.cholesky_ex(laplacian)[0]
        dv = torch.cholesky_solve(torch.baddbmm(gv.mT, S_rows_t, gu, alpha=-1.0), L)
        du = torch.baddbmm(gu, S, dv, alpha=-1.0).div_(counts)  # -du and -dv, (B, n, 1) both
        E = du + dv.mT
        trial = Y + E
        trial_eval = _evaluate(trial)
        # twice the change of phi, |X(1)|^2 - |X|^2 + 2 (sum du + sum dv), and sum D = n (sum du + sum dv)
        ok = trial_eval[3] <= err
        if bool(ok.all()):  # the common case: every element takes its full step
            Y, (X, gu, gv, err) = trial, trial_eval
            continue
        change = torch.sub(_square_norm(trial_eval[0]), _square_norm(X)).sub_(E.sum((-2, -1)), alpha=2.0 / n)
        ok = ok | ((change <= slack2) & (err >= _MERIT_SWITCH))
        if bool(ok.all()):
            Y, (X, gu, gv, err) = trial, trial_eval
            continue
        du, dv = du.neg_(), dv.mT.neg_()  # the direction itself, (B, n, 1) and (B, 1, n)
        D = E.neg_()
        if n <= _EXACT_SEARCH_N and batch < _COMPACT_BATCH:
            Y = Y - torch.where(ok.view(-1, 1, 1), 1.0, _exact_step(Y, du, dv)) * D
            X, gu, gv, err = _evaluate(Y)
            continue
        back = (~ok).nonzero().squeeze(-1)  # the elements whose full step failed search alone, a smaller batch
        if n <= _EXACT_SEARCH_N:
            # the exact minimiser of phi along the direction (phi is piecewise quadratic in the step length),
            # scattered into step lengths of 1 for the rest; then one evaluation of the whole batch (fewer
            # calls than selecting the accepted trials and scattering the searched elements' state)
            searched = _exact_step(Y.index_select(0, back), du.index_select(0, back), dv.index_select(0, back))
            t = torch.ones_like(err).view(-1, 1, 1).index_copy_(0, back, searched)
            Y = Y - t * D
            X, gu, gv, err = _evaluate(Y)
            continue
        state = [Y, X, gu, gv, err]
        for i, T in enumerate((trial,) + trial_eval):
            state[i] = torch.where(ok.view((-1,) + (1,) * (T.dim() - 1)), T, state[i])
        Yb, Db = Y.index_select(0, back), D.index_select(0, back)
        # t quartered per trial (sorting n^2 breakpoints costs more than a few trials at this size)
        quadb, errb, slackb = (T.index_select(0, back) for T in (_square_norm(X), err, slack2))
        sumb = Db.sum((-2, -1)) * (2.0 / n)
        t = 1.0
        for _ in range(_BIRKHOFF_HALVINGS):
            t = 0.25 * t
            trial = Yb - t * Db
            trial_eval = _evaluate(trial)
            decrease = _square_norm(trial_eval[0]) - quadb + t * sumb <= slackb
            ok = (trial_eval[3] <= errb) | (decrease & (errb >= _MERIT_SWITCH))
            taken = back[ok]
            for T, value in zip(state, (trial,) + trial_eval):
                T.index_copy_(0, taken, value[ok])
            if bool(ok.all()):
                break
            keep = (~ok).nonzero().squeeze(-1)  # after the last trial, elements without an accepted step stay put
            back, Yb, Db, quadb, errb, slackb, sumb = (
                T.index_select(0, keep) for T in (back, Yb, Db, quadb, errb, slackb, sumb)
            )
        Y, X, gu, gv, err = state
    if index is not None:
        X, err = X_out.index_copy_(0, index, X), err_out.index_copy_(0, index, err)
    return X, err, step


def _birkhoff_solve(Z: torch.Tensor, tol: float, max_iter: int):
    """The projection of Z float64 (B, n, n) onto the Birkhoff polytope; returns (X, unconverged, violation).

    Batches whose spread max(Z) - min(Z) is at most _NEWTON_SPREAD in every element (tau ~ 1)
    take :func:`_birkhoff_newton`; the elements it leaves unconverged, and all other
    batches, :func:`_birkhoff_staged`.  The tolerance on the marginals is ``tol`` plus the
    rounding of X = Z - alpha - beta, 16 n eps max|Z|, per element.  CPU tensors take
    :func:`_compiled_solve` instead (see there).
    """
    if enabled_for(Z):
        X, _, unconverged, violation, _ = _compiled_solve(Z, tol, max_iter)
        return X, unconverged, violation
    n = Z.shape[-1]
    low, high = torch.aminmax(Z)
    if float(high) - float(low) > _NEWTON_SPREAD and bool((Z.amax((-2, -1)) - Z.amin((-2, -1)) > _NEWTON_SPREAD).any()):
        return _birkhoff_staged(Z, tol, max_iter)
    element_tol = tol + 16 * n * _EPS64 * Z.abs().amax((-2, -1))
    budget = min(max_iter, _NEWTON_MAX_ITER)
    X, err, steps = _birkhoff_newton(Z, element_tol, budget)
    if steps < budget:  # it stopped because every element had converged
        return X, 0, float(err.max())
    left = err > element_tol
    if not bool(left.any()):
        return X, 0, float(err.max())
    # the few elements it did not finish: the staged solver from the start
    keep = left.nonzero().squeeze(-1)
    X_left, unconverged, violation = _birkhoff_staged(Z[keep], tol, max_iter)
    X[keep] = X_left
    err[keep] = 0.0
    return X, unconverged, max(violation, float(err.max()))


def _compiled_solve(Z: torch.Tensor, tol: float, max_iter: int):
    """:func:`_birkhoff_solve` on the CPU by the numba kernel; returns (X, S, unconverged, violation, steps).

    S is X's support, 0/1 in X's dtype (what the backward needs); steps the kernel's Newton steps
    (its slowest element's, all stages).  The kernel
    (:func:`polytopes._compiled_birkhoff.newton_batch`) runs :func:`_birkhoff_newton`'s
    iteration element by element, one compiled loop over the batch, with the same constants,
    tolerance and step budget min(max_iter, _NEWTON_MAX_ITER), on the elements whose own spread
    max(Z) - min(Z) is at most _NEWTON_SPREAD (the torch path decides for the whole batch), with
    the exact line step at every n (the torch path quarters trial steps beyond n =
    _EXACT_SEARCH_N).  The elements of larger spread take the same iteration by continuation, the
    stages of :func:`_birkhoff_staged` (Z / s for s from spread / _FIRST_SPREAD down to 1 by
    _SCALE_FACTOR, the stages before the last to _BIRKHOFF_STAGE_TOL), max_iter steps over all
    stages.  The elements it leaves (tolerance not reached, a failed factorisation) take
    :func:`_birkhoff_staged` in torch from the start with max_iter steps, as the torch path's
    Newton leftovers do, and its count of unconverged elements is the warning's.  Rule: CPU
    tensors always take it; it was faster than the torch path at every n (4 to 50), batch (1 to
    256) and spread (10 to 1e7) measured.
    """
    from . import _compiled_birkhoff as kernels

    if Z.dtype != torch.float64:
        Z = Z.to(torch.float64)
    Z = Z.detach().resolve_neg().contiguous()  # (numpy() refuses the negative bit, e.g. from torch._neg_view)
    batch = Z.shape[0]
    X = torch.empty_like(Z)
    err, steps, status = np.empty(batch), np.empty(batch, np.int64), np.empty(batch, np.int64)
    params = np.array(  # (in the order of the kernel module's indices)
        (
            _SUPPORT_SLACK,
            _SUPPORT_RIDGE,
            _SUPPORT_RIDGE_CAP,
            _NEWTON_RIDGE,
            _MERIT_SWITCH,
            _NEWTON_SPREAD,
            _FIRST_SPREAD,
            _SCALE_FACTOR,
            _BIRKHOFF_STAGE_TOL,
        ),
        dtype=np.float64,
    )
    budget = min(max_iter, _NEWTON_MAX_ITER)
    left, steps_taken, violation = kernels.newton_batch(
        Z.numpy(), tol, budget, max_iter, params, X.numpy(), err, steps, status
    )
    unconverged = 0
    if left:
        # the elements it left: the staged solver from the start
        keep = torch.from_numpy(status.nonzero()[0])
        X_left, unconverged, staged_violation = _birkhoff_staged(Z.index_select(0, keep), tol, max_iter)
        X.index_copy_(0, keep, X_left)
        violation = max(violation, staged_violation)
    S = torch.gt(X, 0.0, out=torch.empty_like(X))
    return X, S, unconverged, violation, steps_taken


def _compiled_vjp(S: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """:func:`_support_vjp` on the CPU by the numba kernel (:func:`polytopes._compiled_birkhoff.support_vjp_batch`).

    Elements whose factorisation fails take :func:`sinkhorn_vjp`, as in :func:`_support_vjp`.
    """
    from . import _compiled_birkhoff as kernels

    if G.dtype != S.dtype:
        G = G.to(S.dtype)
    G = G.resolve_neg().contiguous()  # (numpy() refuses the negative bit)
    out = torch.empty_like(S)
    failed = np.empty(S.shape[0], np.int64)
    if kernels.support_vjp_batch(S.numpy(), G.numpy(), _VJP_RIDGE, out.numpy(), failed):
        keep = torch.from_numpy(failed.nonzero()[0])
        out.index_copy_(0, keep, sinkhorn_vjp(S.index_select(0, keep), G.index_select(0, keep)))
    return out


# The forward for callers outside autograd; the autograd function calls _birkhoff_solve, whose forward
# already runs without grad (a no_grad context costs a few microseconds per call).
_birkhoff_forward = torch.no_grad()(_birkhoff_solve)


def _birkhoff_staged(Z: torch.Tensor, tol: float, max_iter: int):
    """The projection of Z float64 (B, n, n) by staged reduced-dual Newton; returns (X, unconverged, violation).

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
        if enabled_for(Z):
            X, S, report["unconverged"], report["violation"], _ = _compiled_solve(Z, tol, max_iter)
            ctx.save_for_backward(S)
            return X
        X, report["unconverged"], report["violation"] = _birkhoff_solve(Z, tol, max_iter)
        ctx.save_for_backward(torch.gt(X, 0.0, out=torch.empty_like(X)))  # the support, 0/1 (cheaper than .to)
        return X

    @staticmethod
    def backward(ctx, G):
        # X = max(Z - alpha - beta, 0) is piecewise linear: on the support S its Jacobian is the
        # orthogonal projection onto {D supported on S with zero row and column sums}, which is the
        # Sinkhorn adjoint with X replaced by the indicator of S
        (support,) = ctx.saved_tensors
        if enabled_for(G) and not torch.is_grad_enabled():  # (double backward: the torch route, differentiable)
            return _compiled_vjp(support, G), None, None, None
        return _support_vjp(support, G), None, None, None


def _support_vjp(S: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """The orthogonal projection of G (B, n, n) onto {D supported on S, zero row and column sums}.

    S (B, n, n) is the 0/1 support of a projection X (every row and column of X sums to 1, so
    none is empty).  The projection is S * (G - a 1^T - 1 b^T) with
    a = (row sums of S * G - S b) / r and b the solution of the grounded Laplacian system
    (1 1^T + diag(c + ridge) - S^T diag(1 / r) S) b = column sums of S * G - S^T (row sums of
    S * G / r), r and c the row and column counts of S: :func:`sinkhorn_vjp` with X replaced by
    S, in fewer calls (no products with X, the right side by one ``baddbmm``, the all-ones
    grounding cached).  Where the factorisation fails (rounding on a disconnected support made
    the matrix indefinite) it is :func:`sinkhorn_vjp`, which refactorises with a larger ridge.
    Differentiable in G (double backward).  Cost: one n x n product and Cholesky solve, O(B n^3).
    """
    counts = S.sum(-1, keepdim=True).clamp_min_(1.0)  # r, (B, n, 1)
    SG = S * G
    a0 = SG.sum(-1, keepdim=True).div(counts)  # (B, n, 1)
    S_rows_t = (S / counts).mT
    rhs = torch.baddbmm(SG.sum(-2, keepdim=True).mT, S.mT, a0, alpha=-1.0)  # (B, n, 1)
    laplacian = torch.baddbmm(ones_matrix(S.shape[-1], S.dtype, S.device), S_rows_t, S, alpha=-1.0)
    laplacian.diagonal(dim1=-2, dim2=-1).add_(S.sum(-2).add_(_VJP_RIDGE))
    L, info = torch.linalg.cholesky_ex(laplacian)
    if bool(info.any()):
        return sinkhorn_vjp(S, G)
    b = torch.cholesky_solve(rhs, L)  # (B, n, 1)
    return S * (G - torch.baddbmm(a0, S_rows_t.mT, b, alpha=-1.0) - b.mT)


def birkhoff_projection(Z: torch.Tensor, tol: float = BIRKHOFF_TOL, max_iter: int = BIRKHOFF_MAX_ITER) -> torch.Tensor:
    """argmin_{x in Birkhoff} ||x - Z||^2: the Euclidean projection onto the doubly stochastic matrices.

    Z: (..., n, n) -> X (..., n, n), Z's dtype and device, X = max(Z - a 1^T - 1 b^T, 0)
    with rows summing to 1 to rounding and columns to within ``tol`` (default 1e-12)
    plus the rounding of X, 16 n eps max|Z|.  It is the ``euclidean`` relaxation of
    :class:`Permutation` (Z = U / tau): sparse, with exact zeros.

    Forward: when max(Z) - min(Z) <= 32 (tau ~ 1), semi-smooth Newton on both dual
    potentials from the projection onto the affine hull (see :func:`_birkhoff_newton`),
    2-9 steps per element at n = 4-10 and 6-25 at n = 50, each an n x n Cholesky solve and
    elementwise passes (no sorting), exact once the support is found;
    otherwise, and for the rare elements it leaves, semi-smooth Newton on the dual in b
    with the row potentials a exact by sorting (see :func:`_birkhoff_stage`), with
    continuation in the scale of Z; 10-50 steps at spreads up to 1e6, each an n x n
    Cholesky solve and a few row sorts (O(n^3 + n^2 log n)).  Warns (RuntimeWarning) if
    ``max_iter`` steps do not reach ``tol``.

    Backward: the exact Jacobian of the piecewise linear map, the orthogonal projection
    onto the matrices supported on X's support with zero row and column sums (one
    n x n Cholesky solve).

    CPU tensors take a compiled kernel of the same iteration (see :func:`_compiled_solve`,
    which also solves large spreads by it, with continuation) and of the backward.

    Precision: float64 internally whatever the input (the potentials reach |Z|, 1e6
    at tau = 1e-3 with |theta| = 1e3, and X is their difference with Z).
    """
    check_solver_arguments(Z, tol, max_iter)
    return _birkhoff(Z, float(tol), max_iter, stacklevel=3)


def _birkhoff(Z, tol=BIRKHOFF_TOL, max_iter=BIRKHOFF_MAX_ITER, stacklevel=2):
    """:func:`birkhoff_projection` without argument checks (the registered solver's inputs are checked by sstcvx)."""
    return run_batched(_BirkhoffProjection, "birkhoff_projection", Z, tol, max_iter, stacklevel)
