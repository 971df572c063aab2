"""Format writers: one module per format, all of the shape described in base.py."""
