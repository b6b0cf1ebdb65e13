"""Bag-of-Queries (Ali-bey et al., CVPR 2024) with DINOv2 trained on GSV-Cities as its authors
did: DINOv2 ViT-B/14 on its LVD-142M weights with only the last 2 blocks trained, read before its
final norm + BoQ (3x3 projection to 384 channels, 2 blocks of 64 queries, 32 rows = 12288-D),
224x224 training images, 128 places x 4 images per step, the multi-similarity loss and miner,
AdamW lr 1e-4 (weight decay 1e-4) with a linear warm-up over 10 epochs and x0.1 at epochs 10
and 20, 40 epochs, validation and test at 322x322; bfloat16 compute.

  python launch.py --config configs/gsv_dinov2_boq.py --workdir workdirs/boq \
      --config.data.gsv_cities_folder=/data/gsv_cities --config.data.datasets_folder=/data/datasets
"""

from vgjax.configs import common


def get_config():
    config = common.get_config()
    config.mode = "train_gsv"
    config.data.update(resize=(224, 224), dataset_name="pitts30k", infer_batch_size=32, num_workers=8)
    config.model.update(backbone="dinov2_vitb14", aggregation="boq", pretrain="dinov2", dtype="bfloat16",
                        unfreeze_n_blocks=2, boq_proj_channels=384, boq_queries=64, boq_layers=2, boq_row_dim=32)
    config.train.update(train_batch_size=128, optim="adamw", lr=1e-4, weight_decay=1e-4, warmup_epochs=10,
                        lr_milestones=(10, 20), lr_gamma=0.1, epochs_num=40, patience=0, best_metric="R@1",
                        checkpoint_every_steps=200)
    config.gsv.update(images_per_place=4, min_images_per_place=4)
    config.eval.update(resize=(322, 322), recall_values=(1, 5, 10, 20))
    return config
