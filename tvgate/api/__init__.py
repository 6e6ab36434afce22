"""The JSON API under ``/api/v1``: handlers over ``tvgate.services``."""
