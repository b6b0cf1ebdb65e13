"""CosPlace: ResNet-18 (conv5) + GeM + FC 512, CosFace over groups of classes (reference §5).

  python launch.py --config configs/cosplace_resnet18_512.py --workdir workdirs/cosplace_r18 \
      --config.cosplace.train_folder=/data/sf_xl/processed/train \
      --config.cosplace.val_folder=/data/sf_xl/processed/val \
      --config.cosplace.test_folder=/data/sf_xl/processed/test
CosPlace's defaults: M=10 m cells, alpha=30 degree heading bins, N=5, L=2, 8 groups, classes of
at least 10 images, batch 32 of 512x512 crops, 10000 iterations per epoch, 50 epochs, Adam 1e-5
for the model and 0.01 for each classifier, ColorJitter(0.7, 0.7, 0.7, 0.5) and
RandomResizedCrop(scale 0.5..1) on the device. Validation R@1 picks the best model; the test
uses the test folder's `queries_v1` (SF-XL), set cosplace.test_queries_folder for other data.
"""

import ml_collections

from configs import common


def cosplace_section(**overrides) -> ml_collections.ConfigDict:
    section = ml_collections.ConfigDict(dict(
        train_folder="", val_folder="", test_folder="", test_queries_folder="queries_v1",
        M=10, alpha=30, N=5, L=2, groups_num=8, min_images_per_class=10,
        train_all_layers=False, batch_size=32, epochs_num=50, iterations_per_epoch=10000,
        classifiers_lr=0.01, brightness=0.7, contrast=0.7, saturation=0.7, hue=0.5,
        random_resized_crop=0.5,
    ))
    section.update(overrides)
    return section


def get_config():
    config = common.get_config()
    config.mode = "train_cosplace"
    config.data.resize = (512, 512)
    config.model.backbone, config.model.aggregation = "resnet18conv5", "gem"
    config.model.l2, config.model.fc_output_dim = "before_pool", 512
    config.train.lr = 1e-5  # the model's Adam; the classifiers use cosplace.classifiers_lr
    config.eval.recall_values = (1, 5, 10, 20)  # R@1 (the first) selects the best model
    config.data.dataset_name = ""  # cosplace.*_folder are absolute paths here
    config.cosplace = cosplace_section()
    return config
