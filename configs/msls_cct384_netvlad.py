"""CCT-14/7x2-384 + NetVLAD on MSLS: the maintainers' recipe, trunc_te 8 and freeze_te 1, at
384x384 (CCT's fixed token grid). Needs the CCT ImageNet checkpoint as model.pretrain.

  python launch.py --config configs/msls_cct384_netvlad.py --workdir workdirs/msls_cct \
      --config.data.datasets_folder=/path/to/datasets \
      --config.model.pretrain=/path/to/cct_14_7x2_384_imagenet.pth
"""

from vgjax.configs import common


def get_config():
    config = common.get_config()
    config.mode = "train"
    config.data.dataset_name = "msls"
    config.data.resize = (384, 384)
    config.model.backbone, config.model.aggregation = "cct384", "netvlad"
    config.model.trunc_te, config.model.freeze_te = 8, 1
    config.model.pretrain = "none"  # set to the local CCT checkpoint (no automatic download)
    config.mining.mining = "partial"
    return config
