"""Networks: the backbone registry, backbones, aggregations, the full geo-localization model,
NetVLAD initialisation, weight import with its download cache, and export (`export`).

`load(path)` turns a vgjax model file (written by `--mode export`, `export.save`) into
(network, variables, image size, embed function). vgjax.embed, which sits above this package, is
imported only inside `load`."""

from vgjax.models.export import LoadedModel, load

__all__ = ["LoadedModel", "load"]
