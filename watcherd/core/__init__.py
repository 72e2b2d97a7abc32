"""The leaf layer every stage may import: settings, logs, records, names, safe filesystem calls.

It imports no other part of watcherd.
"""
