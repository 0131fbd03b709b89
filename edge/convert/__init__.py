"""Converters from other tools' files to this project's formats, device side (no torch)."""
