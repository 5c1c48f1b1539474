"""The library of known polytope families with specialised solvers.

Importing this package registers every family's hard argmax and relaxed
solvers with :mod:`sstcvx`, so that ``sstcvx.relax``/``argmax``/``sample``
with ``solver="auto"`` take the fast path on these classes.
"""

from .hypercube import Hypercube
from .ksubset import KSubset
from .simplex import Simplex

__all__ = ["Simplex", "Hypercube", "KSubset"]

# These families are being written concurrently; the guard lets the package import while any of
# them is missing.  The lead removes it once all three modules have landed.
try:
    from .permutation import Permutation

    __all__.append("Permutation")
except ModuleNotFoundError as error:
    if error.name != f"{__name__}.permutation":
        raise
try:
    from .spanning_tree import SpanningTree

    __all__.append("SpanningTree")
except ModuleNotFoundError as error:
    if error.name != f"{__name__}.spanning_tree":
        raise
try:
    from .arborescence import Arborescence

    __all__.append("Arborescence")
except ModuleNotFoundError as error:
    if error.name != f"{__name__}.arborescence":
        raise
