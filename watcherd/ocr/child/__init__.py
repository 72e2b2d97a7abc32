"""The child process: decode pages, read them with the engine, write the rendered outputs, report
over the protocol pipe. Nothing outside this package imports it.
"""
