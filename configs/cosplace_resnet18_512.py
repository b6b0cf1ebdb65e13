"""CosPlace: ResNet-18 (conv5) + GeM + FC 512, CosFace over groups of classes (reference §5);
the recipe is vgjax/configs/cosplace.py.

  python launch.py --config configs/cosplace_resnet18_512.py --workdir workdirs/cosplace_r18 \
      --config.cosplace.train_folder=/data/sf_xl/processed/train \
      --config.cosplace.val_folder=/data/sf_xl/processed/val \
      --config.cosplace.test_folder=/data/sf_xl/processed/test
"""

from vgjax.configs import cosplace


def get_config():
    return cosplace.get_config()
