"""Reporting: tables, figures, sanity checks, the report, comparisons and baselines (what a stored run says).
"""
