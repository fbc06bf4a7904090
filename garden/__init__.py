"""Communal Garden: volunteers' PCs distil, train and serve small language models together."""

__version__ = "0.1.0"
