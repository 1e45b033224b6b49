"""Offline long-context evaluation: RULER tasks, MRCR-style coreference, needle heatmaps, a runner.

See ``docs/eval.md``. Modules: ``ruler``, ``mrcr``, ``niah``, ``runner`` (and ``cli`` for ``subquad eval``).
"""

from . import mrcr, niah, ruler, runner
from ._core import Sample, parse_lengths

__all__ = ["Sample", "mrcr", "niah", "parse_lengths", "ruler", "runner"]
