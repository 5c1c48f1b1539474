"""The library of known polytope families with specialized solvers.

Importing this package imports every family module; each registers its solvers with
:mod:`sstcvx.registry` and its tooling facts with :mod:`sstcvx.families`, so that
``sstcvx.relax``/``argmax``/``sample`` with ``solver="auto"`` take the fast path on these
classes and ``sstcvx compare``/``bench``/``demo`` list them.  A new family is one module
here plus its import line below.
"""

from .arborescence import Arborescence
from .correlated_ksubset import CorrelatedKSubset
from .hypercube import Hypercube
from .ksubset import KSubset
from .permutation import Permutation
from .product_simplex import ProductSimplex
from .simplex import Simplex
from .spanning_tree import SpanningTree

__all__ = [
    "Simplex",
    "Hypercube",
    "KSubset",
    "CorrelatedKSubset",
    "ProductSimplex",
    "Permutation",
    "SpanningTree",
    "Arborescence",
]
