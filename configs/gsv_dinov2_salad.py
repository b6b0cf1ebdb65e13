"""SALAD (Izquierdo & Civera, CVPR 2024) trained on GSV-Cities as its authors did: DINOv2
ViT-B/14 on its LVD-142M weights with only the last 4 blocks (and the final norm) trained +
SALAD (64 clusters x 128 + a 256-D token = 8448-D), 224x224 training images, 60 places x 4
images per step, the multi-similarity loss and miner, AdamW lr 6e-5 (weight decay 9.5e-9) falling
linearly to 0.2x over 4000 steps, 4 epochs, validation and test at 322x322; bfloat16 compute.

  python launch.py --config configs/gsv_dinov2_salad.py --workdir workdirs/salad \
      --config.data.gsv_cities_folder=/data/gsv_cities --config.data.datasets_folder=/data/datasets
"""

from vgjax.configs import common


def get_config():
    config = common.get_config()
    config.mode = "train_gsv"
    config.data.update(resize=(224, 224), dataset_name="pitts30k", infer_batch_size=32, num_workers=8)
    config.model.update(backbone="dinov2_vitb14", aggregation="salad", pretrain="dinov2", dtype="bfloat16",
                        unfreeze_n_blocks=4, salad_clusters=64, salad_cluster_dim=128, salad_token_dim=256,
                        salad_dropout=0.3)
    config.train.update(train_batch_size=60, optim="adamw", lr=6e-5, weight_decay=9.5e-9, lr_decay_steps=4000,
                        lr_end_factor=0.2, epochs_num=4, patience=0, best_metric="R@1", checkpoint_every_steps=200)
    config.gsv.update(images_per_place=4, min_images_per_place=4)
    config.eval.update(resize=(322, 322), recall_values=(1, 5, 10, 20))
    return config
