"""The known families by their command-line names, for ``sstcvx compare``, ``sstcvx bench`` and ``sstcvx demo``.

``FAMILIES[name]`` is a :class:`Family`: call it as ``FAMILIES[name](n, k)`` to get a
polytope (``k`` is used by ``ksubset`` only; ``None`` picks the default), and read
from it the regularizers worth comparing on that family and sensible sizes:

* ``n``: the default size of ``sstcvx compare`` and the demo;
* ``sizes`` / ``quick_sizes``: the sizes swept by ``sstcvx bench`` (full / ``--quick``);
* ``max_generic_n``: the largest n at which the bench also runs the generic CVXPY
  path.  The tree families' CVXPY declarations have one row per vertex subset
  (2^n of them), and their generic ``exp_family_entropy`` is a conic problem over the
  weights of ``P.vertices`` (n^(n-2) trees), so the generic path is only run for small n.

Each family's module is imported when the family is first called, so that a
family whose module is missing or broken fails alone, with its import error.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field


class FamilyUnavailable(ImportError):
    """The module that defines a family cannot be imported."""


@dataclass(frozen=True)
class Family:
    """A polytope family: a factory ``(n, k) -> Polytope`` plus its default comparison settings."""

    name: str
    module: str
    cls: str
    regularizers: tuple
    n: int
    sizes: tuple
    quick_sizes: tuple
    max_generic_n: int
    uses_k: bool = False
    description: str = ""
    extra: dict = field(default_factory=dict)

    def polytope_class(self):
        """The family's Polytope subclass (imports its module: registers its solvers)."""
        try:
            module = importlib.import_module(self.module)
        except ImportError as error:
            raise FamilyUnavailable(f"family {self.name!r}: cannot import {self.module} ({error})") from error
        try:
            return getattr(module, self.cls)
        except AttributeError:
            raise FamilyUnavailable(f"family {self.name!r}: {self.module} defines no {self.cls}") from None

    def default_k(self, n: int) -> int | None:
        """k for ``ksubset`` when not given: about n / 3, within 1 <= k <= n - 1."""
        if not self.uses_k:
            return None
        return max(1, min(n - 1, n // 3))

    def __call__(self, n: int | None = None, k: int | None = None):
        n = self.n if n is None else n
        cls = self.polytope_class()
        if self.uses_k:
            return cls(n, self.default_k(n) if k is None else k)
        return cls(n, **self.extra)


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family(
            "simplex",
            "polytopes.simplex",
            "Simplex",
            ("entropy", "euclidean", "exp_family_entropy"),
            n=10,
            sizes=(5, 10, 20, 50, 100, 300, 1000),
            quick_sizes=(5, 20, 100),
            max_generic_n=300,
            description="one-hot vectors of length n (softmax, sparsemax)",
        ),
        Family(
            "hypercube",
            "polytopes.hypercube",
            "Hypercube",
            ("binary_entropy", "euclidean"),
            n=10,
            sizes=(5, 10, 20, 50, 100, 300, 1000),
            quick_sizes=(5, 20, 100),
            max_generic_n=300,
            description="all 0/1 vectors of length n (sigmoid, clamp)",
        ),
        Family(
            "ksubset",
            "polytopes.ksubset",
            "KSubset",
            ("binary_entropy", "euclidean", "exp_family_entropy"),
            n=10,
            sizes=(6, 10, 20, 50, 100, 300, 1000),
            quick_sizes=(6, 20, 100),
            max_generic_n=300,
            uses_k=True,
            description="k-hot vectors of length n, k = n // 3 by default (LML, capped simplex, DP)",
        ),
        Family(
            "permutation",
            "polytopes.permutation",
            "Permutation",
            ("entropy", "euclidean"),
            n=4,
            sizes=(3, 4, 6, 8, 12, 16, 32),
            quick_sizes=(3, 5, 8),
            max_generic_n=12,
            description="n x n permutation matrices, the Birkhoff polytope (Sinkhorn, Euclidean projection)",
        ),
        Family(
            "spanning_tree",
            "polytopes.spanning_tree",
            "SpanningTree",
            ("exp_family_entropy",),
            n=5,
            sizes=(3, 4, 5, 6, 8, 12, 16, 32),
            quick_sizes=(3, 4, 5),
            max_generic_n=6,
            description="spanning trees of the complete graph on n vertices (Matrix-Tree theorem)",
        ),
        Family(
            "arborescence",
            "polytopes.arborescence",
            "Arborescence",
            ("exp_family_entropy",),
            n=5,
            sizes=(3, 4, 5, 6, 8, 12, 16, 32),
            quick_sizes=(3, 4, 5),
            max_generic_n=6,
            description="arborescences rooted at 0 of the complete digraph on n vertices (Tutte)",
            extra={"root": 0},
        ),
    )
}
