"""The Birkhoff polytope: conv of the n x n permutation matrices, event shape (n, n).

x[i, j] = 1 iff item i takes position j; P = {x >= 0, x 1 = 1, x^T 1 = 1}
(Birkhoff-von Neumann).  Specialized solvers (Z = U / tau, shape (B, n, n)):

* hard argmax: the Hungarian method (:func:`hungarian`), on the CPU;
* ``entropy`` (f = sum x log x): the Sinkhorn fixed point (:func:`sinkhorn`),
  solved in the log domain to a stated tolerance, with an implicit backward;
* ``euclidean`` (f = ||x||^2 / 2): the projection onto the Birkhoff polytope
  (:func:`birkhoff_projection`), by semi-smooth Newton on its dual, with the exact
  (piecewise linear) backward.

References: Paulus et al., "Gradient estimation with stochastic softmax tricks",
NeurIPS 2020; Mena et al., "Learning latent permutations with Gumbel-Sinkhorn
networks", ICLR 2018 (the relaxation); Cuturi, "Sinkhorn distances", NeurIPS
2013 (the entropic problem and its fixed point).
"""

from __future__ import annotations

import itertools
import math
import warnings

import cvxpy as cp
import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from sstcvx.families import Family, register_family
from sstcvx.recognition import Match, row_space_projector
from sstcvx.polytope import Polytope
from sstcvx.registry import register_argmax, register_relaxation

from ._validation import check_int
from .simplex import sparsemax_threshold

# _enumerate_vertices lists the n! permutation matrices up to this n (720 at n = 6).
MAX_ENUMERATE_N = 6

# Sinkhorn defaults: largest |row or column sum - 1| accepted, and the Newton step budget.
SINKHORN_TOL = 1e-12
SINKHORN_MAX_ITER = 500

# Continuation in the temperature: each stage solves Z / s with s decreasing by _SCALE_FACTOR
# down to 1; the first stage has max(Z) - min(Z) <= _FIRST_SPREAD after scaling.
_FIRST_SPREAD = 32.0
_SCALE_FACTOR = 8.0
_STAGE_TOL = 1e-2
# Ridges on the grounded Laplacian (singular when entries of X underflow); its entries are O(1).
# Newton's is relative to the residual (see _newton); the VJP's changes dL/dZ by at most the
# coupling mass it neglects (see _sinkhorn_vjp).
_NEWTON_RIDGE = 1e-3  # times max |column sum - 1|
_RIDGE_FLOOR = 1e-13
_VJP_RIDGE = 1e-12
# Newton: largest change of a potential per step, and backtracking halvings before a Sinkhorn sweep.
_MAX_STEP = 8.0
_MAX_HALVINGS = 30
# Sinkhorn sweeps (column then row normalisation) before Newton's steps at each stage, and when
# max(Z) - min(Z) <= _NARROW_SPREAD (one stage, cheaper sweeps).
_SWEEPS = 2
_NARROW_SPREAD = 64.0
_NARROW_SWEEPS = 6
# Newton steps with max |d| <= _SAFE_STEP are taken in full, without a line search (see _newton).
_SAFE_STEP = 0.3
# Rounding allowance (per row) of the Armijo test, whose terms are O(1).
_ARMIJO_SLACK = 1e-14
# Entries of X below exp(_LOG_FLOOR) ~ 1e-150 are set to 0 (see _exp).
_LOG_FLOOR = -345.0


def _check_square(T, name: str) -> None:
    if not isinstance(T, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape (..., n, n), got {type(T).__name__}")
    if not T.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {T.dtype}")
    if T.dim() < 2 or T.shape[-1] != T.shape[-2] or T.shape[-1] < 2:
        raise ValueError(f"{name}: expected shape (..., n, n) with n >= 2, got {tuple(T.shape)}")


class Permutation(Polytope):
    """The Birkhoff polytope {x in R^(n x n) : x >= 0, rows and columns sum to 1}.

    ``Permutation(n)``, n >= 2; event shape ``(n, n)``, x[i, j] = 1 iff item i
    takes position j.  Its vertices are the n! permutation matrices (listed
    for n <= ``MAX_ENUMERATE_N``).
    """

    def __init__(self, n: int):
        n = check_int(n, "n", 2, "a permutation of at least two items")
        super().__init__((n, n), name=f"Permutation(n={n})")
        self.n = n

    def _declare(self):
        x = cp.Variable((self.n, self.n))
        return x, [x >= 0, cp.sum(x, axis=1) == 1, cp.sum(x, axis=0) == 1]

    def _enumerate_vertices(self):
        if self.n > MAX_ENUMERATE_N:
            return None
        perms = torch.tensor(list(itertools.permutations(range(self.n))), dtype=torch.long)
        eye = torch.eye(self.n, dtype=torch.float64)
        return eye[perms]  # (n!, n, n): row i of vertex k is e_{perm_k[i]}


# ---------------------------------------------------------------------------------------------
# Hard argmax
# ---------------------------------------------------------------------------------------------


def hungarian(U: torch.Tensor) -> torch.Tensor:
    """The permutation matrix maximising <U, x>: argmax over the Birkhoff polytope's vertices.

    U: (..., n, n) -> (..., n, n) permutation matrices, U's dtype and device.
    Solved by the Hungarian method (SciPy's ``linear_sum_assignment``, a
    shortest augmenting path variant) in float64 on the CPU, one batch element
    at a time: O(n^3) each, plus a device round trip when U is on a GPU.
    Ties (probability zero under continuous noise) are broken by SciPy.
    """
    _check_square(U, "U")
    n = U.shape[-1]
    flat = U.detach().reshape(-1, n, n).to("cpu", torch.float64).numpy()
    if not np.isfinite(flat).all():
        raise ValueError("U: expected finite values")
    cols = np.empty((flat.shape[0], n), dtype=np.int64)
    for k in range(flat.shape[0]):
        cols[k] = linear_sum_assignment(flat[k], maximize=True)[1]
    X = torch.zeros(flat.shape, dtype=U.dtype)
    X.scatter_(-1, torch.from_numpy(cols).unsqueeze(-1), 1.0)
    return X.reshape(U.shape).to(U.device)


# ---------------------------------------------------------------------------------------------
# Entropy relaxation: Sinkhorn
# ---------------------------------------------------------------------------------------------


def _grounded_laplacian(X: torch.Tensor, r, ridge) -> torch.Tensor:
    """S + 1 1^T + ridge I with S = diag(c) - X^T diag(1/r) X, c the column sums: (B, n, n).

    ``r`` are the row sums of X, or None when they are 1.  S is the Laplacian
    of the graph on positions with weights W_jk = sum_i X_ij X_ik / r_i, so
    its diagonal is formed as the sum of the off-diagonal weights: no
    cancellation when X is close to a permutation.  S 1 = 0; adding 1 1^T
    makes it positive definite when the graph is connected, and S x = y with
    1^T y = 0 then has the solution with 1^T x = 0 (no row or column needs to
    be dropped).  The ridge keeps it definite when weights underflow to 0.
    """
    W = (X if r is None else X / r.unsqueeze(-1)).transpose(-1, -2) @ X
    off_diagonal_sums = W.sum(-1) - torch.diagonal(W, dim1=-2, dim2=-1)
    return torch.diagonal_scatter(1.0 - W, off_diagonal_sums + (1.0 + ridge), dim1=-2, dim2=-1)


def _solve_spd(S: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Batched S^{-1} rhs for symmetric positive (semi)definite S by Cholesky.

    Elements whose factorisation fails (rounding made S indefinite) are
    refactorised with a larger ridge, 1e-8 times (1 + the largest diagonal entry).
    """
    L, info = torch.linalg.cholesky_ex(S)
    bad = info > 0
    if bool(bad.any()):
        diag = torch.diagonal(S, dim1=-2, dim2=-1)
        bump = 1e-8 * (1.0 + diag.abs().amax(-1)) * bad
        L, _ = torch.linalg.cholesky_ex(S + torch.diag_embed(bump.unsqueeze(-1).expand_as(diag)))
    return torch.cholesky_solve(rhs.unsqueeze(-1), L).squeeze(-1)


def _logsumexp(W: torch.Tensor, dim: int) -> torch.Tensor:
    """log sum exp(W) along dim (kept), terms below exp(_LOG_FLOOR) times the largest counted as that.

    torch.logsumexp on arguments below about -708 (W reaches -1e6 here) is
    10-100x slower on the CPU; the clamp changes the result by at most n * 1e-150.
    """
    m = W.amax(dim=dim, keepdim=True)
    return m + torch.logsumexp((W - m).clamp_min(_LOG_FLOOR), dim=dim, keepdim=True)


def _normalise_rows(W: torch.Tensor) -> torch.Tensor:
    return W - _logsumexp(W, -1)


def _exp(W: torch.Tensor) -> torch.Tensor:
    """exp(W) with entries below exp(_LOG_FLOOR) set to 0.

    Changes sums by at most n * 1e-150, and keeps every product of two
    entries a normal float64: subnormal operands and results make exp and bmm
    on the CPU 10-100x slower.
    """
    return torch.where(W >= _LOG_FLOOR, torch.exp(W.clamp_min(_LOG_FLOOR)), 0.0)


def _exp_floored(W: torch.Tensor) -> torch.Tensor:
    """exp(max(W, _LOG_FLOOR)): entries below 1e-150 read as 1e-150 (cheaper than :func:`_exp`; see there)."""
    return torch.exp(W.clamp_min(_LOG_FLOOR))


@torch.no_grad()
def _sinkhorn_forward(Z: torch.Tensor, tol: float, max_iter: int):
    """X = exp(Z + a 1^T + 1 b^T) doubly stochastic, Z float64 (B, n, n).

    Returns (X, number of elements short of ``tol``, largest column violation).

    The state is W = log X = Z + a 1^T + 1 b^T with the rows normalised; the
    potentials are absorbed into W after every step instead of being kept
    apart, so that entries that matter stay O(1) and rounding is relative to
    them, not to |Z| (which reaches 1e6).  Newton's method on the dual (see
    :func:`_newton`) drives the column sums to 1.  For large spreads of Z
    (small tau) the problem is nearly a linear program and both plain
    Sinkhorn and Newton from a cold start crawl, so it follows the path Z / s
    for s decreasing geometrically to 1 (epsilon-scaling): the solution at s
    scaled by s / s_next (potentials included) warm-starts the next stage.
    """
    B, n, _ = Z.shape
    spread = Z.amax(dim=(-2, -1)) - Z.amin(dim=(-2, -1))
    if bool((spread <= _NARROW_SPREAD).all()):  # the common case (tau ~ 1): one stage, no floors
        W, steps, err = _newton(Z - torch.logsumexp(Z, dim=-1, keepdim=True), tol, max_iter, narrow=True)
        return torch.exp(W), int((err > tol).sum()), float(err.max())
    s = (spread / _FIRST_SPREAD).clamp_min(1.0)
    W = _normalise_rows(Z / s[:, None, None])
    steps = 0
    while True:
        final = s == 1.0
        stage_tol = torch.where(final, torch.full_like(s, tol), torch.full_like(s, max(_STAGE_TOL, tol)))
        W, used, err = _newton(W, stage_tol, max_iter - steps)
        steps += used
        if bool(final.all()) or steps >= max_iter:
            break
        s_next = (s / _SCALE_FACTOR).clamp_min(1.0)
        W = _normalise_rows(W * (s / s_next)[:, None, None])
        s = s_next
    unconverged = (err > tol) | ~final
    return _exp(W), int(unconverged.sum()), float(err.max())


def _newton(W, tol, budget, narrow=False):
    """Damped Newton for the column sums of X = exp(W), rows kept normalised; returns (W, steps, err).

    Minimises the reduced dual psi(b) = sum_i logsumexp_j(W_ij + b_j) - sum_j b_j
    (gradient c - 1, c the column sums; Hessian the Laplacian
    diag(c) - X^T X, singular along b + const) until max |c - 1| <= tol per
    element, after a few Sinkhorn sweeps (cheap, and they save Newton steps).
    Each step solves the grounded Laplacian system for the direction d.  A
    step with max |d| <= _SAFE_STEP is taken in full: psi is a sum of
    log-sum-exps, whose third derivative is bounded by 2 max |d| times the
    second, so such a Newton step decreases psi.  Otherwise max |t d| is
    capped at _MAX_STEP (a trust region: psi is far from quadratic when X has
    tiny entries) and t backtracks until the Armijo condition holds;
    psi(b + t d) - psi(b) is the sum of the row log-normalisers of W + t d,
    which renormalising the rows computes anyway, O(1) numbers, so the test
    is accurate to rounding of O(1), not of |Z|.  An element with no Armijo
    step in _MAX_HALVINGS takes a Sinkhorn sweep.

    ``narrow``: every entry of W is within ~200 of its row's and column's
    maximum, so plain logsumexp and exp are fast and no floor is needed.
    """
    n = W.shape[-1]
    slack = _ARMIJO_SLACK * n
    if narrow:
        lse, expo, sweeps = (lambda T, dim: torch.logsumexp(T, dim=dim, keepdim=True)), torch.exp, _NARROW_SWEEPS
    else:
        lse, expo, sweeps = _logsumexp, _exp_floored, _SWEEPS
    for _ in range(sweeps):
        W = W - lse(W, -2)
        W = W - lse(W, -1)
    X = expo(W)
    g = X.sum(-2) - 1.0
    err = g.abs().amax(-1)
    for step in range(budget):
        if not bool((err > tol).any()):
            return W, step, err
        # Levenberg-Marquardt ridge proportional to the residual: keeps the factorisation defined and
        # rounding noise in null directions small against the step, without spoiling quadratic convergence.
        # Converged elements take their (rounding-sized) steps too: masking them costs more than it saves.
        ridge = (_NEWTON_RIDGE * err).clamp_min(_RIDGE_FLOOR).unsqueeze(-1)  # (B, 1)
        d = _solve_spd(_grounded_laplacian(X, None, ridge), -g)
        d_max = d.abs().amax(-1)
        if bool((d_max <= _SAFE_STEP).all()):
            # rows of W are normalised and |d| <= 1: each row's largest entry is >= -log n - 1
            trial = W + d.unsqueeze(-2)
            W = trial - torch.logsumexp(trial if narrow else trial.clamp_min(_LOG_FLOOR), dim=-1, keepdim=True)
        else:
            W = _armijo_step(W, d, g, d_max, slack, lse)
        X = expo(W)
        g = X.sum(-2) - 1.0
        err = g.abs().amax(-1)
    return W, budget, err


def _armijo_step(W, d, g, d_max, slack, lse):
    """W + t d with its rows renormalised, t <= _MAX_STEP / max |d| halved until Armijo holds (see _newton)."""
    # Armijo: psi(b + t d) - psi(b) = sum of row log-normalisers - t sum(d) <= 1e-4 t <g, d>
    armijo = d.sum(-1) + 1e-4 * (g * d).sum(-1)
    t = (_MAX_STEP / d_max.clamp_min(1e-300)).clamp(max=1.0)
    W_new = pending = None
    for _ in range(_MAX_HALVINGS):
        trial = W + (t.unsqueeze(-1) * d).unsqueeze(-2)
        # rows of W are normalised and |t d| <= _MAX_STEP: each row's largest entry is >= -log n - 8
        lse_rows = torch.logsumexp(trial.clamp_min(_LOG_FLOOR), dim=-1, keepdim=True)
        ok = lse_rows.sum((-2, -1)) <= t * armijo + slack
        if W_new is None:
            W_new, pending = trial - lse_rows, ~ok
        else:
            ok = ok & pending
            W_new = torch.where(ok[:, None, None], trial - lse_rows, W_new)
            pending = pending & ~ok
        if not bool(pending.any()):
            return W_new
        t = 0.5 * t
    # no Armijo step: a Sinkhorn sweep (columns, then rows) instead
    sweep = W - lse(W, -2)
    sweep = sweep - lse(sweep, -1)
    return torch.where(pending[:, None, None], sweep, W_new)


def _sinkhorn_vjp(X: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """dL/dZ from dL/dX = G at the Sinkhorn fixed point X (B, n, n), by implicit differentiation.

    With X = exp(Z + a 1^T + 1 b^T) and the marginal constraints, a perturbation
    dZ moves X by X * (dZ + da 1^T + 1 db^T) with (da, db) solving the
    linearised constraints (2n equations of rank 2n-1: (da, db) is defined up
    to (+1, -1), which leaves X unchanged).  The adjoint is
    dL/dZ = X * (G - alpha 1^T - 1 beta^T) with
        diag(r) alpha + X beta = (G*X) 1,  X^T alpha + diag(c) beta = (G*X)^T 1,
    solved by eliminating alpha: a Laplacian system in beta, grounded by
    1 1^T (see :func:`_grounded_laplacian`), one n x n Cholesky solve.
    It is the residual of projecting sqrt(X)*G on the span of the constraint
    gradients, so directions where the Laplacian is (nearly) singular -- blocks
    of X coupled by tiny masses delta -- change the result by O(delta |G|): the
    ridge on the Laplacian costs nothing there.  Differentiable ops only, so
    autograd also gives second derivatives.
    """
    r = X.sum(-1)
    GX = G * X
    g1 = GX.sum(-1)
    rhs = GX.sum(-2) - (X * (g1 / r).unsqueeze(-1)).sum(-2)
    beta = _solve_spd(_grounded_laplacian(X, r, _VJP_RIDGE), rhs)
    alpha = (g1 - (X @ beta.unsqueeze(-1)).squeeze(-1)) / r
    return X * (G - alpha.unsqueeze(-1) - beta.unsqueeze(-2))


class _Sinkhorn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, Z, tol, max_iter, report):
        X, report["unconverged"], report["violation"] = _sinkhorn_forward(Z, tol, max_iter)
        ctx.save_for_backward(X)
        return X

    @staticmethod
    def backward(ctx, G):
        (X,) = ctx.saved_tensors
        return _sinkhorn_vjp(X, G), None, None, None


def sinkhorn(Z: torch.Tensor, tol: float = SINKHORN_TOL, max_iter: int = SINKHORN_MAX_ITER) -> torch.Tensor:
    """argmax_{x in Birkhoff} <Z, x> - sum_ij x_ij log x_ij: the Sinkhorn normalisation of exp(Z).

    Z: (..., n, n) -> X (..., n, n), Z's dtype and device, with
    X = exp(Z + a 1^T + 1 b^T) for dual potentials a, b; rows sum to 1 to
    rounding and columns to within ``tol`` (default 1e-12).

    Precision: float64 internally whatever the input, because the tolerance
    and the spread of Z (|Z| reaches 1e6 at tau = 1e-3, |theta| = 1e3) are far
    beyond float32.  The state is log X with the potentials absorbed, so
    rounding is relative to the O(1) entries that matter, not to |Z|.

    Forward: a few Sinkhorn sweeps, then log-domain damped Newton on the
    dual (an n x n Cholesky solve per step, O(n^3); 3-5 steps when
    max(Z) - min(Z) <= 64, the usual case at tau ~ 1).  Larger spreads are
    nearly linear programs, where Sinkhorn's alternating normalisations need
    O(spread) sweeps; Newton instead follows Z / s for s decreasing 8x per
    stage down to 1 (epsilon-scaling, each stage warm-started by the previous
    one), typically 10-30 steps in all at spreads up to 1e6.
    Warns (RuntimeWarning) if ``max_iter`` steps do not reach ``tol``.

    Backward: implicit differentiation of the fixed point (one n x n
    Cholesky solve per element), never unrolled; differentiable again, so
    second derivatives are available.
    """
    _check_solver_arguments(Z, tol, max_iter)
    return _sinkhorn(Z, float(tol), max_iter, stacklevel=3)


def _check_solver_arguments(Z, tol, max_iter) -> None:
    """The public iterative solvers' checks: square finite Z, tol > 0, max_iter >= 1."""
    _check_square(Z, "Z")
    if isinstance(tol, bool) or not isinstance(tol, (float, int)) or not tol > 0:
        raise ValueError(f"tol: expected a positive float, got {tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter: expected a positive int, got {max_iter!r}")
    if not bool(torch.isfinite(Z).all()):
        raise ValueError("Z: expected finite values")


def _run_batched(function, name, Z, tol, max_iter, stacklevel):
    """Apply an iterative solver's autograd ``function`` to Z (..., n, n) as a float64 batch.

    Returns X in Z's shape and dtype; warns (RuntimeWarning, naming ``name``) when
    elements did not reach ``tol`` within ``max_iter`` Newton steps, with ``stacklevel``
    counted from the solver wrapper that calls this (one frame is added here).
    """
    n = Z.shape[-1]
    if Z.numel() == 0:
        return Z * 0
    Z64 = Z.reshape(-1, n, n).to(torch.float64)
    report = {}
    X = function.apply(Z64, tol, max_iter, report)
    if report["unconverged"]:
        warnings.warn(
            f"{name}: {report['unconverged']} of {Z64.shape[0]} batch elements did not reach the tolerance "
            f"{tol:g} within max_iter={max_iter} Newton steps (largest column-sum violation "
            f"{report['violation']:.3g}); increase max_iter",
            RuntimeWarning,
            stacklevel=stacklevel + 1,
        )
    return X.to(Z.dtype).reshape(Z.shape)


def _sinkhorn(Z, tol=SINKHORN_TOL, max_iter=SINKHORN_MAX_ITER, stacklevel=2):
    """:func:`sinkhorn` without argument checks (the registered solver's inputs are checked by sstcvx)."""
    return _run_batched(_Sinkhorn, "sinkhorn", Z, tol, max_iter, stacklevel)


# ---------------------------------------------------------------------------------------------
# Euclidean relaxation: projection onto the Birkhoff polytope
# ---------------------------------------------------------------------------------------------

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
        d = _solve_spd(_grounded_laplacian(S, S.sum(-1), ridge), g)
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
        return _sinkhorn_vjp(support, G), None, None, None


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
    _check_solver_arguments(Z, tol, max_iter)
    return _birkhoff(Z, float(tol), max_iter, stacklevel=3)


def _birkhoff(Z, tol=BIRKHOFF_TOL, max_iter=BIRKHOFF_MAX_ITER, stacklevel=2):
    """:func:`birkhoff_projection` without argument checks (the registered solver's inputs are checked by sstcvx)."""
    return _run_batched(_BirkhoffProjection, "birkhoff_projection", Z, tol, max_iter, stacklevel)


@register_argmax(Permutation)
def _permutation_argmax(P: Permutation, U: torch.Tensor) -> torch.Tensor:
    """The registered hard argmax: :func:`hungarian` (CPU, O(n^3) per element)."""
    return hungarian(U)


@register_relaxation(Permutation, "entropy")
def _permutation_entropy(P: Permutation, Z: torch.Tensor) -> torch.Tensor:
    """The registered entropy relaxation: :func:`sinkhorn` at its default tolerance 1e-12."""
    return _sinkhorn(Z)


@register_relaxation(Permutation, "euclidean")
def _permutation_euclidean(P: Permutation, Z: torch.Tensor) -> torch.Tensor:
    """The registered euclidean relaxation: :func:`birkhoff_projection` at its default tolerance 1e-12."""
    return _birkhoff(Z)


def recognize(form):
    """A candidate for :mod:`sstcvx.recognition`: Permutation(s) when n = s^2 coordinates carry
    2s - 1 independent equalities that couple them like the rows and columns of an s x s grid.

    The grid is read from the projector R onto the span of the equality rows, which does not
    depend on how they were written: for the row and column sums of a grid,
    R[(i, j), (k, l)] = [i = k] / s + [j = l] / s - 1 / s^2, positive exactly when the two
    cells share a line.  Coordinate 0's neighbours form two cliques (its line-mates in either
    direction; the one holding the smaller index is called its row); every cell of its column
    then spans one row (itself and its neighbours off that column), and likewise for columns.
    Rows and columns are numbered by their smallest coordinate, so a declared (s, s) matrix
    maps to itself.  Cost O(n^2) after the projector; the core certifies the candidate.
    """
    from scipy.sparse.csgraph import connected_components

    n = form.n
    s = math.isqrt(n)
    if s < 2 or s * s != n or form.m_eq != 2 * s - 1 or not bool((form.lower[:n] >= 0).all()):
        return None
    R = row_space_projector(form)
    linked = R > 0.5 / n  # same line: (s - 1) / s^2; otherwise -1 / s^2
    np.fill_diagonal(linked, False)
    if not np.all(linked.sum(axis=1) == 2 * (s - 1)):
        return None
    neighbours = np.flatnonzero(linked[0])
    count, labels = connected_components(linked[np.ix_(neighbours, neighbours)], directed=False)
    if count != 2:
        return None
    row_side = labels == labels[0]  # neighbours[0] is the smallest neighbour
    row0 = np.concatenate([[0], neighbours[row_side]])
    col0 = np.concatenate([[0], neighbours[~row_side]])
    if len(row0) != s or len(col0) != s:
        return None
    row_of = np.full(n, -1)
    col_of = np.full(n, -1)
    for label, cells in ((row_of, col0), (col_of, row0)):
        lines = []
        for c in cells:
            mates = np.setdiff1d(np.flatnonzero(linked[c]), cells)
            lines.append(np.concatenate([[c], mates]))
        for number, line in enumerate(sorted(lines, key=lambda line: int(line.min()))):
            if len(line) != s or np.any(label[line] >= 0):
                return None
            label[line] = number
    if np.any(row_of < 0) or np.any(col_of < 0):
        return None
    index = np.full(n, -1)
    index[row_of * s + col_of] = np.arange(n)
    if np.any(index < 0):
        return None
    return Match(Permutation(s), index)


register_family(
    Family(
        name="permutation",
        make=lambda n, k: Permutation(n),
        regularizers=("entropy", "euclidean"),
        n=4,
        sizes=(3, 4, 6, 8, 12, 16, 32),
        quick_sizes=(3, 5, 8),
        max_generic_n=12,
        device_check_n=8,
        quick_device_check_n=4,
        recognize=recognize,
    )
)
