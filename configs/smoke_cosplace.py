"""A tiny CosPlace run on a built-in SF-XL-style synthetic dataset (36 cells x 3 views, 2 groups
of 9 classes): partition, CosFace training over two groups, validation, checkpoints and test in
about a minute on a laptop CPU, with random weights.

  python launch.py --config configs/smoke_cosplace.py --workdir workdirs/smoke_cosplace
"""

from vgjax.configs import cosplace


def get_config():
    config = cosplace.get_config()
    config.data.datasets_folder = "workdirs/datasets"
    config.data.dataset_name = "cosplace_smoke"
    config.data.synthetic = "cosplace"
    config.data.resize = (64, 64)
    config.data.infer_batch_size = 8
    config.model.pretrain = "none"
    config.model.fc_output_dim = 32
    config.eval.recall_values = (1, 5)
    config.train.update(train_batch_size=4, epochs_num=2)
    config.cosplace.update(train_folder="train", val_folder="val", test_folder="test", N=2, L=1,
                           groups_num=2, min_images_per_class=2, iterations_per_epoch=4)
    return config
