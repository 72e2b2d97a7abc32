"""A file's first stage: notice candidates in the inbox (events, polling, scans) and tell when each
is completely written.

Imports only watcherd.core.
"""
