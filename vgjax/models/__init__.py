"""Networks: backbones, aggregations, the full geo-localization model and weight import."""
