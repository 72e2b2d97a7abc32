"""Operating the daemon: metrics, the status file and `watcherd status`, retention, `watcherd retry`
and `watcherd check`.
"""
