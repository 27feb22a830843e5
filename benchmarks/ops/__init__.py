"""Op benchmark harness: ``run.py`` (measure), ``report.py`` (tables and plot), ``ceilings.py``, ``peers.py``."""
