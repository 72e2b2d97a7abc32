"""After publication: hooks (programs run per document) and the webhook, each fed from its own
durable mailbox in the state folder.
"""
