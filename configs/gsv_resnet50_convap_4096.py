"""Conv-AP trained on GSV-Cities as GSV-Cities' main.py does: ResNet-50 (conv5, its first two
stages frozen) + Conv-AP (1x1 conv to 1024 channels, 2x2 pooling) = 4096-D, 320x320 images,
100 places x 4 images per step, the multi-similarity loss and miner, Adam lr 2e-4 (its AdamW
with no weight decay) with 600 warm-up steps and x0.3 at epochs 5/10/15/25, 30 epochs, R@1 on
Pitts30k val picking the best; bfloat16 compute.

  python launch.py --config configs/gsv_resnet50_convap_4096.py --workdir workdirs/convap \
      --config.data.gsv_cities_folder=/data/gsv_cities --config.data.datasets_folder=/data/datasets
"""

from vgjax.configs import common


def get_config():
    config = common.get_config()
    config.mode = "train_gsv"
    config.data.update(resize=(320, 320), dataset_name="pitts30k", infer_batch_size=32, num_workers=8)
    config.model.update(backbone="resnet50conv5", aggregation="convap", pretrain="imagenet", dtype="bfloat16",
                        convap_out_channels=1024, convap_pool=(2, 2))
    config.train.update(train_batch_size=100, optim="adam", lr=2e-4, warmup_steps=600,
                        lr_milestones=(5, 10, 15, 25), lr_gamma=0.3, epochs_num=30, patience=0,
                        best_metric="R@1", checkpoint_every_steps=100)
    config.gsv.update(images_per_place=4, min_images_per_place=4)
    return config
