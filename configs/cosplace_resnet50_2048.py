"""CosPlace with resnet50conv5 + GeM + FC 2048; everything else as configs/cosplace_resnet18_512.py.

  python launch.py --config configs/cosplace_resnet50_2048.py --workdir workdirs/cosplace_resnet50 \
      --config.cosplace.train_folder=... --config.cosplace.val_folder=... --config.cosplace.test_folder=...
"""

from vgjax.configs import cosplace


def get_config():
    config = cosplace.get_config()
    config.model.backbone, config.model.fc_output_dim = "resnet50conv5", 2048
    return config
