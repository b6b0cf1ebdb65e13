"""Networks: the backbone registry, backbones, aggregations, the full geo-localization model,
NetVLAD initialisation, weight import with its download cache, export, and the front door
(`zoo`):

  network, variables, image_size, embed_fn = vgjax.models.load("cosplace_resnet50_2048")

`load(name or path)`, `build(partial model config)` and `available()` (the zoo's names) are
vgjax.models.zoo's; vgjax.embed, which sits above this package, is imported only when a network
is loaded."""

from vgjax.models.export import LoadedModel
from vgjax.models.zoo import ZooEntry, available, build, load

__all__ = ["LoadedModel", "ZooEntry", "available", "build", "load"]
