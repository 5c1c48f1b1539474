"""The entropy relaxation on the Birkhoff polytope: the Sinkhorn fixed point, with an implicit backward.

:func:`sinkhorn` solves argmax_{x doubly stochastic} <Z, x> - sum_ij x_ij log x_ij, the
``entropy`` relaxation of :class:`polytopes.Permutation` (registered there, Z = U / tau):
X = exp(Z + a 1^T + 1 b^T) with unit row and column sums.  It needs no polytope object.
The Newton-system helpers (:func:`grounded_laplacian`, :func:`solve_spd`), the adjoint
:func:`sinkhorn_vjp` and the batched runner :func:`run_batched` are shared with
:mod:`polytopes.birkhoff`.

Tuning constants (all float64, dimensionless unless said):

=====================  ======  =============================================================
``SINKHORN_TOL``       1e-12   default largest |row or column sum - 1| accepted
``SINKHORN_MAX_ITER``  500     default budget of Newton steps over all stages
``_FIRST_SPREAD``      32      continuation: the first stage solves Z / s with spread <= 32
``_SCALE_FACTOR``      8       continuation: s shrinks 8x per stage down to 1
``_STAGE_TOL``         1e-2    column-sum tolerance of the stages before the last
``_NEWTON_RIDGE``      1e-3    Newton's Levenberg-Marquardt ridge, times max |c - 1|
``_RIDGE_FLOOR``       1e-13   smallest ridge (keeps the Cholesky factorisation defined)
``_VJP_RIDGE``         1e-12   the backward's ridge (changes dL/dZ by the neglected coupling)
``_LEAN_ADJOINT_TOL``  1e-9    column sums within this of 1: the backward takes them as 1
``_MAX_STEP``          8       trust region: largest change of a potential per Newton step
``_MAX_HALVINGS``      30      Armijo backtracking halvings before a Sinkhorn sweep instead
``_SWEEPS``            2       Sinkhorn sweeps before the Newton steps of a stage
``_NARROW_SPREAD``     64      spread of Z up to which one stage without floors is used
``_NARROW_SWEEPS``     3       Sinkhorn sweeps before Newton in the log-domain fallback of that narrow path
``_LINEAR_SWEEPS``     6       linear-space Sinkhorn sweeps before Newton on the narrow path
``_ROW_LAYOUT_N``      20      from this n the sweeps and the adjoint take matrix-vector products as rows
``_NARROW_STEP``       0.8     narrow path: Newton steps longer than 0.8 (max |d|) are cut to 0.8, no line search
``_COMPACT_BATCH``     32      narrow path: from this batch size on, converged elements are set aside
``_SAFE_STEP``         0.3     Newton steps with max |d| <= 0.3 skip the line search
``_ARMIJO_SLACK``      1e-14   rounding allowance of the Armijo test, per row
``_LOG_FLOOR``         -345    log X below this reads as exp(-345) ~ 1e-150 (or 0)
=====================  ======  =============================================================

On the CPU (:func:`polytopes._compiled.enabled_for`) the forward and the adjoint run as numba
kernels over the batch, one element at a time with the same algorithms and constants
(:mod:`polytopes._compiled_sinkhorn`, dispatched in :func:`_sinkhorn_solve` and
:func:`sinkhorn_vjp` for n up to _COMPILED_MAX_N = 128); the torch code below is the path on
other devices and the reference the kernels are tested against.

References: Mena et al., "Learning latent permutations with Gumbel-Sinkhorn networks",
ICLR 2018 (the relaxation); Cuturi, "Sinkhorn distances", NeurIPS 2013 (the entropic
problem and its fixed point).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from . import _compiled
from ._kernels import check_solver_arguments, floored_logsumexp, ones_matrix, set_aside

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
# coupling mass it neglects (see sinkhorn_vjp).
_NEWTON_RIDGE = 1e-3  # times max |column sum - 1|
_RIDGE_FLOOR = 1e-13
_VJP_RIDGE = 1e-12
# The lean adjoint (see _sinkhorn_adjoint) takes the column sums as 1: used when they are within this.
_LEAN_ADJOINT_TOL = 1e-9
# Newton: largest change of a potential per step, and backtracking halvings before a Sinkhorn sweep.
_MAX_STEP = 8.0
_MAX_HALVINGS = 30
# Sinkhorn sweeps (column then row normalisation) before Newton's steps at each stage, and when
# max(Z) - min(Z) <= _NARROW_SPREAD (one stage, cheaper sweeps).
_SWEEPS = 2
_NARROW_SPREAD = 64.0
_NARROW_SWEEPS = 3
# The narrow path (see _narrow_newton): linear-space Sinkhorn sweeps before its Newton steps, and the
# longest step it takes without a line search (max |change of a potential|; see there for the bound).
_LINEAR_SWEEPS = 6
# From this n on the sweeps' matrix-vector products are taken as row vectors times the matrix.
_ROW_LAYOUT_N = 20
_NARROW_STEP = 0.8
# The narrow path sets converged elements aside (see _narrow_newton) in batches of at least this many.
_COMPACT_BATCH = 32
# Newton steps with max |d| <= _SAFE_STEP are taken in full, without a line search (see _newton).
_SAFE_STEP = 0.3
# Rounding allowance (per row) of the Armijo test, whose terms are O(1).
_ARMIJO_SLACK = 1e-14
# Entries of X below exp(_LOG_FLOOR) ~ 1e-150 are set to 0 (see _exp).
_LOG_FLOOR = -345.0
# CPU batches with n up to this take the compiled kernels (see _takes_compiled).
_COMPILED_MAX_N = 128


def grounded_laplacian(X: torch.Tensor, r, ridge) -> torch.Tensor:
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


def solve_spd(S: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
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
    10-100x slower on the CPU; the floor changes the result by at most n * 1e-150.
    """
    return floored_logsumexp(W, dim, _LOG_FLOOR, keepdim=True)


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


def _sinkhorn_solve(Z: torch.Tensor, tol: float, max_iter: int):
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

    CPU tensors take the compiled kernel where :func:`_takes_compiled` says so (see
    :func:`_compiled_solve`); the torch code below is the path for other devices and the reference.
    """
    if _compiled.enabled_for(Z) and _takes_compiled(Z):
        return _compiled_solve(Z, tol, max_iter)[:3]
    return _torch_solve(Z, tol, max_iter)


def _torch_solve(Z: torch.Tensor, tol: float, max_iter: int):
    """:func:`_sinkhorn_solve` in torch (any device)."""
    low, high = torch.aminmax(Z)
    if float(high) - float(low) <= _NARROW_SPREAD or bool(
        (Z.amax(dim=(-2, -1)) - Z.amin(dim=(-2, -1)) <= _NARROW_SPREAD).all()
    ):  # the common case (tau ~ 1): one stage, no floors
        X, steps, err, violation = _narrow_newton(Z, tol, max_iter)
        if X is None:  # a step too long for a plain Newton step: the damped log-domain iteration from there
            W, steps, err = _newton(torch.log(steps), tol, max_iter, narrow=True)
            X = torch.exp(W)
            violation = float(err.max())
        if violation <= tol:  # (then err is None below batch _COMPACT_BATCH: not computed)
            return X, 0, violation
        return X, int((err > tol).sum()), violation
    spread = Z.amax(dim=(-2, -1)) - Z.amin(dim=(-2, -1))
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


def _takes_compiled(Z: torch.Tensor) -> bool:
    """Whether a CPU batch Z (B, n, n) takes the compiled kernels: n <= _COMPILED_MAX_N.

    The rule is measured (one thread, forward and backward, docs/benchmarks.md): the kernel is
    faster than the torch code at every batch size from n = 2 to 100 (2-10x at n <= 10, where
    the torch code's time is dispatch; 1.3-2x at n = 50-100), about even at n = 150-200 and
    slower from n = 300 on (its O(n^3) loops against the torch code's BLAS calls, which also
    gain from more threads).
    """
    return Z.shape[-1] <= _COMPILED_MAX_N


def _compiled_solve(Z: torch.Tensor, tol: float, max_iter: int):
    """:func:`_sinkhorn_solve` by the compiled kernel, for Z float64 (B, n, n) on the CPU.

    Returns (X, unconverged, violation, steps), steps the most Newton steps an element took in
    the kernel.  The kernel (:func:`polytopes._compiled_sinkhorn.sinkhorn_forward`) solves one
    element at a time by the torch code's algorithms: for a spread of Z up to _NARROW_SPREAD
    the narrow path of :func:`_narrow_newton` (_LINEAR_SWEEPS Sinkhorn sweeps in linear space,
    then Newton steps cut to _NARROW_STEP), above it the epsilon-scaling of the stages of
    :func:`_newton` in the log domain (floors, trust region, Armijo backtracking), with the same
    constants, tolerance and step budget per element.  Differences from the batched torch code:
    each element stops as soon as it has converged, and its Levenberg-Marquardt ridge follows
    its own violation (the torch code's narrow path below batch _COMPACT_BATCH uses the batch's
    largest), so X agrees with the torch path's to within the tolerance, not to rounding.
    Elements the kernel leaves (non-finite entries, a failed factorisation: not seen on finite
    input) are solved by the torch code, as one smaller batch, its counts added to the report.
    """
    from . import _compiled_sinkhorn

    Z = Z.detach().resolve_neg()  # (numpy() refuses a tensor with the negative bit, e.g. from torch._neg_view)
    if not Z.is_contiguous():
        Z = Z.contiguous()
    X = torch.empty_like(Z)
    steps = np.empty(Z.shape[0], dtype=np.int64)
    unconverged, violation, most_steps, left = _compiled_sinkhorn.sinkhorn_forward(
        Z.numpy(),
        float(tol),
        int(max_iter),
        (
            _NARROW_SPREAD,
            float(_LINEAR_SWEEPS),
            _NARROW_STEP,
            _NEWTON_RIDGE,
            _RIDGE_FLOOR,
            _FIRST_SPREAD,
            _SCALE_FACTOR,
            _STAGE_TOL,
            _MAX_STEP,
            float(_MAX_HALVINGS),
            float(_SWEEPS),
            _SAFE_STEP,
            _ARMIJO_SLACK,
            _LOG_FLOOR,
        ),
        X.numpy(),
        np.empty(Z.shape[0]),
        steps,
    )
    if left:  # elements with non-finite entries or a failed factorisation: the torch path, as one batch
        index = torch.from_numpy(np.flatnonzero(steps < 0))
        X_rest, unconverged_rest, violation_rest = _torch_solve(Z.index_select(0, index), tol, max_iter)
        X.index_copy_(0, index, X_rest)
        unconverged += unconverged_rest
        violation = max(violation, violation_rest)
    return X, unconverged, violation, most_steps


def _compiled_adjoint(X: torch.Tensor, G: torch.Tensor, unit_rows: bool, lean: bool) -> torch.Tensor:
    """:func:`sinkhorn_vjp` (``lean``: :func:`_sinkhorn_adjoint`) by the compiled kernel, X, G (B, n, n) float64 CPU.

    Elements whose factorisation fails even with the bump of :func:`solve_spd` (not seen) take
    the torch code.  No autograd graph: callers needing second derivatives take the torch code.
    """
    from . import _compiled_sinkhorn

    X, G = X.detach().resolve_neg(), G.detach().resolve_neg()  # (numpy() refuses the negative bit)
    if not X.is_contiguous():
        X = X.contiguous()
    if not G.is_contiguous():
        G = G.contiguous()
    out = torch.empty_like(X)
    failed = _compiled_sinkhorn.sinkhorn_adjoint(X.numpy(), G.numpy(), unit_rows, lean, _VJP_RIDGE, out.numpy())
    if failed:
        bad = torch.isnan(out).any(-1).any(-1).nonzero().squeeze(-1)
        out.index_copy_(0, bad, _torch_vjp(X.index_select(0, bad), G.index_select(0, bad), unit_rows))
    return out


def _compiled_backward_for(X: torch.Tensor, G: torch.Tensor) -> bool:
    """Whether the adjoint of X, G takes the compiled kernel: float64 CPU tensors, n <= _COMPILED_MAX_N (see
    :func:`_takes_compiled`) and no graph to record."""
    return (
        _compiled.enabled_for(X)
        and X.shape[-1] <= _COMPILED_MAX_N
        and X.dtype == torch.float64
        and G.dtype == torch.float64
        and G.device == X.device
        and not (torch.is_grad_enabled() and (X.requires_grad or G.requires_grad))
    )


# The forward for callers outside autograd; the autograd function calls _sinkhorn_solve, whose forward
# already runs without grad (a no_grad context costs a few microseconds per call).
_sinkhorn_forward = torch.no_grad()(_sinkhorn_solve)


def _narrow_newton(Z: torch.Tensor, tol: float, max_iter: int):
    """Sinkhorn sweeps then Newton steps in the exp domain, for Z (B, n, n) with spread <= _NARROW_SPREAD.

    X = diag(1 / r) K diag(v) with K = exp(Z - row max) (entries >= exp(-64): no
    floors, no underflow) and r the row sums of K diag(v); the column scalings v are
    the state.  It starts from _LINEAR_SWEEPS Sinkhorn sweeps in linear space
    (v = 1 / K^T u, u = 1 / K v: two matrix-vector products and two reciprocals
    each, a quarter of a Newton step's cost; over-relaxed from batch _COMPACT_BATCH
    on, see :func:`_linear_sweeps`).  Each Newton step then solves the
    grounded Laplacian system of :func:`_newton` for the Newton direction d and
    sets v *= exp(t d), t = min(1, _NARROW_STEP / max |d|) per element: a full
    step when it is short, else the direction cut to max |t d| = _NARROW_STEP.
    Along d the dual psi has third derivative at most 2 max |d| times the second
    (see :func:`_newton`), which bounds psi(b + t d) - psi(b) by
    lambda^2 / max|d|^2 (-a^2 + (e^{2a} - 2a - 1) / 4), a = t max |d|, lambda^2
    the Newton decrement: negative for a <= 0.87, so every step decreases psi by
    a fixed fraction of lambda^2 and no line search is needed.  Host
    synchronisations: the largest violation (NaN included) and the largest
    |d| per step, and from batch _COMPACT_BATCH on, from the third check, the count
    of unconverged elements: once they are at most half of the batch the converged
    ones are set aside (their X is final) and the steps continue on the rest, a
    smaller batch.  The Levenberg-Marquardt ridge is _NEWTON_RIDGE times the
    violation: below batch _COMPACT_BATCH one for the batch (its largest violation:
    one call fewer, and the batch runs until its slowest element is done anyway),
    from there on per element (a ridge set by the batch's worst element would slow
    the quadratic convergence of the others, which are then set aside later).
    Each step is about 20 torch calls (the cost at small batches, where the
    arithmetic is negligible): in-place updates, the all-ones matrix of the
    grounding cached per (n, dtype, device).
    Cost per step: one batched n x n product X^T X and Cholesky solve, O(B n^3).
    Returns (X, steps, err, worst), worst = max(err) as a float, err (B,) the largest
    column violation per element (None below batch _COMPACT_BATCH when worst <= tol: not
    needed then), or (None, X, err, worst) when the factorisation broke down (the caller
    continues in the log domain from X).
    """
    n = Z.shape[-1]
    K = torch.exp(Z - Z.amax(-1, keepdim=True))  # (torch.softmax is slower on the CPU for short rows)
    v = _linear_sweeps(K, _LINEAR_SWEEPS)  # (B, 1, n)
    ones = ones_matrix(n, Z.dtype, Z.device)
    X_out, err_out, index = None, None, None  # the whole batch, once a part has been set aside
    X_last = err = None
    per_element = Z.shape[0] >= _COMPACT_BATCH  # a ridge per element, converged elements set aside
    for step in range(max_iter + 1):
        X = K * v
        X = X.div_(X.sum(-1, keepdim=True))
        c = X.sum(-2)  # (B, n)
        g = torch.rsub(c, 1.0)
        if per_element:
            err = g.abs().amax(-1)
            worst = float(err.max())
        else:
            worst = float(torch.linalg.vector_norm(g, _INF))
        if worst <= tol or step == max_iter or worst != worst:
            if not per_element and not worst <= tol:  # (NaN included)
                err = g.abs().amax(-1)
            if worst != worst and X_last is not None:  # NaN: the factorisation failed; continue from the last X
                X = torch.where(torch.isnan(X), X_last, X)
            if index is not None:
                X, err = X_out.index_copy_(0, index, X), err_out.index_copy_(0, index, err)
                if worst == worst:  # the set-aside elements' violations count too
                    worst = float(err.max())
            return (X, step, err, worst) if worst == worst else (None, X, err, worst)
        # from the third check on (after one or two steps from the sweeps' start no element has converged
        # in any batch measured), set converged elements aside once they are the majority: the stragglers'
        # steps are cheaper alone
        if per_element and step >= 2 and v.shape[0] >= _COMPACT_BATCH:
            pending = err > tol
            count = int(pending.sum())
            if 2 * count <= v.shape[0]:
                X_out, err_out, index = set_aside(index, X, err, X_out, err_out)
                keep = pending.nonzero().squeeze(-1)
                index, K, v, X, c, g, err = (T.index_select(0, keep) for T in (index, K, v, X, c, g, err))
        X_last = X
        # the grounded Laplacian of grounded_laplacian with r = 1, 1 1^T + diag(c + ridge) - X^T X (the rows
        # of X^T X sum to c, so the diagonal is the sum of the off-diagonal weights), with a
        # Levenberg-Marquardt ridge proportional to the violation: per element in large batches, else one
        # for the batch, proportional to the largest violation
        H = torch.baddbmm(ones, X.mT, X, alpha=-1.0)
        if per_element:
            H.diagonal(dim1=-2, dim2=-1).add_(c.add_(err.unsqueeze(-1), alpha=_NEWTON_RIDGE).add_(_RIDGE_FLOOR))
        else:
            H.diagonal(dim1=-2, dim2=-1).add_(c.add_(_NEWTON_RIDGE * worst + _RIDGE_FLOOR))
        L, _ = torch.linalg.cholesky_ex(H)
        d = torch.cholesky_solve(g.unsqueeze(-1), L)  # the Newton direction, (B, n, 1)
        if float(torch.linalg.vector_norm(d, _INF)) <= _NARROW_STEP:
            v = v * d.exp_().mT
        else:
            d = d.mT
            v = v * torch.exp(d * (_NARROW_STEP / d.abs().amax(-1, keepdim=True).clamp_min(_NARROW_STEP)))
    raise AssertionError("unreachable")


_INF = float("inf")


def _linear_sweeps(K: torch.Tensor, sweeps: int) -> torch.Tensor:
    """Column scalings v (B, 1, n) after ``sweeps`` Sinkhorn sweeps in linear space on K (B, n, n), from 1 / K^T 1.

    A plain sweep is u = 1 / K v, v = 1 / K^T u: two batched matrix-vector products and
    two reciprocals.  From batch _COMPACT_BATCH on the sweeps are over-relaxed in v: with
    w = v * K^T u (1 at the fixed point), v <- v w^(-3/2), the log of v moved 3/2 times as
    far as the plain sweep would move it (a square root, two products and a quotient, no
    pow); that shrinks the contraction factor of the sweeps near the fixed point (Thibault
    et al., "Overrelaxed Sinkhorn-Knopp algorithm for regularized optimal transport",
    Algorithms 2021), and the better start lets most elements finish a Newton step earlier,
    which pays where a Newton step costs many sweeps and converged elements are set aside.
    Any positive finite v is a valid start for the Newton steps, so a non-finite result
    (not seen; the relaxed iteration has no global guarantee) falls back to plain sweeps.
    The products take the layout that batched products on the CPU run fastest in, which
    depends on n: below _ROW_LAYOUT_N matrix times column vector, with K^T copied to
    contiguous memory from batch _COMPACT_BATCH on (a transposed operand is slower; below
    that batch the copy costs what it saves); from there on row vector times matrix,
    u^T K and v^T K^T, several times faster there than matrix times column vector
    (docs/benchmarks.md, "Permutation solvers", fifth pass).
    """
    relaxed = len(K) >= _COMPACT_BATCH
    if K.shape[-1] >= _ROW_LAYOUT_N:
        Kt = K.mT
        for relax in (True, False) if relaxed else (False,):
            v = K.sum(-2, keepdim=True).reciprocal_()  # (B, 1, n): the columns of K normalised
            for _ in range(sweeps):
                w = torch.bmm(torch.bmm(v, Kt).reciprocal_(), K)
                v = v.div_(w.mul_(v).mul_(w.sqrt())) if relax else w.reciprocal_()
            if not relax or bool(torch.isfinite(v).all()):
                return v
    Kt = K.mT.contiguous() if relaxed else K.mT
    for relax in (True, False) if relaxed else (False,):
        v = Kt.sum(-1, keepdim=True).reciprocal_()  # (B, n, 1)
        for _ in range(sweeps):  # (torch.bmm: @ costs a few more calls per product at small batches)
            w = torch.bmm(Kt, torch.bmm(K, v).reciprocal_())
            v = v.div_(w.mul_(v).mul_(w.sqrt())) if relax else w.reciprocal_()
        if not relax or bool(torch.isfinite(v).all()):
            return v.mT


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
        d = solve_spd(grounded_laplacian(X, None, ridge), -g)
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


def sinkhorn_vjp(X: torch.Tensor, G: torch.Tensor, unit_rows: bool = False) -> torch.Tensor:
    """dL/dZ from dL/dX = G at the Sinkhorn fixed point X (B, n, n), by implicit differentiation.

    With X = exp(Z + a 1^T + 1 b^T) and the marginal constraints, a perturbation
    dZ moves X by X * (dZ + da 1^T + 1 db^T) with (da, db) solving the
    linearised constraints (2n equations of rank 2n-1: (da, db) is defined up
    to (+1, -1), which leaves X unchanged).  The adjoint is
    dL/dZ = X * (G - alpha 1^T - 1 beta^T) with
        diag(r) alpha + X beta = (G*X) 1,  X^T alpha + diag(c) beta = (G*X)^T 1,
    solved by eliminating alpha: a Laplacian system in beta, grounded by
    1 1^T (see :func:`grounded_laplacian`), one n x n Cholesky solve.
    It is the residual of projecting sqrt(X)*G on the span of the constraint
    gradients, so directions where the Laplacian is (nearly) singular -- blocks
    of X coupled by tiny masses delta -- change the result by O(delta |G|): the
    ridge on the Laplacian costs nothing there.  Differentiable ops only, so
    autograd also gives second derivatives.  ``unit_rows``: the rows of X sum to 1
    (to rounding), so r = 1 is used (two fewer passes).  Cost: O(B n^3), about 15 batched ops.
    Float64 CPU tensors outside a recorded graph take the compiled kernel (same formulas, one
    element at a time: :func:`_compiled_adjoint`).
    """
    if X.dim() == 3 and _compiled_backward_for(X, G):
        return _compiled_adjoint(X, G, unit_rows, lean=False)
    return _torch_vjp(X, G, unit_rows)


def _torch_vjp(X: torch.Tensor, G: torch.Tensor, unit_rows: bool = False) -> torch.Tensor:
    """:func:`sinkhorn_vjp` in torch (any device; differentiable)."""
    if unit_rows:
        Xr, GX_rows = X, (G * X).sum(-1, keepdim=True)
    else:
        r = X.sum(-1, keepdim=True)
        Xr, GX_rows = X / r, (G * X).sum(-1, keepdim=True) / r
    rhs = ((G - GX_rows) * X).sum(-2)
    # the grounded Laplacian of grounded_laplacian, 1 1^T + diag(c + ridge) - (X / r)^T X: the rows of
    # (X / r)^T X sum to the column sums c, so the diagonal is the sum of the off-diagonal weights
    laplacian = torch.baddbmm(torch.diag_embed(X.sum(-2) + _VJP_RIDGE) + 1.0, Xr.mT, X, alpha=-1.0)
    beta = solve_spd(laplacian, rhs).unsqueeze(-1)  # (B, n, 1)
    alpha = GX_rows - Xr @ beta
    return X * (G - alpha - beta.mT)


def _sinkhorn_adjoint(X: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """:func:`sinkhorn_vjp` at a Sinkhorn solution X (B, n, n) of the forward, in about 14 torch calls.

    Rows of X sum to 1 to rounding and columns to within _LEAN_ADJOINT_TOL (checked by
    the caller; else it uses :func:`sinkhorn_vjp`), so the Laplacian's diagonal diag(c) is
    taken as the identity: the all-ones
    grounding plus (1 + ridge) I is one cached constant and the system is
    1 1^T + (1 + ridge) I - X^T X.  That changes dL/dZ by O(max |c - 1| |G|)
    (1e-12 at the default tolerance), and the second derivatives not at all
    along the solution manifold (there c stays 1).  With a0 = (G * X) 1 and
    R = G - a0 1^T the adjoint is X * (R + X beta 1^T - 1 beta^T), beta the
    solution of the system with right side X^T-weighted column sums of R * X.  From
    n = _ROW_LAYOUT_N on it is computed as G * X - X * ((a0 - X beta) 1^T + 1 beta^T),
    with the right side (G * X)^T 1 - X^T a0, the matrix-vector products taken as row
    vectors times X (faster there; see :func:`_linear_sweeps`).
    Differentiable ops only (double backward).  Cost: O(B n^3).
    """
    n = X.shape[-1]
    if n < _ROW_LAYOUT_N:
        RX = (G - (G * X).sum(-1, keepdim=True)) * X  # R * X
        rhs = RX.sum(-2, keepdim=True).mT  # (B, n, 1)
    else:
        GX = G * X
        a0 = GX.sum(-1, keepdim=True)  # (B, n, 1)
        rhs = torch.baddbmm(GX.sum(-2, keepdim=True), a0.mT, X, alpha=-1.0).mT
    L, info = torch.linalg.cholesky_ex(torch.baddbmm(_vjp_base(n, X.dtype, X.device), X.mT, X, alpha=-1.0))
    if bool(info.any()):  # rounding made it indefinite: the general adjoint, with its refactorisation
        return sinkhorn_vjp(X, G, unit_rows=True)
    beta = torch.cholesky_solve(rhs, L)  # (B, n, 1)
    if n < _ROW_LAYOUT_N:
        return torch.addcmul(RX, X, torch.bmm(X, beta) - beta.mT)  # X * (R + X beta 1^T - 1 beta^T), one pass fewer
    shift = torch.baddbmm(a0.mT, beta.mT, X.mT, alpha=-1.0).mT  # a0 - X beta, (B, n, 1)
    return torch.addcmul(GX, X, shift + beta.mT, value=-1.0)


_VJP_BASE: dict = {}


def _vjp_base(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """1 1^T + (1 + _VJP_RIDGE) I, (n, n), cached per (n, dtype, device) (read only)."""
    key = (n, dtype, device)
    base = _VJP_BASE.get(key)
    if base is None:
        base = _VJP_BASE[key] = torch.ones(n, n, dtype=dtype, device=device) + (1.0 + _VJP_RIDGE) * torch.eye(
            n, dtype=dtype, device=device
        )
    return base


class _Sinkhorn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, Z, tol, max_iter, report):
        X, report["unconverged"], report["violation"] = _sinkhorn_solve(Z, tol, max_iter)
        ctx.save_for_backward(X)
        ctx.columns_exact = report["violation"] <= _LEAN_ADJOINT_TOL
        return X

    @staticmethod
    def backward(ctx, G):
        (X,) = ctx.saved_tensors
        if _compiled_backward_for(X, G):  # (with create_graph, autograd records the torch code below)
            return _compiled_adjoint(X, G, unit_rows=True, lean=ctx.columns_exact), None, None, None
        if ctx.columns_exact:
            return _sinkhorn_adjoint(X, G), None, None, None
        return sinkhorn_vjp(X, G, unit_rows=True), None, None, None


def sinkhorn(Z: torch.Tensor, tol: float = SINKHORN_TOL, max_iter: int = SINKHORN_MAX_ITER) -> torch.Tensor:
    """argmax_{x in Birkhoff} <Z, x> - sum_ij x_ij log x_ij: the Sinkhorn normalisation of exp(Z).

    Z: (..., n, n) -> X (..., n, n), Z's dtype and device, with
    X = exp(Z + a 1^T + 1 b^T) for dual potentials a, b; rows sum to 1 to
    rounding and columns to within ``tol`` (default 1e-12).

    Precision: float64 internally whatever the input, because the tolerance
    and the spread of Z (|Z| reaches 1e6 at tau = 1e-3, |theta| = 1e3) are far
    beyond float32.  The state is log X with the potentials absorbed, so
    rounding is relative to the O(1) entries that matter, not to |Z|.

    Forward: when max(Z) - min(Z) <= 64 (the usual case at tau ~ 1), six
    linear-space Sinkhorn sweeps, then Newton on the dual in the exp domain
    without a line search (see :func:`_narrow_newton`; an n x n Cholesky
    solve per step, O(n^3); 2-5 steps at n = 4-50).  Larger spreads are
    nearly linear programs, where Sinkhorn's alternating normalisations need
    O(spread) sweeps; Newton instead follows Z / s for s decreasing 8x per
    stage down to 1 (epsilon-scaling, each stage warm-started by the previous
    one), typically 10-30 steps in all at spreads up to 1e6.
    Warns (RuntimeWarning) if ``max_iter`` steps do not reach ``tol``.

    Backward: implicit differentiation of the fixed point (one n x n
    Cholesky solve per element), never unrolled; differentiable again, so
    second derivatives are available.

    CPU tensors with n <= 128 run both as compiled loops over the batch
    (:mod:`polytopes._compiled_sinkhorn`: same algorithms per element; each
    element stops when it has converged); create_graph backward passes take the
    torch code.
    """
    check_solver_arguments(Z, tol, max_iter)
    return _sinkhorn(Z, float(tol), max_iter, stacklevel=3)


def run_batched(function, name, Z, tol, max_iter, stacklevel):
    """Apply an iterative solver's autograd ``function`` to Z (..., n, n) as a float64 batch.

    Returns X in Z's shape and dtype; warns (RuntimeWarning, naming ``name``) when
    elements did not reach ``tol`` within ``max_iter`` Newton steps, with ``stacklevel``
    counted from the solver wrapper that calls this (one frame is added here).
    """
    shape = Z.shape
    if Z.numel() == 0:
        return Z * 0
    Z64 = Z if len(shape) == 3 else Z.reshape(-1, shape[-2], shape[-1])
    if Z64.dtype != torch.float64:
        Z64 = Z64.to(torch.float64)
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
    if X.dtype != Z.dtype:
        X = X.to(Z.dtype)
    return X if len(shape) == 3 else X.reshape(shape)


def _sinkhorn(Z, tol=SINKHORN_TOL, max_iter=SINKHORN_MAX_ITER, stacklevel=2):
    """:func:`sinkhorn` without argument checks (the registered solver's inputs are checked by sstcvx)."""
    return run_batched(_Sinkhorn, "sinkhorn", Z, tol, max_iter, stacklevel)
