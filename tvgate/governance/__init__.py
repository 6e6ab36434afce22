"""Governance: budgets, rate limits, concurrency caps, shared by every gateway process."""
