"""Metrics and reports per task, and their plots. Never imports ``trainer``."""
