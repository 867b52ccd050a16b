"""End-to-end studies that produce JSON, plots and a report (``mergelab demo`` is the first)."""
