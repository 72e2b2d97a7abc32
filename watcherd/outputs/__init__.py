"""What a job becomes: the result or error document, its publication into the outbox, and (child
side only) the searchable PDF, hOCR and ALTO writers in `render`.
"""
