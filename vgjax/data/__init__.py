"""Data: dataset folders, image loading and input pipelines."""
