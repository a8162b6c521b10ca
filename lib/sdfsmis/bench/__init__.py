"""``sdfsmis bench``: timings, not tests, run on generated inputs in one process so that both sides
of a comparison see the same inputs, weights and machine load.

Two suites: :mod:`~sdfsmis.bench.released` times our SD-FSMIS inference (and training) against the
released pipeline's formulation and checks both give the same masks; :mod:`~sdfsmis.bench.dpl`
times DPL against SD-FSMIS on the same query slices and supports. :mod:`~sdfsmis.bench.common`
holds what they share; the command itself is :mod:`sdfsmis.cli.bench`.
"""
