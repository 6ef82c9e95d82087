"""Data sources and file readers."""
