"""How a slice is shown: the intensity window and the radiological orientation, one rule for
every picture, so that a tile of a training episode, an evaluated volume and a preview read the
same way."""

from __future__ import annotations

import numpy as np

#: Robust range of a volume without a fixed window (MR, or CT of unknown calibration): outliers
#: (a metal clip, a bright vessel) would otherwise wash the organs out.
DISPLAY_PERCENTILES = (0.5, 99.5)
#: Contour colours: the reference (ground truth, the support's mask, a pseudo-label) and the
#: prediction. Green and magenta stay apart for the common colour-vision deficiencies.
REFERENCE = "#00ff00"
PREDICTION = "#ff00ff"


def display_window(data: np.ndarray, window: tuple[float, float] | None = None) -> tuple[float, float]:
    """(low, high) of the grey scale: a fixed window (CT in HU, e.g. the data set's preprocessing
    window), else the volume's robust percentiles. Computed once per volume, so that every tile
    of a volume shares one scale."""
    if window is not None:
        return float(window[0]), float(window[1])
    low, high = (float(v) for v in np.percentile(data, DISPLAY_PERCENTILES))
    return (low, high) if high > low else (low, low + 1.0)


def radiological(axial: np.ndarray) -> np.ndarray:
    """An axial slice [X, Y] in RAS voxel order -> rows x columns as a radiologist reads it:
    anterior at the top, the patient's right on the viewer's left."""
    return axial[::-1, ::-1].T
