"""The OCR child and its supervision. The parent's side (protocol, supervisor, workers) starts,
feeds, times and kills the child; `child` and `engines` run only inside the child process, which
is the only place torch, the image libraries and the renderers are imported.
"""
