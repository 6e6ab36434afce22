"""Translators between client APIs and upstream APIs, one module per (client, upstream) pair."""
