"""Claimed files: the work area, claiming, the backlog of jobs waiting for a slot, duplicates, and
the publication of results.

Imports watcherd.intake and watcherd.core; never watcherd.ocr.
"""
