"""Figures without global state: a bare matplotlib Figure on the Agg canvas (no pyplot), rendered in memory
and written atomically, so bad input or a plotting error leaves no half-written file. No JAX."""
from __future__ import annotations

import io

from mhr_jax.storage import write_bytes_atomic


def figure(width: float, height: float):
  """A matplotlib Figure of `width` x `height` inches with its own Agg canvas."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(width, height), dpi=100)
  FigureCanvasAgg(fig)
  return fig


def write_png(fig, path: str, dpi: int = 110) -> None:
  """Renders `fig` in memory, then writes the PNG to `path` atomically."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
  write_bytes_atomic(path, buffer.getvalue())
