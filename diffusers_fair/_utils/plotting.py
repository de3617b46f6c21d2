"""Matplotlib for the pictures the package writes (reports, loss curves, charts)."""


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend: files only, no display needed.

    Imported on first use, so that modules that can plot stay quick to import.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
