"""Backbones: Flax Linen modules mapping ImageNet-normalized NHWC images to features."""
