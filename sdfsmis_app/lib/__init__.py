"""The app's own modules, laid out like MONAI Label's radiology sample app: one runtime per method
of the registry (``configs``), the infer and train tasks (``infers``, ``trainers``), and apart
from them what the app adds to the server (``server``)."""
