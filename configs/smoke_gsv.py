"""A tiny GSV-Cities run on a built-in synthetic dataset in GSV-Cities' layout (2 cities of
aerial views, places x 4 images; aerial val/test splits): MixVPR on ResNet-18 conv4, the
multi-similarity loss and miner, warm-up and a milestone, in about a minute on a laptop CPU,
from random weights.

  python launch.py --config configs/smoke_gsv.py --workdir workdirs/smoke_gsv
"""

from vgjax.configs import common


def get_config():
    config = common.get_config()
    config.mode = "train_gsv"
    config.data.update(datasets_folder="workdirs/datasets", dataset_name="gsv_smoke", synthetic="gsv",
                       gsv_cities_folder="gsv_cities", gsv_cities=("Aville", "Btown"), resize=(64, 64),
                       infer_batch_size=16)
    config.model.update(backbone="resnet18conv4", aggregation="mixvpr", pretrain="none", mixvpr_out_channels=32,
                        mixvpr_out_rows=2, mixvpr_mix_depth=1)
    config.train.update(train_batch_size=8, optim="adam", lr=2e-4, warmup_steps=4, lr_milestones=(2,),
                        epochs_num=3, patience=0, best_metric="R@1", log_every_steps=2)
    config.eval.recall_values = (1, 5)
    return config
