"""MixVPR (Ali-bey et al., WACV 2023) trained on GSV-Cities as its authors did: ResNet-50 cut
after layer3 (its first two stages frozen) + MixVPR (1024 channels x 4 rows, 4 Feature-Mixer
blocks) = 4096-D, 320x320 images, 120 places x 4 images per step, the multi-similarity loss and
miner, SGD lr 0.05 (momentum 0.9, weight decay 1e-3) with 650 warm-up steps and x0.3 at epochs
5/10/15/25/45, 80 epochs, R@1 on Pitts30k val picking the best; bfloat16 compute.

  python launch.py --config configs/gsv_resnet50_mixvpr_4096.py --workdir workdirs/mixvpr \
      --config.data.gsv_cities_folder=/data/gsv_cities --config.data.datasets_folder=/data/datasets
"""

from vgjax.configs import common


def get_config():
    config = common.get_config()
    config.mode = "train_gsv"
    config.data.update(resize=(320, 320), dataset_name="pitts30k", infer_batch_size=32, num_workers=8)
    config.model.update(backbone="resnet50conv4", aggregation="mixvpr", pretrain="imagenet", dtype="bfloat16",
                        mixvpr_out_channels=1024, mixvpr_out_rows=4, mixvpr_mix_depth=4, mixvpr_mlp_ratio=1)
    config.train.update(train_batch_size=120, optim="sgd", lr=0.05, warmup_steps=650,
                        lr_milestones=(5, 10, 15, 25, 45), lr_gamma=0.3, epochs_num=80, patience=0,
                        best_metric="R@1", checkpoint_every_steps=100)
    config.gsv.update(images_per_place=4, min_images_per_place=4)
    config.eval.recall_values = (1, 5, 10, 20)
    return config
