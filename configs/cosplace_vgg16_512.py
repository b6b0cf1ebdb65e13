"""CosPlace with vgg16 + GeM + FC 512; everything else as configs/cosplace_resnet18_512.py.

  python launch.py --config configs/cosplace_vgg16_512.py --workdir workdirs/cosplace_vgg16 \
      --config.cosplace.train_folder=... --config.cosplace.val_folder=... --config.cosplace.test_folder=...
"""

from vgjax.configs import cosplace


def get_config():
    config = cosplace.get_config()
    config.model.backbone, config.model.fc_output_dim = "vgg16", 512
    return config
