"""Every option and its default (common.py), shipped inside the package, and the check of a
config before any work (validate.py)."""
