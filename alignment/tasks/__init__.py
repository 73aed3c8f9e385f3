"""Small synthetic tasks whose answers can be checked exactly, for offline demos and tests."""
