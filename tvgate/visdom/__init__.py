"""Pushing traces to Visdom Trace's stream ingestion, as its hooks would (issue 18).

``lines`` reads a stored call (any provider API) as Claude-Code-shaped turns; ``events``
turns those into ``StreamEventRequest`` documents with a session's state; ``pusher``
delivers them, one org at a time across processes, from a durable outbox.
"""
