"""A data set for tests/test_reliability.py's data-loader test, in a module of its own so that
the spawned worker processes import only this, torch and sstcvx (not pytest or the test module)."""

import torch

import sstcvx


class LPDataset(torch.utils.data.Dataset):
    """Hard samples of a polytope, computed in the data-loader's worker processes."""

    def __init__(self, P, U):
        self.P, self.U = P, U

    def __len__(self):
        return self.U.shape[0]

    def __getitem__(self, i):
        return sstcvx.argmax(self.P, self.U[i], solver="generic")
