"""Errors of the dream package: each names what was wrong and how to fix it (tools show them as-is)."""


class DreamError(ValueError):
    """A dream-loop, invariant or certificate request that cannot be carried out as given."""
