"""The canonical linear form of a polytope's CVXPY declaration.

A polytope declared with linear CVXPY constraints on ``x`` (and possibly auxiliary
variables ``w``, so that P may be the projection of a lifted set) is, once canonicalized,

    P = { x : exists w,  A [x; w] = b,  G [x; w] <= h,  lower <= [x; w] <= upper }

with ``x`` flattened in the event's (row-major, C) order and ``w`` the remaining
columns.  :func:`linear_form` computes it from ``P.cvxpy_declaration()``:

* CVXPY stuffs the constraints into ``A_cone v + s = b_cone`` with ``s`` in the zero cone
  (equalities) or the non-negative cone (inequalities ``A_cone v <= b_cone``); any other
  cone (a second-order or exponential cone) means P is not stated linearly: ``ValueError``.
  The columns of ``x`` are located through a probe objective (``sum_k (k + 1) x_k``), so
  reordering and variable attributes (``nonneg=True``) inside CVXPY are harmless;
* every row is scaled so that its largest absolute coefficient is 1; a row with a single
  non-zero coefficient becomes a bound (``lower``/``upper``, +-inf when absent); all-zero
  rows are dropped (``ValueError`` if one is infeasible);
* inequality rows implied by the bounds are dropped, duplicates are dropped, a pair of
  opposite inequalities with the same right-hand side becomes an equality row;
* linearly dependent equality rows are dropped (a rank-revealing Gram-Schmidt sweep in the
  declaration's order keeps the earliest independent rows) (``ValueError`` when a dropped row contradicts the kept ones).

The rows then have a canonical sign and scale, which the recognition of known families
relies on.  Cost: one CVXPY canonicalization plus an O(m^2 N) sweep (milliseconds), once per
polytope (cached in :mod:`sstcvx.generic.cache`); :meth:`LinearForm.to` returns a copy on a
device and dtype, cached per (device, dtype).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

#: Coefficients smaller than this (after scaling rows to a largest coefficient of 1) are zero.
COEFFICIENT_TOLERANCE = 1e-12
#: Relative tolerance of the rank decision and of the consistency test of dependent equalities.
RANK_TOLERANCE = 1e-10


@dataclass(frozen=True, eq=False)
class LinearForm:
    """``{x : exists w, A [x; w] = b, G [x; w] <= h, lower <= [x; w] <= upper}``.

    Attributes (tensors, float64 on the CPU unless moved with :meth:`to`):
        event_shape: the shape of ``x``; ``n = prod(event_shape)`` columns belong to ``x``
            (row-major order), the last ``n_aux`` columns to auxiliary variables.
        A ``(m_eq, n + n_aux)``, b ``(m_eq,)``: independent equality rows.
        G ``(m_in, n + n_aux)``, h ``(m_in,)``: inequality rows (none is a single-variable row).
        lower, upper ``(n + n_aux,)``: bounds, ``-inf``/``inf`` where absent.
    """

    event_shape: torch.Size
    n_aux: int
    A: torch.Tensor
    b: torch.Tensor
    G: torch.Tensor
    h: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor
    _copies: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def n(self) -> int:
        """The number of coordinates of ``x``."""
        return int(np.prod(tuple(self.event_shape)))

    @property
    def n_vars(self) -> int:
        """All columns: ``n + n_aux``."""
        return self.n + self.n_aux

    @property
    def m_eq(self) -> int:
        return int(self.A.shape[0])

    @property
    def m_in(self) -> int:
        return int(self.G.shape[0])

    def to(self, device=None, dtype=None) -> LinearForm:
        """This form with its tensors on ``device`` and in ``dtype`` (cached per pair)."""
        device = torch.device(device) if device is not None else self.A.device
        dtype = dtype or self.A.dtype
        if device == self.A.device and dtype == self.A.dtype:
            return self
        key = (str(device), dtype)
        copy = self._copies.get(key)
        if copy is None:
            move = lambda t: t.to(device=device, dtype=dtype)
            copy = LinearForm(
                self.event_shape,
                self.n_aux,
                move(self.A),
                move(self.b),
                move(self.G),
                move(self.h),
                move(self.lower),
                move(self.upper),
            )
            self._copies[key] = copy
        return copy

    def residuals(self, v: torch.Tensor) -> torch.Tensor:
        """The largest violation of the rows and bounds by points ``v`` ``(..., n + n_aux)``."""
        r = v.new_zeros(v.shape[:-1])
        if self.m_eq:
            r = torch.maximum(r, (v @ self.A.T - self.b).abs().amax(-1))
        if self.m_in:
            r = torch.maximum(r, (v @ self.G.T - self.h).clamp_min(0).amax(-1))
        r = torch.maximum(r, (self.lower - v).clamp_min(0).amax(-1))
        return torch.maximum(r, (v - self.upper).clamp_min(0).amax(-1))

    def __repr__(self):
        finite = int(torch.isfinite(self.lower).sum() + torch.isfinite(self.upper).sum())
        return (
            f"LinearForm(event_shape={tuple(self.event_shape)}, n_aux={self.n_aux}, equalities={self.m_eq}, "
            f"inequalities={self.m_in}, finite bounds={finite})"
        )


def linear_form(P) -> LinearForm:
    """The canonical linear form of ``P`` (computed once per polytope and cached)."""
    from .generic import cache

    return cache.cached(P, ("linear_form",), lambda: _build(P))


def _stuffed(P):
    """CVXPY's stuffed rows of P's declaration: (A_eq, b_eq, A_in, b_in, x_columns, n_columns)."""
    import cvxpy as cp

    x, constraints = P.cvxpy_declaration()
    n = int(np.prod(x.shape))
    probe = np.arange(1, n + 1, dtype=np.float64).reshape(x.shape)  # row-major numbering of x
    problem = cp.Problem(cp.Minimize(cp.sum(cp.multiply(probe, x))), constraints)
    try:
        data, _, _ = problem.get_problem_data(cp.CLARABEL)
    except cp.error.SolverError as exc:  # pragma: no cover - Clarabel ships with cvxpy
        raise ValueError(f"{P.name}: its declaration cannot be canonicalized ({exc})") from exc
    dims = data["dims"]
    if dims.soc or dims.exp or dims.psd or getattr(dims, "p3d", None) or getattr(dims, "pnd", None):
        raise ValueError(
            f"{P.name}: the declaration is not linear (CVXPY needs second-order, exponential, power or "
            "semidefinite cones for it), so it has no linear form; the cvxpylayers path still serves it"
        )
    c = np.asarray(data["c"], dtype=np.float64)
    n_cols = c.shape[0]
    x_cols = np.full(n, -1, dtype=np.int64)
    nonzero = np.flatnonzero(c)
    labels = np.rint(c[nonzero]).astype(np.int64)
    if (
        np.any(np.abs(c[nonzero] - labels) > 1e-9)
        or np.any(labels < 1)
        or np.any(labels > n)
        or len(np.unique(labels)) != len(labels)
        or len(labels) != n
    ):
        raise ValueError(
            f"{P.name}: CVXPY rewrote the variable x (a structured attribute such as symmetric=True?); "
            "declare x as a plain cp.Variable"
        )
    x_cols[labels - 1] = nonzero
    A = data["A"].tocsr().toarray() if hasattr(data["A"], "tocsr") else np.asarray(data["A"])
    b = np.asarray(data["b"], dtype=np.float64)
    m_zero, m_nonneg = int(dims.zero), int(dims.nonneg)
    if m_zero + m_nonneg != A.shape[0]:
        raise ValueError(f"{P.name}: unexpected cone dimensions {dims} in the canonicalized declaration")
    # Reorder the columns: x (row-major) first, then the auxiliary columns in CVXPY's order.
    aux = np.setdiff1d(np.arange(n_cols), x_cols)
    order = np.concatenate([x_cols, aux])
    A = A[:, order]
    lower = np.full(n_cols, -np.inf)
    upper = np.full(n_cols, np.inf)
    for key, target, pick in (("lower_bounds", lower, np.maximum), ("upper_bounds", upper, np.minimum)):
        bound = data.get(key)
        if bound is not None:
            target[:] = pick(target, np.asarray(bound, dtype=np.float64)[order])
    return A[:m_zero], b[:m_zero], A[m_zero:], b[m_zero:], lower, upper, n, n_cols - n


def _build(P) -> LinearForm:
    A_eq, b_eq, A_in, b_in, lower, upper, n, n_aux = _stuffed(P)
    name = P.name

    def scaled(A, b):
        scale = np.abs(A).max(axis=1) if A.shape[1] else np.zeros(A.shape[0])
        keep = scale > 0
        A, b, scale = A[keep], b[keep], scale[keep]
        A = A / scale[:, None]
        b = b / scale
        A[np.abs(A) < COEFFICIENT_TOLERANCE] = 0.0
        return A, b, keep

    # All-zero rows: 0 = b or 0 <= b.
    zero_eq = np.abs(A_eq).max(axis=1, initial=0) == 0
    if np.any(np.abs(b_eq[zero_eq]) > RANK_TOLERANCE) or np.any(
        b_in[np.abs(A_in).max(axis=1, initial=0) == 0] < -RANK_TOLERANCE
    ):
        raise ValueError(f"constraints: the polytope {name} is empty (a constant constraint is violated)")
    A_eq, b_eq, _ = scaled(A_eq, b_eq)
    A_in, b_in, _ = scaled(A_in, b_in)

    # Single-variable rows become bounds.
    def single(A):
        nnz = (A != 0).sum(axis=1)
        return nnz == 1

    for A, b, is_eq in ((A_eq, b_eq, True), (A_in, b_in, False)):
        rows = np.flatnonzero(single(A))
        for r in rows:
            j = int(np.flatnonzero(A[r])[0])
            value = b[r] / A[r, j]
            if is_eq:
                lower[j] = max(lower[j], value)
                upper[j] = min(upper[j], value)
            elif A[r, j] > 0:
                upper[j] = min(upper[j], value)
            else:
                lower[j] = max(lower[j], value)
    A_eq, b_eq = A_eq[~single(A_eq)], b_eq[~single(A_eq)]
    A_in, b_in = A_in[~single(A_in)], b_in[~single(A_in)]
    if np.any(lower > upper + RANK_TOLERANCE * np.maximum(1.0, np.abs(lower))):
        j = int(np.flatnonzero(lower > upper + RANK_TOLERANCE * np.maximum(1.0, np.abs(lower)))[0])
        raise ValueError(f"constraints: the polytope {name} is empty (column {j} has bounds {lower[j]} > {upper[j]})")
    upper = np.maximum(upper, lower) + 0.0  # + 0.0 turns -0.0 into 0.0
    lower = lower + 0.0

    # Inequality rows implied by the bounds: max over the box of g.v <= h.
    if len(A_in):
        with np.errstate(invalid="ignore"):  # 0 * inf where a coefficient is zero, masked below
            box_max = np.where(A_in > 0, A_in * upper, 0.0) + np.where(A_in < 0, A_in * lower, 0.0)
        box_max = np.where(A_in == 0, 0.0, box_max).sum(axis=1)
        implied = box_max <= b_in + RANK_TOLERANCE * np.maximum(1.0, np.abs(b_in))
        A_in, b_in = A_in[~implied], b_in[~implied]

    # Duplicate inequalities (keep the tightest), and opposite pairs with equal sides become equalities.
    A_in, b_in, A_pairs, b_pairs = _merge_inequalities(A_in, b_in)
    A_eq = np.concatenate([A_eq, A_pairs]) if len(A_pairs) else A_eq
    b_eq = np.concatenate([b_eq, b_pairs]) if len(b_pairs) else b_eq

    # Canonical sign of equalities: first non-zero coefficient positive; then drop dependent rows.
    if len(A_eq):
        first = A_eq[np.arange(len(A_eq)), (A_eq != 0).argmax(axis=1)]
        sign = np.where(first < 0, -1.0, 1.0)
        A_eq, b_eq = A_eq * sign[:, None], b_eq * sign
        A_eq, b_eq = _independent_rows(A_eq, b_eq, name)

    t = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float64)
    n_vars = n + n_aux
    return LinearForm(
        torch.Size(P.event_shape),
        n_aux,
        t(A_eq.reshape(-1, n_vars)),
        t(b_eq),
        t(A_in.reshape(-1, n_vars)),
        t(b_in),
        t(lower),
        t(upper),
    )


def _merge_inequalities(A, b):
    """Drop duplicate rows of ``A v <= b`` (keeping the smallest ``b``) and turn each pair
    ``a v <= c``, ``-a v <= -c`` into an equality; returns ``(A, b, A_eq, b_eq)``."""
    if not len(A):
        return A, b, A[:0], b[:0]
    key = np.round(A, 12) + 0.0  # + 0.0 turns -0.0 into 0.0, so equal rows have equal bytes
    kept = {}
    for r in range(len(A)):
        k = key[r].tobytes()
        if k not in kept or b[r] < b[kept[k]]:
            kept[k] = r
    rows = sorted(kept.values())
    used = set()
    pairs = []
    for r in rows:
        if r in used:
            continue
        partner = kept.get((np.round(-A[r], 12) + 0.0).tobytes())
        if partner is not None and partner not in used and partner != r:
            if abs(b[r] + b[partner]) <= RANK_TOLERANCE * max(1.0, abs(b[r])):
                used.update((r, partner))
                pairs.append(r)
            elif b[r] + b[partner] < -RANK_TOLERANCE * max(1.0, abs(b[r])):
                raise ValueError("constraints: the polytope is empty (two opposite inequalities contradict)")
    rest = [r for r in rows if r not in used]
    return A[rest], b[rest], A[pairs], b[pairs]


def _independent_rows(A, b, name):
    """A maximal set of independent rows of ``A v = b``, the earliest ones in the declaration's
    order (Gram-Schmidt with re-orthogonalization, a rank-revealing sweep), after checking that
    the dropped rows are consistent with the kept ones."""
    basis = np.zeros((0, A.shape[1]))
    keep, drop = [], []
    for r in range(len(A)):
        v = A[r].copy()
        for _ in range(2):  # twice is enough (Kahan-Parlett)
            v -= basis.T @ (basis @ v)
        norm = np.linalg.norm(v)
        if norm > RANK_TOLERANCE * max(1.0, np.linalg.norm(A[r])):
            basis = np.vstack([basis, v / norm])
            keep.append(r)
        else:
            drop.append(r)
    if drop:
        coef, *_ = np.linalg.lstsq(A[keep].T, A[drop].T, rcond=None)
        if np.any(np.abs(coef.T @ b[keep] - b[drop]) > 1e-8 * np.maximum(1.0, np.abs(b[drop]))):
            raise ValueError(f"constraints: the polytope {name} is empty (dependent equality rows disagree)")
    return A[keep], b[keep]
