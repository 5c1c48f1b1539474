"""Recognition of known polytope families in a CVXPY declaration.

A user who declares ``x = cp.Variable(8); [x >= 0, x <= 1, cp.sum(x) == 3]`` has declared
the k-subset polytope; :func:`recognize` finds that out from the declaration's canonical
linear form (:mod:`sstcvx.linear_form`) so that the family's fast solvers serve it.

**Who does what.**  Each family registers a recognizer with its
:class:`sstcvx.families.Family` (``recognize=``): ``recognize(form) -> Match or None``.  It
only *proposes* a candidate: the family's polytope Q and the coordinate map (``index``,
family coordinate ``i`` is the declaration's flattened coordinate ``index[i]``); it may use
any cheap structural test to find one.  The core then *certifies* the candidate
(:func:`mismatch`), and a declaration is recognized only when the certificate holds, so a
wrong guess costs a false negative, never a wrong answer.

**The certificate (exact, not heuristic).**  Let P be the declared set, mapped to the
family's coordinates, and Q the family's polytope with its own canonical form
``A_Q x = b_Q, G_Q x <= h_Q, l_Q <= x <= u_Q`` (from Q's CVXPY declaration; no auxiliary
variables on either side).  P = Q when both inclusions hold:

* P ⊆ Q: every constraint of Q is implied by P's: each equality row ``[a_Q | b_Q]`` is a
  linear combination of P's equality rows ``[A | b]`` (least squares, residual ~ 0); P's
  bounds are at least as tight as Q's; each inequality row of Q appears among P's (the
  rows have a canonical scale) with a right-hand side no larger;
* Q ⊆ P: every constraint of P holds on all of Q, which is checked at Q's vertices through
  the family's LP oracle (its registered argmax, exact for these combinatorial sets):
  ``max_Q <a, x> = min_Q <a, x> = b`` for each equality row, ``max_Q <g, x> <= h`` for each
  inequality row, and ``min_Q x_j >= l_j``, ``max_Q x_j <= u_j`` for each bound of P that
  Q's own bound does not already imply.

Comparisons use a tolerance of 1e-9 relative to the row's scale, far below any difference
between distinct rational constraints of moderate size.  One extra row that cuts Q, a
changed right-hand side, a missing bound or a looser box fails one of the two inclusions.

**Routing.**  A recognized :class:`sstcvx.polytope.DeclaredPolytope` carries a :class:`Recognition`
as ``P.recognized``; :mod:`sstcvx.registry` then serves P with Q's registered solvers,
composed with the coordinate map (:meth:`Recognition.relaxation`, :meth:`Recognition.argmax`).

**Cost.**  The declaration's linear form (one CVXPY canonicalization, needed anyway by the
fast generic path and cached), Q's linear form, one LP-oracle call per row of P (batched)
and, for recognizers that need the structure of the equality rows, an orthonormal basis of
their span (O(n m^2)) and the n x n projector onto it.  Families are loaded
(:func:`sstcvx.families.families`) on the first recognition only.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

#: Relative tolerance of the certificate's comparisons.
TOLERANCE = 1e-9
#: LP-oracle directions per batch (bounds the memory of the Q ⊆ P check).
ORACLE_CHUNK = 4096


@dataclass(frozen=True, eq=False)
class Match:
    """A recognizer's candidate: the family's polytope and where its coordinates are.

    Attributes:
        polytope: the family's polytope Q (an instance of the family's class).
        index: a permutation of ``range(n)`` (sequence or integer tensor): the family's
            flattened (row-major) coordinate ``i`` is the declaration's flattened coordinate
            ``index[i]``.
    """

    polytope: Any
    index: Any


class Recognition:
    """What a declaration was recognized as: family ``family``, polytope ``polytope`` (Q), and
    the coordinate map between Q's event shape and the declaration's (``event_shape``).

    ``index`` (LongTensor ``(n,)``): Q's flattened coordinate ``i`` is the declaration's
    flattened coordinate ``index[i]``; ``identity`` is True when no permutation is needed
    (then the maps are reshapes).  Maps cost one gather per call.
    """

    def __init__(self, family: str, polytope, index, event_shape):
        self.family = family
        self.polytope = polytope
        self.event_shape = torch.Size(event_shape)
        self.index = torch.as_tensor(np.asarray(index, dtype=np.int64))
        self.inverse = torch.empty_like(self.index)
        self.inverse[self.index] = torch.arange(len(self.index))
        self.identity = bool(torch.equal(self.index, torch.arange(len(self.index))))
        self._on_device: dict = {}

    def _indices(self, device):
        key = str(device)
        pair = self._on_device.get(key)
        if pair is None:
            pair = self._on_device[key] = (self.index.to(device), self.inverse.to(device))
        return pair

    def to_family(self, T: torch.Tensor) -> torch.Tensor:
        """``T`` ``(B, *event_shape)`` in the declaration's coordinates -> ``(B, *Q.event_shape)``."""
        flat = T.reshape(T.shape[0], -1)
        if not self.identity:
            flat = flat.index_select(-1, self._indices(T.device)[0])
        return flat.reshape((T.shape[0],) + tuple(self.polytope.event_shape))

    def from_family(self, X: torch.Tensor) -> torch.Tensor:
        """``X`` ``(B, *Q.event_shape)`` -> ``(B, *event_shape)`` in the declaration's coordinates."""
        flat = X.reshape(X.shape[0], -1)
        if not self.identity:
            flat = flat.index_select(-1, self._indices(X.device)[1])
        return flat.reshape((X.shape[0],) + tuple(self.event_shape))

    def relaxation(self, fn):
        """The registered relaxation ``fn(Q, Z)`` of Q as a solver ``(P, Z) -> X`` of the declaration."""
        return lambda P, Z: self.from_family(fn(self.polytope, self.to_family(Z)))

    def argmax(self, fn):
        """The registered argmax ``fn(Q, U)`` of Q as an argmax ``(P, U) -> X`` of the declaration."""
        return lambda P, U: self.from_family(fn(self.polytope, self.to_family(U)))

    def vertices(self):
        """Q's vertex list in the declaration's coordinates, or ``None`` when Q lists none."""
        V = self.polytope.vertices
        return None if V is None else self.from_family(V)

    def __repr__(self):
        mapping = "same coordinates" if self.identity else "coordinates permuted"
        return f"Recognition({self.polytope.name}, family={self.family!r}, {mapping})"


# ----------------------------------------------------------------------------------------------
# the certificate
# ----------------------------------------------------------------------------------------------


def _support(Q, C: np.ndarray) -> np.ndarray:
    """max_{x in Q} <c, x> for each row c of C (m, n), through Q's LP oracle."""
    from . import registry

    fn = registry.find_argmax(Q)
    V = None
    if fn is None:
        V = Q.vertices
        if V is None:
            raise LookupError(f"{Q.name} has neither a registered argmax nor a vertex list")
        V = V.reshape(V.shape[0], -1).numpy()
    out = np.empty(C.shape[0])
    for start in range(0, C.shape[0], ORACLE_CHUNK):
        block = C[start : start + ORACLE_CHUNK]
        if V is not None:
            out[start : start + len(block)] = (block @ V.T).max(axis=1)
            continue
        U = torch.from_numpy(np.ascontiguousarray(block)).reshape((len(block),) + tuple(Q.event_shape))
        X = fn(Q, U).reshape(len(block), -1).to(torch.float64).numpy()
        out[start : start + len(block)] = (block * X).sum(axis=1)
    return out


def mismatch(form, Q, index) -> str | None:
    """Why the declared set of ``form`` is not Q under the coordinate map ``index``, or ``None``
    when it provably is (see the module docstring for the two inclusions checked)."""
    n = form.n
    if form.n_aux:
        return "the declaration has auxiliary variables"
    if int(np.prod(tuple(Q.event_shape))) != n:
        return f"{Q.name} has {int(np.prod(tuple(Q.event_shape)))} coordinates, the declaration {n}"
    idx = np.asarray(index, dtype=np.int64).reshape(-1)
    if idx.shape != (n,) or not np.array_equal(np.sort(idx), np.arange(n)):
        return "index is not a permutation of the coordinates"
    try:
        QF = Q.linear_form()
    except ValueError as error:
        return f"{Q.name} has no linear form ({error})"
    if QF.n_aux:
        return f"{Q.name} is declared with auxiliary variables"
    A, b = form.A.numpy()[:, idx], form.b.numpy()
    G, h = form.G.numpy()[:, idx], form.h.numpy()
    lower, upper = form.lower.numpy()[idx], form.upper.numpy()[idx]
    AQ, bQ, GQ, hQ = QF.A.numpy(), QF.b.numpy(), QF.G.numpy(), QF.h.numpy()
    lowerQ, upperQ = QF.lower.numpy(), QF.upper.numpy()
    tol = TOLERANCE

    # P ⊆ Q: Q's bounds, equalities and inequalities are implied by P's.
    with np.errstate(invalid="ignore"):
        if np.any(lower < lowerQ - tol * (1 + np.abs(lowerQ))):
            j = int(np.flatnonzero(lower < lowerQ - tol * (1 + np.abs(lowerQ)))[0])
            return f"family coordinate {j} needs the lower bound {lowerQ[j]:g}, declared {lower[j]:g}"
        if np.any(upper > upperQ + tol * (1 + np.abs(upperQ))):
            j = int(np.flatnonzero(upper > upperQ + tol * (1 + np.abs(upperQ)))[0])
            return f"family coordinate {j} needs the upper bound {upperQ[j]:g}, declared {upper[j]:g}"
    if len(AQ):
        if not len(A):
            return f"the declaration has no equality rows; {Q.name} needs {len(AQ)}"
        # the distance of Q's rows [a_Q | b_Q] from the span of P's rows [A | b] (an orthonormal basis
        # of the span by QR; P's rows are independent, so its columns all count)
        basis = torch.linalg.qr(torch.from_numpy(np.hstack([A, b[:, None]]).T)).Q.numpy()  # torch: its thread setting
        target = np.hstack([AQ, bQ[:, None]]).T
        residual = np.abs(target - basis @ (basis.T @ target)).max()
        if residual > 1e-8 * (1 + np.abs(target).max()):
            return f"the declared equalities do not imply {Q.name}'s (residual {residual:.2g})"
    for r in range(len(GQ)):
        same = np.abs(G - GQ[r]).max(axis=1) <= 1e-12 if len(G) else np.zeros(0, dtype=bool)
        if not np.any(same & (h <= hQ[r] + tol * (1 + abs(hQ[r])))):
            return f"inequality row {r} of {Q.name} is not among the declared rows"

    # Q ⊆ P: P's rows and bounds hold at every vertex of Q (LP oracle).
    eye = np.eye(n)
    with np.errstate(invalid="ignore"):  # inf - inf where a bound is absent, masked by isfinite
        strict_lower = np.flatnonzero(np.isfinite(lower) & (lower > lowerQ + tol * (1 + np.abs(lower))))
        strict_upper = np.flatnonzero(np.isfinite(upper) & (upper < upperQ - tol * (1 + np.abs(upper))))
    C = np.vstack([A, -A, G, -eye[strict_lower], eye[strict_upper]])
    rhs = np.concatenate([b, -b, h, -lower[strict_lower], upper[strict_upper]])
    if len(C):
        try:
            values = _support(Q, C)
        except LookupError as error:
            return str(error)
        scale = 1 + np.abs(rhs) + np.abs(C).sum(axis=1)
        bad = values > rhs + tol * scale
        if np.any(bad):
            r = int(np.flatnonzero(bad)[0])
            kinds = (
                ["equality"] * (2 * len(A))
                + ["inequality"] * len(G)
                + ["bound"] * (len(strict_lower) + len(strict_upper))
            )
            return f"a declared {kinds[r]} constraint cuts {Q.name} (max over it {values[r]:.6g} > {rhs[r]:.6g})"
    return None


def certify(form, Q, index) -> bool:
    """Whether the declared set of ``form`` is exactly Q under ``index`` (see :func:`mismatch`)."""
    return mismatch(form, Q, index) is None


# ----------------------------------------------------------------------------------------------
# helpers for recognizers
# ----------------------------------------------------------------------------------------------


def row_space_projector(form) -> np.ndarray:
    """The ``(n, n)`` orthogonal projector onto the span of the equality rows (their x columns).

    It does not depend on how the equalities were written (scaled, combined, reordered), so
    recognizers read structure from it: entry (i, j) is non-zero only if some equality
    couples coordinates i and j.  Cost O(n m^2 + n^2 m) for m rows.
    """
    A = form.A[:, : form.n]
    if not len(A):
        return np.zeros((form.n, form.n))
    basis = torch.linalg.qr(A.T).Q  # (n, m), orthonormal columns spanning the rows (independent)
    return (basis @ basis.T).numpy()


def recognize(P) -> Recognition | None:
    """The family that P's CVXPY declaration provably describes, or ``None``.

    Computes P's linear form (``None`` when it has none: a non-linear declaration), then asks
    every registered family's recognizer in registration order and returns the first candidate
    that passes :func:`mismatch`.  A recognizer that raises is skipped with a ``RuntimeWarning``.
    """
    try:
        form = P.linear_form()
    except ValueError:
        return None
    if form.n_aux:
        return None
    from .families import families  # loads the entry-point family packages, once

    for family in families().values():
        if family.recognize is None:
            continue
        try:
            match = family.recognize(form)
            if match is None:
                continue
            if not isinstance(match, Match):
                raise TypeError(f"expected an sstcvx.recognition.Match or None, got {type(match).__name__}")
            reason = mismatch(form, match.polytope, match.index)
        except Exception as error:  # a broken recognizer must not break a declaration
            warnings.warn(
                f"the recognizer of family {family.name!r} failed on {P.name}: {type(error).__name__}: {error}",
                RuntimeWarning,
                stacklevel=3,
            )
            continue
        if reason is None:
            return Recognition(family.name, match.polytope, match.index, P.event_shape)
    return None
