"""CosPlace's recipe (reference §5): ResNet-18 (conv5) + GeM + FC 512, CosFace over groups of
classes. The repository's configs/cosplace_*.py build on it; an installed vgjax runs it as
`vgjax --config cosplace --workdir DIR --config.cosplace.train_folder=...` (see vgjax.launch).

CosPlace's defaults: M=10 m cells, alpha=30 degree heading bins, N=5, L=2, 8 groups, classes of
at least 10 images (the cosplace section's defaults), batch 32 of 512x512 crops, 10000
iterations per epoch, 50 epochs without early stopping, Adam 1e-5 for the model and 0.01 for
each classifier, ColorJitter(0.7, 0.7, 0.7, 0.5) and RandomResizedCrop(scale 0.5..1) on the
device. Validation R@1 picks the best model; the test uses the test folder's `queries_v1`
(SF-XL), set cosplace.test_queries_folder for other data.
"""


from vgjax.configs import common


def get_config():
    config = common.get_config()
    config.mode = "train_cosplace"
    config.data.resize = (512, 512)
    config.data.dataset_name = ""  # cosplace.*_folder are absolute paths here
    config.model.backbone, config.model.aggregation = "resnet18conv5", "gem"
    config.model.l2, config.model.fc_output_dim = "before_pool", 512
    config.train.update(train_batch_size=32, epochs_num=50, patience=0, lr=1e-5, optim="adam",
                        best_metric="R@1", brightness=0.7, contrast=0.7, saturation=0.7, hue=0.5,
                        random_resized_crop=0.5)
    return config
