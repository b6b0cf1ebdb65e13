"""ResNet-50 conv4 + NetVLAD on MSLS with partial mining (the paper's MSLS setting).

  python launch.py --config configs/msls_resnet50conv4_netvlad.py --workdir workdirs/msls_r50 \
      --config.data.datasets_folder=/path/to/datasets
MSLS as written by VPR-datasets-downloader has no images/ level and test is val; vgjax finds
both layouts. Use --config.mining.mining=msls_weighted for the MSLS paper's weighted sampling.
"""

from vgjax.configs import common


def get_config():
    config = common.get_config()
    config.mode = "train"
    config.data.dataset_name = "msls"
    config.model.backbone, config.model.aggregation = "resnet50conv4", "netvlad"
    config.mining.mining = "partial"
    return config
