"""Model building, loading and conversion."""
