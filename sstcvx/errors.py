"""Exceptions raised by sstcvx."""


class SolverError(RuntimeError):
    """A solver failed on one element of a batch.

    Attributes name the batch element (its index in the flattened batch), the
    solver and the status it reported, so that a failure inside a batch of 256
    can be reproduced on its own.
    """

    def __init__(self, message, *, element=None, solver=None, status=None):
        super().__init__(message)
        self.element = element
        self.solver = solver
        self.status = status


class SecondDerivativeError(RuntimeError):
    """A double backward (``create_graph=True``) through a path that is differentiable only once
    (the generic cvxpylayers path): raised instead of silently dropping second-order terms."""
