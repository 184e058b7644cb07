"""Execution: cell keys and fingerprints, the store and model cache, training, the runner and the local and Ray
executors (how cells are computed and kept).
"""
