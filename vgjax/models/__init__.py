"""Networks: the backbone registry, backbones, aggregations, the full geo-localization model,
NetVLAD initialisation, and weight import with its download cache. Never imports vgjax.embed."""
