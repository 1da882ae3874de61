"""The benchmarks of DESIGN.md, each beside its raw baseline (see bench/README.md).

Each later issue adds its benchmarks here with :func:`mabeam.bench.core.benchmark`.
"""

from __future__ import annotations
