"""The torch side of the side-by-side benchmarks: the benchmark's networks, built in torch.

Uses the independent torch implementations the parity tests check vgjax against
(tests/torch_reference.py; torchvision backbones through tests/torch_helpers.py's import shim),
so "the same architecture" is the one whose outputs vgjax reproduces. Torch runs eager, in
channels-last memory format, with as many threads as XLA uses (the CPU affinity mask).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from torch_helpers import import_torchvision  # noqa: E402
from torch_reference import (BenchmarkNet, BoQDinoV2, BoQVPRModel, CCTBackbone, DinoVisionTransformer,  # noqa: E402
                             MegaLocNet, SaladDINOv2, SaladVPRModel, TorchBoQ, TorchConvAP, TorchMixVPR, TorchSALAD,
                             benchmark_aggregation)

from vgjax.data import augment  # noqa: E402
from vgjax.models import registry  # noqa: E402

MEAN = torch.tensor(augment.IMAGENET_MEAN).view(1, 3, 1, 1) * 255
STD = torch.tensor(augment.IMAGENET_STD).view(1, 3, 1, 1) * 255


def use_xla_threads() -> int:
    """Gives torch the threads XLA:CPU uses (every CPU in the affinity mask); returns the count."""
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    return threads


def backbone(name: str) -> nn.Module:
    """The benchmark's truncated backbone: ResNet conv4/conv5 children, VGG16/AlexNet features
    without the last ReLU and pool, or the full-depth CCT-14/7x2 returning tokens."""
    if name.startswith("resnet"):
        model = getattr(import_torchvision().models, name[:name.index("conv")])()
        return nn.Sequential(*list(model.children())[:-3 if name.endswith("conv4") else -2])
    if name in ("vgg16", "alexnet"):
        return nn.Sequential(*list(getattr(import_torchvision().models, name)().features.children())[:-2])
    if name == "cct384":
        return CCTBackbone("tokens")
    raise ValueError(f"no torch side for backbone {name!r}")


def network(model_config) -> nn.Module:
    """The benchmark's network for a vgjax model config (random weights); DINOv2 + SALAD / BoQ
    as their authors' code builds them."""
    if model_config.backbone.startswith("dinov2_"):
        return dinov2_network(model_config)
    entry = registry.backbone(model_config.backbone)
    head = benchmark_aggregation(model_config.aggregation, model_config.l2, entry.channels,
                                 model_config.netvlad_clusters, tokens=entry.tokens)
    return BenchmarkNet(backbone(model_config.backbone), head)


def dinov2_network(model_config) -> nn.Module:
    """dinov2's hub ViT (random weights) with SALAD (serizba/salad) or BoQ (amaralibey/Bag-of-Queries)."""
    from vgjax.models.backbones import dinov2  # noqa: PLC0415

    c = model_config
    arch = dinov2.ARCHS[c.backbone.removeprefix("dinov2_").removesuffix("_reg")]
    vit = DinoVisionTransformer(arch.width, arch.depth, arch.heads, arch.ffn, registers=c.backbone.endswith("_reg"))
    if c.aggregation == "salad" and c.fc_output_dim:  # MegaLoc
        return MegaLocNet(arch.width, arch.depth, arch.heads, c.salad_clusters, c.salad_cluster_dim,
                          c.fc_output_dim).eval()
    if c.aggregation == "salad":
        return SaladVPRModel(SaladDINOv2(vit), TorchSALAD(arch.width, c.salad_clusters, c.salad_cluster_dim,
                                                          c.salad_token_dim)).eval()
    if c.aggregation == "boq":
        return BoQVPRModel(BoQDinoV2(vit), TorchBoQ(arch.width, c.boq_proj_channels, c.boq_queries, c.boq_layers,
                                                    c.boq_row_dim)).eval()
    raise ValueError(f"no torch side for {c.backbone} + {c.aggregation}")


def to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC numpy -> uint8 NCHW tensor in channels-last memory (no copy of the pixels)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2)


def normalize(images: torch.Tensor) -> torch.Tensor:
    return ((images.float() - MEAN) / STD).contiguous(memory_format=torch.channels_last)


def first_and_median_seconds(fn, iterations: int) -> tuple[float, float]:
    """(seconds of a warm-up call of `fn`, median seconds of `iterations` more calls)."""
    times = []
    for _ in range(iterations + 1):
        tick = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tick)
    return times[0], float(np.median(times[1:]))


def time_inference(net: nn.Module, images: np.ndarray, iterations: int, bfloat16: bool = False) -> dict:
    """Median seconds per batch of eager inference (normalization included), after one warm-up."""
    net = net.eval().to(memory_format=torch.channels_last)
    batch = to_input(images)

    def forward():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
            return net(normalize(batch))

    _, seconds = first_and_median_seconds(forward, iterations)
    return {"ms_per_image": 1000 * seconds / len(images), "images_per_second": len(images) / seconds}


def freeze_like_the_benchmark(net: nn.Module, backbone_name: str) -> None:
    """train_all_layers=False: a ResNet's children before layer3 get requires_grad=False (their
    BatchNorm statistics still update in train mode, as in the benchmark)."""
    if not backbone_name.startswith("resnet"):
        raise ValueError(f"the torch train step covers ResNets; got {backbone_name}")
    for child in list(net.backbone.children())[:6]:  # conv1, bn1, relu, maxpool, layer1, layer2
        for param in child.parameters():
            param.requires_grad = False


def time_train_step(net: nn.Module, images: np.ndarray, tuples: int, negs: int, iterations: int,
                    margin: float = 0.1, lr: float = 1e-5) -> dict:
    """The benchmark's training step on one batch of `tuples` x (query, positive, negs
    negatives), tuple-major: forward in train mode, TripletMarginLoss(sum) / (tuples * negs),
    backward, Adam. Median seconds per step after one warm-up step."""
    net = net.train().to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=lr)
    criterion = nn.TripletMarginLoss(margin=margin, p=2, reduction="sum")
    batch = to_input(images)

    def step():
        features = net(normalize(batch)).view(tuples, 2 + negs, -1)
        dim = features.shape[-1]
        query = features[:, :1].expand(-1, negs, -1).reshape(-1, dim)
        positive = features[:, 1:2].expand(-1, negs, -1).reshape(-1, dim)
        loss = criterion(query, positive, features[:, 2:].reshape(-1, dim)) / (tuples * negs)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    first, seconds = first_and_median_seconds(step, iterations)
    return {"seconds_per_step": seconds, "images_per_second": len(images) / seconds,
            "triplets_per_second": tuples * negs / seconds, "first_step_seconds": first}


def gsv_network(model_config, feature_hw: tuple[int, int]) -> nn.Module:
    """A GSV-Cities network (ResNet + MixVPR or Conv-AP, random weights) for a vgjax model
    config whose backbone outputs `feature_hw` maps."""
    channels = registry.backbone(model_config.backbone).channels
    if model_config.aggregation == "mixvpr":
        head = TorchMixVPR(channels, *feature_hw, out_channels=model_config.mixvpr_out_channels,
                           mix_depth=model_config.mixvpr_mix_depth, mlp_ratio=model_config.mixvpr_mlp_ratio,
                           out_rows=model_config.mixvpr_out_rows)
    else:
        head = TorchConvAP(channels, model_config.convap_out_channels, *model_config.convap_pool)
    return BenchmarkNet(backbone(model_config.backbone), head)


def time_gsv_step(net: nn.Module, images: np.ndarray, labels: np.ndarray, iterations: int, lr: float = 0.05) -> dict:
    """GSV-Cities' training step on one places x K batch: forward in train mode,
    pytorch-metric-learning's MultiSimilarityMiner(0.1) and MultiSimilarityLoss(1, 50, 0),
    backward, SGD(momentum 0.9, weight decay 1e-3). Median seconds per step after one warm-up."""
    from pytorch_metric_learning import distances, losses, miners  # noqa: PLC0415 (a test dependency)

    net = net.train().to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=lr, momentum=0.9,
                                weight_decay=1e-3)
    miner = miners.MultiSimilarityMiner(epsilon=0.1, distance=distances.CosineSimilarity())
    criterion = losses.MultiSimilarityLoss(alpha=1.0, beta=50, base=0.0, distance=distances.DotProductSimilarity())
    batch, targets = to_input(images), torch.from_numpy(labels).long()

    def step():
        descriptors = net(normalize(batch))
        loss = criterion(descriptors, targets, miner(descriptors, targets))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    first, seconds = first_and_median_seconds(step, iterations)
    return {"seconds_per_step": seconds, "images_per_second": len(images) / seconds, "first_step_seconds": first}
