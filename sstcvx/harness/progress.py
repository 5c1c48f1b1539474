"""The progress bar of the long-running commands (bench, lab): tqdm on stderr, or nothing."""

from __future__ import annotations

import sys


class _NoBar:
    """The bar's interface, doing nothing (``--no-progress``)."""

    def update(self, _):
        pass

    def set_description(self, _):
        pass

    def close(self):
        pass


def progress_bar(total: int, enabled: bool, unit: str, **options):
    """A tqdm bar of ``total`` steps on stderr (left off the screen when done), or a silent stand-in."""
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False, **options)
