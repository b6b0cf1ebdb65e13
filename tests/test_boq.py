"""Bag-of-Queries: the aggregation against amaralibey/Bag-of-Queries' torch module written from
its published code, and its two released layouts (DINOv2 and ResNet-50) loaded whole,
compared end to end and exported back."""

import jax
import numpy as np
import torch
from torch import nn as tnn
from torch_helpers import import_torchvision, nhwc, randomize_batch_norm, state_dict_numpy
from torch_reference import BoQDinoV2, BoQVPRModel, DinoVisionTransformer, TorchBoQ

from vgjax.configs import common
from vgjax.models import aggregators, export, pretrained
from vgjax.models.convert import StateDictReader

TOL = 1e-4


def _randomize_norms(module, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if ("norm" in name and name.endswith("weight")) or name.endswith("gamma"):
                param.copy_(1 + 0.2 * torch.randn(param.shape, generator=gen))
            elif "norm" in name and name.endswith("bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    return module.eval()


def _config(**changes):
    config = common.get_config().model
    config.update(aggregation="boq", pretrain="none", **changes)
    return config


def test_boq_matches_torch():
    torch.manual_seed(0)
    torch_boq = _randomize_norms(TorchBoQ(in_channels=96, proj_channels=128, num_queries=8, num_layers=2,
                                          row_dim=4), 0)
    x = torch.randn(2, 96, 6, 7)
    with torch.no_grad():
        expected = torch_boq(x).numpy()
    config = _config(boq_proj_channels=128, boq_queries=8, boq_layers=2, boq_row_dim=4)
    reader = StateDictReader(state_dict_numpy(torch_boq))
    variables = aggregators.import_torch(reader, "", "boq", 96, model_config=config)
    reader.finish()
    ours = aggregators.create("boq", model_config=config).apply(variables, nhwc(x))
    assert ours.shape == (2, 128 * 4) == (2, aggregators.output_dim("boq", 96, model_config=config))
    np.testing.assert_allclose(np.asarray(ours), expected, atol=TOL)
    assert aggregators.export_torch(variables, "", "boq").keys() == state_dict_numpy(torch_boq).keys()


class _BoQResNet(tnn.Module):
    """BoQ's ResNet wrapper: torchvision's ResNet-50 children up to layer3 as `net`."""

    def __init__(self):
        super().__init__()
        resnet = import_torchvision().models.resnet50()
        self.net = tnn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool, resnet.layer1,
                                  resnet.layer2, resnet.layer3)

    def forward(self, x):
        return self.net(x)


def _check_release(torch_model, config, size, tmp_path):
    """The file in the release layout loads with every tensor used, matches the torch network,
    and --mode export writes back a file the torch network loads strictly."""
    path = tmp_path / "boq.pth"
    torch.save(torch_model.state_dict(), path)
    config.update(resume=str(path), resume_format="boq")
    model, variables = pretrained.build_and_load(config, size)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = torch_model(x).numpy()
    np.testing.assert_allclose(np.asarray(jax.jit(model.apply)(variables, nhwc(x))), expected, atol=TOL)
    state = export.benchmark_state_dict(config, variables, size)
    assert set(state) == set(torch_model.state_dict())
    torch_model.load_state_dict({key: torch.from_numpy(np.array(value)) for key, value in state.items()}, strict=True)
    with torch.no_grad():
        np.testing.assert_allclose(torch_model(x).numpy(), expected, atol=TOL)


def test_boq_dinov2_release_layout(tmp_path):
    torch.manual_seed(2)
    dino = DinoVisionTransformer(dim=384, depth=12, heads=6)
    torch_model = _randomize_norms(BoQVPRModel(BoQDinoV2(dino), TorchBoQ(384, 384, num_queries=8, row_dim=4)), 2)
    config = _config(backbone="dinov2_vits14", boq_proj_channels=384, boq_queries=8, boq_row_dim=4)
    _check_release(torch_model, config, (224, 224), tmp_path)


def test_boq_resnet50_release_layout(tmp_path):
    torch.manual_seed(3)
    torch_model = BoQVPRModel(_BoQResNet(), TorchBoQ(1024, 512, num_queries=8, row_dim=4))
    randomize_batch_norm(torch_model)
    torch_model = _randomize_norms(torch_model, 3)
    config = _config(backbone="resnet50conv4", boq_proj_channels=512, boq_queries=8, boq_row_dim=4)
    _check_release(torch_model, config, (64, 64), tmp_path)
