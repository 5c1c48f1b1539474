"""A family is one module: a third-party package declares one and gets the contract suite and ``sstcvx compare``.

The test writes, into a temporary folder, a package ``toy_groups`` of one module (the polytope
"one item per group", its CVXPY declaration and vertex list, a specialized argmax and two
specialized relaxations, one ``register_family``) and the ``*.dist-info`` folder that declares
the module in the ``sstcvx.families`` entry-point group, as ``pip install`` would.  With that
folder on ``PYTHONPATH`` and nothing changed in ``sstcvx`` or ``polytopes``, subprocesses run
(a) the contract suite on the new family and (b) ``python -m sstcvx compare one_per_group``.
"""

import os
import pathlib
import re
import subprocess
import sys
import textwrap

from sstcvx.families import families

ROOT = pathlib.Path(__file__).resolve().parents[1]
NAME = "one_per_group"

MODULE = '''
"""One item per group: x in {0, 1}^(g m) with exactly one 1 in each of g consecutive groups of m coordinates.

P is a product of g simplices: the relaxations and the argmax act group by group.
"""

import itertools

import cvxpy as cp
import torch

from sstcvx import Polytope, register_argmax, register_relaxation
from sstcvx.families import Family, register_family


class OneItemPerGroup(Polytope):
    """conv of the vectors with one 1 per group; ``OneItemPerGroup(groups, items)``, event shape (groups * items,)."""

    def __init__(self, groups, items):
        super().__init__((groups * items,), name=f"OneItemPerGroup(groups={groups}, items={items})")
        self.groups, self.items = groups, items

    def _declare(self):
        x = cp.Variable(self.groups * self.items)
        per_group = cp.reshape(x, (self.groups, self.items), order="C")
        return x, [x >= 0, cp.sum(per_group, axis=1) == 1]

    def _enumerate_vertices(self):
        if self.items**self.groups > 5000:
            return None
        eye = torch.eye(self.items, dtype=torch.float64)
        choices = itertools.product(range(self.items), repeat=self.groups)
        return torch.stack([eye[list(choice)].reshape(-1) for choice in choices])


def _per_group(P, Z):
    return Z.reshape(Z.shape[0], P.groups, P.items)


@register_argmax(OneItemPerGroup)
def best_item_per_group(P, U):
    G = _per_group(P, U)
    return torch.zeros_like(G).scatter_(-1, G.argmax(-1, keepdim=True), 1.0).reshape(U.shape)


@register_relaxation(OneItemPerGroup, "entropy")
@register_relaxation(OneItemPerGroup, "exp_family_entropy")  # independent groups: the same marginals
def softmax_per_group(P, Z):
    return torch.softmax(_per_group(P, Z), -1).reshape(Z.shape)


register_family(
    Family(
        name="one_per_group",
        make=lambda n, k: OneItemPerGroup(n, 3 if k is None else k),
        regularizers=("entropy", "exp_family_entropy"),
        n=3,
        sizes=(2, 3, 4),
        quick_sizes=(2, 3),
        max_generic_n=4,
        device_check_n=8,
        quick_device_check_n=3,
        uses_k=True,
    )
)
'''


def write_package(folder: pathlib.Path) -> None:
    (folder / "toy_groups.py").write_text(textwrap.dedent(MODULE))
    info = folder / "toy_groups-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-groups\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[sstcvx.families]\ntoy_groups = toy_groups\n")


def test_a_family_is_one_module(tmp_path):
    # the family exists nowhere in this process, in sstcvx or in polytopes
    assert NAME not in families()
    for package in ("sstcvx", "polytopes"):
        for source in (ROOT / package).rglob("*.py"):
            assert NAME not in source.read_text() and "OneItemPerGroup" not in source.read_text(), source
    write_package(tmp_path)
    path = os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}  # two small subprocesses side by side
    run = {"cwd": ROOT, "env": env, "stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    contract = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "tests/test_contract.py", "-k", NAME],
        **run,
    )
    compare = subprocess.Popen(
        [sys.executable, "-m", "sstcvx", "compare", NAME, "--batch", "2", "--repeats", "0"], **run
    )
    contract_output, _ = contract.communicate(timeout=300)
    compare_output, _ = compare.communicate(timeout=300)

    # (a) every test of the contract suite ran on the new family and passed
    assert contract.returncode == 0, contract_output
    contract_tests = set(
        re.findall(r"^def (test_\w+)", (ROOT / "tests" / "test_contract.py").read_text(), re.MULTILINE)
    )
    passed = set(
        re.findall(rf"^PASSED tests/test_contract.py::(test_\w+)\[[^\]]*{NAME}", contract_output, re.MULTILINE)
    )
    assert passed == contract_tests, contract_output
    assert not re.search(r"\b(failed|skipped|error)", contract_output), contract_output

    # (b) sstcvx compare lists it, the generic path against the specialized solver, for both relaxations
    assert compare.returncode == 0, compare_output
    assert "comparing on OneItemPerGroup(groups=3, items=3)" in compare_output, compare_output  # the default size
    rows = [line.split() for line in compare_output.splitlines() if line.startswith("OneItemPerGroup(")]
    assert sorted(row[1] for row in rows) == ["entropy", "exp_family_entropy"], compare_output
    for row in rows:
        assert row[4] == "specialized" and float(row[5]) < 1e-5, compare_output  # reference, max|dX|
