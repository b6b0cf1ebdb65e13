"""ResNet-50 conv4 + GeM on Pitts30k, full database mining; benchmark defaults otherwise.

  python launch.py --config configs/pitts30k_resnet50conv4_gem.py --workdir workdirs/r50_gem \
      --config.data.datasets_folder=/path/to/datasets
"""

from vgjax.configs import common


def get_config():
    config = common.get_config()
    config.mode = "train"
    config.data.dataset_name = "pitts30k"
    config.model.backbone, config.model.aggregation = "resnet50conv4", "gem"
    config.mining.mining = "full"
    return config
