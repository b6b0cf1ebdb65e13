"""A tiny training run on the built-in synthetic aerial world: every part of the training
workflow (mining, tuples, augmentation, validation, checkpoints, test) in about a minute on a
laptop CPU, with random weights.

  python launch.py --config configs/smoke_train.py --workdir workdirs/smoke
"""

from vgjax.configs import common


def get_config():
    config = common.get_config()
    config.mode = "train"
    config.data.datasets_folder = "workdirs/datasets"
    config.data.dataset_name = "aerial_smoke"
    config.data.synthetic = "aerial"
    config.data.resize = (64, 64)
    config.data.infer_batch_size = 8
    config.model.backbone, config.model.aggregation = "resnet18conv4", "gem"
    config.model.pretrain = "none"
    config.train.train_batch_size = 2
    config.train.epochs_num = 2
    config.train.lr = 1e-4
    config.mining.cache_refresh_rate = 8
    config.mining.queries_per_epoch = 16
    config.mining.negs_num_per_query = 2
    config.mining.neg_samples_num = 50
    config.eval.recall_values = (1, 5)
    return config
