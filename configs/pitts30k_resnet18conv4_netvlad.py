"""ResNet-18 conv4 + NetVLAD on Pitts30k, full database mining (the paper's Pitts30k setting).

  python launch.py --config configs/pitts30k_resnet18conv4_netvlad.py --workdir workdirs/r18_netvlad \
      --config.data.datasets_folder=/path/to/datasets
Everything else is the benchmark's default: Adam 1e-5, 4 tuples of (query, positive, 10
negatives), margin 0.1, 480x640, 5000 queries per epoch, mining every 1000, patience 3 on R@5.
"""

from vgjax.configs import common


def get_config():
    config = common.get_config()
    config.mode = "train"
    config.data.dataset_name = "pitts30k"
    config.model.backbone, config.model.aggregation = "resnet18conv4", "netvlad"
    config.mining.mining = "full"
    return config
