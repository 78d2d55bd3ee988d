"""What the PNG plots of csext share: matplotlib where installed, the remaining-fraction axis,
and an atomic save."""

import io

from .files import write_atomic


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def remaining_axis(ax, values, log: bool | None = None) -> None:
    """An x axis of remaining fractions in percent, sparsest on the right; logarithmic when
    `log`, or (log=None) when the values span more than a decade."""
    from matplotlib.ticker import PercentFormatter

    positive = [v for v in values if v > 0]
    if log or (log is None and positive and max(positive) > 10 * min(positive)):
        log_percent_scale(ax.xaxis)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.invert_xaxis()
    ax.set_xlabel("fraction of gated weights remaining")


def log_percent_scale(axis) -> None:
    """A logarithmic axis of fractions (up to 1), labelled in percent at 1-2-5 steps."""
    from matplotlib.ticker import FixedLocator, NullFormatter, PercentFormatter

    if axis is axis.axes.xaxis:
        axis.axes.set_xscale("log")
    else:
        axis.axes.set_yscale("log")
    axis.set_major_locator(FixedLocator([0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]))
    axis.set_minor_formatter(NullFormatter())
    axis.set_major_formatter(PercentFormatter(1.0))


def save_png(plt, fig, path) -> None:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, buffer.getvalue())
