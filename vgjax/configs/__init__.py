"""Every option and its default (common.py), shipped inside the package."""
