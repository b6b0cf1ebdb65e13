"""The benchmark paper's resize study: ResNet-50 conv4 + GeM trained and tested on Pitts30k at
100, 80, 60 and 40% of its 480x640 images, three seeds each, as one sweep (vgjax.sweep) that
ends with a mean +- std table (results.md/.csv/.json) and recall_vs_resize.png:

  python launch.py --config configs/pitts30k_resize_study.py --workdir workdirs/resize_study \
      --config.data.datasets_folder=/path/to/datasets

Relaunching the same command after an interruption skips the finished runs and resumes the
interrupted one. More seeds or resolutions: --config.sweep.seeds=5, or
--config.sweep.axes='data.resize=100%|90%|80%|70%|60%|50%|40%'.
"""

from vgjax.configs import common


def get_config():
    config = common.get_config()  # configs/pitts30k_resnet50conv4_gem.py's run
    config.data.dataset_name = "pitts30k"
    config.model.backbone, config.model.aggregation = "resnet50conv4", "gem"
    config.mining.mining = "full"
    config.mode = "sweep"
    config.sweep.mode = "train"
    config.sweep.axes = "data.resize=100%|80%|60%|40%"
    config.sweep.seeds = 3
    return config
