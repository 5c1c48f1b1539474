"""The library of known polytope families with specialised solvers.

Importing this package registers every family's hard argmax and relaxed
solvers with :mod:`sstcvx`, so that ``sstcvx.relax``/``argmax``/``sample``
with ``solver="auto"`` take the fast path on these classes.
"""

from .arborescence import Arborescence
from .hypercube import Hypercube
from .ksubset import KSubset
from .permutation import Permutation
from .simplex import Simplex
from .spanning_tree import SpanningTree

__all__ = ["Simplex", "Hypercube", "KSubset", "Permutation", "SpanningTree", "Arborescence"]
