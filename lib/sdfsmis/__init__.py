"""SD-FSMIS and DPL: one-shot medical image segmentation behind one pipeline.

Areas, from the bottom up (docs/layout.md): ``config``/``settings`` (settings), ``metrics``,
``io``, ``dicom``, ``methods`` (the methods and their registry), ``samples``, ``pipeline``
(``Predictor``, the one inference entry point), ``figures``, ``training``, ``evaluation``,
``bench`` and ``cli`` (the ``sdfsmis`` command).
"""

__version__ = "0.1.0"
