"""Translators between provider APIs, one module per (client API, upstream API) pair.

Each module is pure (no I/O): request, response, stream and error phases, for the proxy
to use when a client's API differs from its route's (``anthropic_to_chat``: an Anthropic
Messages client on an OpenAI Chat Completions route; ``chat_to_anthropic``: the reverse;
``responses_to_anthropic`` and ``responses_to_chat``: an OpenAI Responses client, Codex,
on an Anthropic route or a Chat-only upstream, their Responses side in ``responses_api``).
``pairs`` is the registry the proxy picks a pair's translator from, behind one interface;
a passthrough call never reaches it.
"""
