"""Measurements of this library against others, with the logic here and thin entry points in `scripts/`."""
