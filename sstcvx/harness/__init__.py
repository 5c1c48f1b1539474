"""The tooling above the core and the families: compare, bench, demo and the command line.

It is the only part of sstcvx that loads polytope families, and it finds them through the
family registry (:mod:`sstcvx.families`), never by name.
"""
