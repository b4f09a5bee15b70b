"""Evaluation: ranks from scores and metrics from ranks (knows no model class)."""
