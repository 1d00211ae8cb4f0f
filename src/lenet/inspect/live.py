"""The book's animator in a notebook: training curves redrawn in place while a model trains.

    >>> result = train(TrainConfig(epochs=10), plot=True)   # in Jupyter: one figure, updated live

:func:`live_plot` gives a :class:`LivePlot` only inside a Jupyter kernel; in a terminal or a
script it gives None and training prints as it always does. The figure is drawn off-screen and
shown as a PNG whose display is replaced at each point, so it works in any Jupyter front end
without a matplotlib backend or widget extension.
"""

from __future__ import annotations

import io
from typing import Sequence

from .plots import curves_figure


def in_notebook() -> bool:
    """Whether this code runs inside a Jupyter kernel (not a terminal IPython or plain Python)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and hasattr(shell, "kernel")


class LivePlot:
    """One figure in the notebook's output, redrawn by :meth:`update`."""

    def __init__(self, epochs: int, title: str = ""):
        from IPython.display import display

        self.epochs, self.title = epochs, title
        self.handle = display(self._image([]), display_id=True)

    def _image(self, curve: Sequence[dict]):
        from IPython.display import Image

        buf = io.BytesIO()
        curves_figure(curve, self.title, epochs=self.epochs).savefig(buf, format="png")
        return Image(data=buf.getvalue(), format="png")

    def update(self, curve: Sequence[dict]) -> None:
        self.handle.update(self._image(curve))


def live_plot(enabled: bool, epochs: int, title: str = "") -> LivePlot | None:
    """A :class:`LivePlot` when asked for and inside a notebook, else None."""
    return LivePlot(epochs, title) if enabled and in_notebook() else None
