"""Profiles: the TOML schema and parsing, parameter resolution, plugins and the preflight checks (what to run,
validated before anything runs).
"""
