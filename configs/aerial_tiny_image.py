"""Evaluation in seconds, with no dataset and no weights: a synthetic aerial world.

  python launch.py --config configs/aerial_tiny_image.py --workdir workdirs/aerial

It renders the dataset (once) into workdirs/datasets/aerial_demo in the real folder format, embeds
it with the learning-free tiny-image baseline (jit-compiled), searches with faiss and reports the
benchmark's recall@N for every query test method.
"""

from vgjax.configs import common


def get_config():
    config = common.get_config()
    config.mode = "eval"
    config.data.datasets_folder = "workdirs/datasets"
    config.data.dataset_name = "aerial_demo"
    config.data.synthetic = "aerial"
    config.data.resize = (96, 128)
    config.model.backbone = "tiny_image"
    config.model.aggregation = "none"
    config.eval.test_method = "all"  # every query test method of the benchmark, one after another
    return config
