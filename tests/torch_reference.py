"""Torch implementations of the benchmark's layers, written from the spec (reference.md §2), shared
by the parity tests. Key names follow the benchmark's state dicts."""

import math

import torch
import torch.nn.functional as F
from torch import nn as tnn


def torch_gem(x, p, eps=1e-6):
    """Maps NCHW or tokens (N, T, D) -> (N, D), as the benchmark's functional gem."""
    if x.dim() == 3:
        x = x.permute(0, 2, 1)
        return F.avg_pool1d(x.clamp(min=eps).pow(p), x.size(-1)).pow(1.0 / p)[:, :, 0]
    return F.avg_pool2d(x.clamp(min=eps).pow(p), (x.size(-2), x.size(-1))).pow(1.0 / p)[:, :, 0, 0]


def torch_rmac(x, L=3, eps=1e-6):
    """cirtorch's R-MAC on NCHW -> ((N, C), [(top, left, size), ...] regions visited)."""
    ovr = 0.4
    steps = torch.tensor([2, 3, 4, 5, 6, 7], dtype=torch.float32)
    H, W = x.size(2), x.size(3)
    w = min(W, H)
    b = (max(H, W) - w) / (steps - 1)
    _, idx = torch.min(torch.abs(((w ** 2 - w * b) / w ** 2) - ovr), 0)
    Wd = idx.item() + 1 if H < W else 0
    Hd = idx.item() + 1 if H > W else 0
    v = F.max_pool2d(x, (H, W))
    v = v / (torch.norm(v, p=2, dim=1, keepdim=True) + eps)
    regions = []
    for l in range(1, L + 1):
        wl = math.floor(2 * w / (l + 1))
        wl2 = math.floor(wl / 2 - 1)
        b = 0 if l + Wd == 1 else (W - wl) / (l + Wd - 1)
        cen_w = torch.floor(wl2 + torch.arange(l + Wd, dtype=torch.float32) * b) - wl2
        b = 0 if l + Hd == 1 else (H - wl) / (l + Hd - 1)
        cen_h = torch.floor(wl2 + torch.arange(l + Hd, dtype=torch.float32) * b) - wl2
        for i in cen_h.tolist():
            for j in cen_w.tolist():
                if wl == 0:
                    continue
                rows = (int(i) + torch.arange(wl)).tolist()
                cols = (int(j) + torch.arange(wl)).tolist()
                region = x[:, :, rows, :][:, :, :, cols]
                regions.append((int(i), int(j), wl))
                vt = F.max_pool2d(region, (wl, wl))
                v = v + vt / (torch.norm(vt, p=2, dim=1, keepdim=True) + eps)
    return v[:, :, 0, 0], regions


class TorchRRM(tnn.Module):
    def __init__(self, dim):
        super().__init__()
        self.ln1, self.ln2 = tnn.LayerNorm(dim), tnn.LayerNorm(dim)
        self.fc1, self.fc2 = tnn.Linear(dim, dim), tnn.Linear(dim, dim)

    def forward(self, x):
        x = self.ln1(F.adaptive_avg_pool2d(x, 1).flatten(1))
        x = self.ln2(self.fc2(F.relu(self.fc1(x))) + x)
        return F.normalize(x, p=2, dim=1)


class TorchConvAP(tnn.Module):
    """GSV-Cities' Conv-AP, written from its published description: 1x1 conv, adaptive average
    pooling to (s1, s2), flatten, L2. Keys: channel_pool.{weight,bias}."""

    def __init__(self, in_channels, out_channels=512, s1=2, s2=2):
        super().__init__()
        self.channel_pool = tnn.Conv2d(in_channels, out_channels, kernel_size=1, bias=True)
        self.pool = tnn.AdaptiveAvgPool2d((s1, s2))

    def forward(self, x):
        return F.normalize(self.pool(self.channel_pool(x)).flatten(1), p=2, dim=1)


class TorchFeatureMixer(tnn.Module):
    """MixVPR's Feature-Mixer block: x + MLP(LayerNorm(x)) over the last (flattened HW) axis.
    Keys: mix.0 (LayerNorm), mix.1 and mix.3 (Linear)."""

    def __init__(self, positions, mlp_ratio=1):
        super().__init__()
        hidden = int(positions * mlp_ratio)
        self.mix = tnn.Sequential(tnn.LayerNorm(positions), tnn.Linear(positions, hidden), tnn.ReLU(),
                                  tnn.Linear(hidden, positions))

    def forward(self, x):
        return x + self.mix(x)


class TorchMixVPR(tnn.Module):
    """MixVPR: flatten to (B, C, HW), Feature-Mixer blocks, channel projection, row projection,
    flatten, L2. Keys: mix.<k>.mix.*, channel_proj, row_proj."""

    def __init__(self, in_channels, in_h, in_w, out_channels=1024, mix_depth=4, mlp_ratio=1, out_rows=4):
        super().__init__()
        self.mix = tnn.Sequential(*[TorchFeatureMixer(in_h * in_w, mlp_ratio) for _ in range(mix_depth)])
        self.channel_proj = tnn.Linear(in_channels, out_channels)
        self.row_proj = tnn.Linear(in_h * in_w, out_rows)

    def forward(self, x):
        x = self.mix(x.flatten(2))
        x = self.channel_proj(x.permute(0, 2, 1)).permute(0, 2, 1)
        return F.normalize(self.row_proj(x).flatten(1), p=2, dim=-1)


class TorchNetVLAD(tnn.Module):
    """NetVLAD with the per-cluster residual loop; Conv1d on tokens (N, T, D), Conv2d on NCHW."""

    def __init__(self, dim, clusters, tokens=False):
        super().__init__()
        conv = tnn.Conv1d if tokens else tnn.Conv2d
        self.conv = conv(dim, clusters, kernel_size=1, bias=False)
        self.centroids = tnn.Parameter(torch.rand(clusters, dim))
        self.tokens = tokens

    def forward(self, x):
        if self.tokens:
            x = x.permute(0, 2, 1)
        x = F.normalize(x, p=2, dim=1)
        return self.aggregate(x, self.assign(x))

    def assign(self, x):
        return F.softmax(self.conv(x).view(x.size(0), self.centroids.size(0), -1), dim=1)

    def aggregate(self, x, a):
        n, d = x.shape[:2]
        x_flat = x.reshape(n, d, -1)
        vlad = torch.zeros(n, self.centroids.size(0), d)
        for k in range(self.centroids.size(0)):
            residual = x_flat - self.centroids[k].view(1, d, 1)
            vlad[:, k] = (residual * a[:, k:k + 1, :]).sum(dim=-1)
        vlad = F.normalize(vlad, p=2, dim=2).view(n, -1)
        return F.normalize(vlad, p=2, dim=1)


class TorchCRNModule(tnn.Module):
    def __init__(self, dim):
        super().__init__()
        self.downsample_pool = tnn.AvgPool2d(3, stride=2, padding=0, ceil_mode=True)
        self.filter_3_3 = tnn.Conv2d(dim, 32, 3, padding=1)
        self.filter_5_5 = tnn.Conv2d(dim, 32, 5, padding=2)
        self.filter_7_7 = tnn.Conv2d(dim, 20, 7, padding=3)
        self.acc_w = tnn.Conv2d(84, 1, 1)
        for conv in (self.filter_3_3, self.filter_5_5, self.filter_7_7):
            tnn.init.xavier_normal_(conv.weight)
            tnn.init.zeros_(conv.bias)
        tnn.init.ones_(self.acc_w.weight)
        tnn.init.zeros_(self.acc_w.bias)
        self.acc_w.requires_grad_(False)

    def forward(self, x):
        x = self.downsample_pool(x)
        g = torch.cat([self.filter_3_3(x), self.filter_5_5(x), self.filter_7_7(x)], dim=1)
        w = F.relu(self.acc_w(F.relu(g)))
        return F.interpolate(w, scale_factor=2, mode="bilinear", align_corners=False)


class TorchCRN(TorchNetVLAD):
    def __init__(self, dim, clusters):
        super().__init__(dim, clusters)
        self.crn = TorchCRNModule(dim)

    def forward(self, x):
        x = F.normalize(x, p=2, dim=1)
        mask = self.crn(x)
        a = self.assign(x) * mask.view(x.size(0), 1, -1)
        return self.aggregate(x, a)


# ---------------------------------------------------------------------------------------------
# ViT (HF ViTModel key names) and CCT (the benchmark's key names), eval-mode forward.


def _multi_head(q, k, v, heads, scale):
    """[B, T, C] q, k, v -> softmax(q k^T * scale) v with `heads` heads -> [B, T, C]."""
    b, t, c = q.shape
    q, k, v = (a.reshape(b, t, heads, c // heads).transpose(1, 2) for a in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
    return (weights @ v).transpose(1, 2).reshape(b, t, c)


class _DenseHolder(tnn.Module):
    """HF's `<name>.dense` wrapper modules."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.dense = tnn.Linear(n_in, n_out)


class TorchViTSelfAttention(tnn.Module):
    def __init__(self):
        super().__init__()
        self.query, self.key, self.value = (tnn.Linear(768, 768) for _ in range(3))

    def forward(self, x):
        return _multi_head(self.query(x), self.key(x), self.value(x), 12, 1 / math.sqrt(64))


class TorchViTLayer(tnn.Module):
    def __init__(self):
        super().__init__()
        self.attention = tnn.Module()
        self.attention.attention = TorchViTSelfAttention()
        self.attention.output = _DenseHolder(768, 768)
        self.intermediate = _DenseHolder(768, 3072)
        self.output = _DenseHolder(3072, 768)
        self.layernorm_before = tnn.LayerNorm(768, eps=1e-12)
        self.layernorm_after = tnn.LayerNorm(768, eps=1e-12)

    def forward(self, x):
        x = x + self.attention.output.dense(self.attention.attention(self.layernorm_before(x)))
        h = F.gelu(self.intermediate.dense(self.layernorm_after(x)))
        return x + self.output.dense(h)


class TorchViTModel(tnn.Module):
    """HF ViTModel layout: embeddings, encoder.layer[i], layernorm, pooler (unused)."""

    def __init__(self, image_size, layers=12):
        super().__init__()
        tokens = (image_size // 16) ** 2
        self.embeddings = tnn.Module()
        self.embeddings.cls_token = tnn.Parameter(torch.zeros(1, 1, 768))
        self.embeddings.position_embeddings = tnn.Parameter(torch.zeros(1, tokens + 1, 768))
        self.embeddings.patch_embeddings = tnn.Module()
        self.embeddings.patch_embeddings.projection = tnn.Conv2d(3, 768, 16, stride=16)
        self.encoder = tnn.Module()
        self.encoder.layer = tnn.ModuleList(TorchViTLayer() for _ in range(layers))
        self.layernorm = tnn.LayerNorm(768, eps=1e-12)
        self.pooler = _DenseHolder(768, 768)

    def forward(self, x, depth=None):
        """x: [B, 3, S, S] -> last_hidden_state [B, T + 1, 768]."""
        emb = self.embeddings
        patches = emb.patch_embeddings.projection(x).flatten(2).transpose(1, 2)
        x = torch.cat([emb.cls_token.expand(len(x), -1, -1), patches], 1) + emb.position_embeddings
        for layer in self.encoder.layer[:depth]:
            x = layer(x)
        return self.layernorm(x)


class TorchCCTAttention(tnn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = tnn.Linear(384, 1152, bias=False)
        self.proj = tnn.Linear(384, 384)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, c).unbind(2)
        return self.proj(_multi_head(q, k, v, 6, 64 ** -0.5))


class TorchCCTLayer(tnn.Module):
    def __init__(self):
        super().__init__()
        self.pre_norm = tnn.LayerNorm(384)
        self.self_attn = TorchCCTAttention()
        self.linear1 = tnn.Linear(384, 1152)
        self.norm1 = tnn.LayerNorm(384)
        self.linear2 = tnn.Linear(1152, 384)

    def forward(self, x):
        x = self.norm1(x + self.self_attn(self.pre_norm(x)))
        return x + self.linear2(F.gelu(self.linear1(x)))


class TorchCCT(tnn.Module):
    """CCT-14/7x2-384 layout: tokenizer.conv_layers, classifier.{positional_emb, blocks, ...}."""

    def __init__(self):
        super().__init__()
        self.tokenizer = tnn.Module()
        self.tokenizer.conv_layers = tnn.Sequential(*(
            tnn.Sequential(tnn.Conv2d(c_in, c_out, 7, stride=2, padding=3, bias=False), tnn.ReLU(),
                           tnn.MaxPool2d(3, stride=2, padding=1))
            for c_in, c_out in ((3, 64), (64, 384))))
        self.classifier = tnn.Module()
        self.classifier.positional_emb = tnn.Parameter(torch.zeros(1, 576, 384))
        self.classifier.attention_pool = tnn.Linear(384, 1)
        self.classifier.blocks = tnn.ModuleList(TorchCCTLayer() for _ in range(14))
        self.classifier.norm = tnn.LayerNorm(384)
        self.classifier.fc = tnn.Linear(384, 1000)

    def forward(self, x, depth=None, output="tokens"):
        x = self.tokenizer.conv_layers(x).flatten(2, 3).transpose(1, 2)
        head = self.classifier
        x = x + head.positional_emb
        for block in head.blocks[:depth]:
            x = block(x)
        x = head.norm(x)
        if output == "cls":
            return x[:, 0]
        if output == "seqpool":
            return (F.softmax(head.attention_pool(x), dim=1).transpose(-1, -2) @ x).squeeze(-2)
        return x


# ---------------------------------------------------------------------------------------------
# The benchmark's GeoLocalizationNet: its nn.Sequential wrappers fix the state-dict key names
# (backbone.<child>, aggregation.<index>...) that load_benchmark_checkpoint must read.


class L2Norm(tnn.Module):
    def forward(self, x):
        return F.normalize(x, p=2, dim=1)


class Flatten(tnn.Module):
    def forward(self, x):
        assert x.shape[2] == x.shape[3] == 1, x.shape
        return x[:, :, 0, 0]


class GeM(tnn.Module):
    """Learnable-p GeM returning (N, C, 1, 1), on maps NCHW or tokens (N, T, D)."""

    def __init__(self, p=3.0):
        super().__init__()
        self.p = tnn.Parameter(torch.ones(1) * p)

    def forward(self, x):
        return torch_gem(x, self.p)[:, :, None, None]


class Pool(tnn.Module):
    """SPoC / MAC / R-MAC (no parameters), returning (N, C, 1, 1)."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def forward(self, x):
        if self.kind == "spoc":
            return F.adaptive_avg_pool2d(x, 1)
        if self.kind == "mac":
            return F.adaptive_max_pool2d(x, 1)
        return torch_rmac(x)[0][:, :, None, None]


class ViTBackbone(tnn.Module):
    """The benchmark's ViT wrapper (keys backbone.vit_model.*): CLS token or patch tokens."""

    def __init__(self, output, image_size=224, depth=None):
        super().__init__()
        self.vit_model = TorchViTModel(image_size)
        self.output, self.depth = output, depth

    def forward(self, x):
        hidden = self.vit_model(x, self.depth)
        return hidden[:, 0] if self.output == "cls" else hidden[:, 1:]


class CCTBackbone(TorchCCT):
    """The benchmark's CCT (keys backbone.tokenizer.*, backbone.classifier.*)."""

    def __init__(self, output, depth=None):
        super().__init__()
        self.output, self.depth = output, depth

    def forward(self, x):
        return super().forward(x, self.depth, self.output)


def benchmark_aggregation(name, l2, channels, clusters, tokens, fc_output_dim=None):
    """The benchmark's `aggregation` module for a configuration (network.py's wrapping)."""
    if name in ("gem", "spoc", "mac", "rmac"):
        pool = GeM() if name == "gem" else Pool(name)
        layers = {"before_pool": [L2Norm(), pool, Flatten()], "after_pool": [pool, L2Norm(), Flatten()],
                  "none": [pool, Flatten()]}[l2]
        aggregation = tnn.Sequential(*layers)
    elif name == "netvlad":
        aggregation = TorchNetVLAD(channels, clusters, tokens=tokens)
    elif name == "crn":
        aggregation = TorchCRN(channels, clusters)
    elif name == "rrm":
        aggregation = TorchRRM(channels)
    else:  # cls / seqpool: the backbone already returns the vector
        aggregation = tnn.Identity()
    if fc_output_dim is None:
        return aggregation
    in_dim = channels * clusters if name in ("netvlad", "crn") else channels
    return tnn.Sequential(aggregation, tnn.Linear(in_dim, fc_output_dim), L2Norm())


class BenchmarkNet(tnn.Module):
    def __init__(self, backbone, aggregation):
        super().__init__()
        self.backbone, self.aggregation = backbone, aggregation

    def forward(self, x):
        return self.aggregation(self.backbone(x))


# ---------------------------------------------------------------------------------------------
# DINOv2 (facebookresearch/dinov2's DinoVisionTransformer, its hub configuration: block_chunks 0,
# LayerScale, qkv bias, no drop path), SALAD (serizba/salad) and their wrappers, written from
# their published code. Key names follow their state dicts.


class DinoAttention(tnn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = tnn.Linear(dim, 3 * dim)
        self.proj = tnn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).unbind(2)
        x = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class DinoLayerScale(tnn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = tnn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class DinoMlp(tnn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = tnn.Linear(dim, hidden), tnn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class DinoSwiGLU(tnn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        self.w12, self.w3 = tnn.Linear(dim, 2 * hidden), tnn.Linear(hidden, dim)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class DinoBlock(tnn.Module):
    def __init__(self, dim, heads, ffn):
        super().__init__()
        self.norm1 = tnn.LayerNorm(dim, eps=1e-6)
        self.attn = DinoAttention(dim, heads)
        self.ls1 = DinoLayerScale(dim)
        self.norm2 = tnn.LayerNorm(dim, eps=1e-6)
        self.mlp = (DinoSwiGLU if ffn == "swiglu" else DinoMlp)(dim, 4 * dim)
        self.ls2 = DinoLayerScale(dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoVisionTransformer(tnn.Module):
    """dinov2's hub ViT (img_size 518, patch 14); `registers` as its *_reg models (4 tokens,
    interpolate_antialias=True, interpolate_offset=0)."""

    def __init__(self, dim, depth, heads, ffn="mlp", registers=False):
        super().__init__()
        self.patch_size, self.num_register_tokens = 14, 4 if registers else 0
        self.interpolate_antialias, self.interpolate_offset = (True, 0.0) if registers else (False, 0.1)
        self.patch_embed = tnn.Module()
        self.patch_embed.proj = tnn.Conv2d(3, dim, 14, 14)
        self.cls_token = tnn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = tnn.Parameter(torch.randn(1, 37 * 37 + 1, dim) * 0.02)
        self.register_tokens = tnn.Parameter(torch.randn(1, 4, dim) * 0.02) if registers else None
        self.mask_token = tnn.Parameter(torch.zeros(1, dim))
        self.blocks = tnn.ModuleList([DinoBlock(dim, heads, ffn) for _ in range(depth)])
        self.norm = tnn.LayerNorm(dim, eps=1e-6)

    def interpolate_pos_encoding(self, x, w, h):
        npatch, N = x.shape[1] - 1, self.pos_embed.shape[1] - 1
        if npatch == N and w == h:
            return self.pos_embed
        class_pos_embed, patch_pos_embed = self.pos_embed[:, 0], self.pos_embed[:, 1:]
        dim, w0, h0, M = x.shape[-1], w // self.patch_size, h // self.patch_size, int(math.sqrt(N))
        if self.interpolate_offset:
            kwargs = {"scale_factor": (float(w0 + self.interpolate_offset) / M, float(h0 + self.interpolate_offset) / M)}
        else:
            kwargs = {"size": (w0, h0)}
        patch_pos_embed = F.interpolate(patch_pos_embed.reshape(1, M, M, dim).permute(0, 3, 1, 2), mode="bicubic",
                                        antialias=self.interpolate_antialias, **kwargs)
        assert (w0, h0) == patch_pos_embed.shape[-2:]
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
        return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)

    def prepare_tokens_with_masks(self, x):
        B, nc, w, h = x.shape
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, w, h)
        if self.register_tokens is not None:
            x = torch.cat((x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]), dim=1)
        return x

    def forward_features(self, x):
        x = self.prepare_tokens_with_masks(x)
        for blk in self.blocks:
            x = blk(x)
        x_norm = self.norm(x)
        return {"x_norm_clstoken": x_norm[:, 0], "x_norm_patchtokens": x_norm[:, self.num_register_tokens + 1:],
                "x_prenorm": x}


def log_otp_solver(log_a, log_b, M, num_iters=20, reg=1.0):
    M = M / reg
    u, v = torch.zeros_like(log_a), torch.zeros_like(log_b)
    for _ in range(num_iters):
        u = log_a - torch.logsumexp(M + v.unsqueeze(1), dim=2).squeeze()
        v = log_b - torch.logsumexp(M + u.unsqueeze(2), dim=1).squeeze()
    return M + u.unsqueeze(2) + v.unsqueeze(1)


def get_matching_probs(S, dustbin_score=1.0, num_iters=3, reg=1.0):
    batch_size, m, n = S.size()
    S_aug = torch.empty(batch_size, m + 1, n, dtype=S.dtype, device=S.device)
    S_aug[:, :m, :n] = S
    S_aug[:, m, :] = dustbin_score
    norm = -torch.tensor(math.log(n + m), device=S.device)
    log_a, log_b = norm.expand(m + 1).contiguous(), norm.expand(n).contiguous()
    log_a[-1] = log_a[-1] + math.log(n - m)
    log_a, log_b = log_a.expand(batch_size, -1), log_b.expand(batch_size, -1)
    return log_otp_solver(log_a, log_b, S_aug, num_iters=num_iters, reg=reg) - norm


class TorchSALAD(tnn.Module):
    """serizba/salad's SALAD aggregator (dropout as in eval mode)."""

    def __init__(self, num_channels=1536, num_clusters=64, cluster_dim=128, token_dim=256):
        super().__init__()
        self.num_clusters, self.cluster_dim = num_clusters, cluster_dim
        self.token_features = tnn.Sequential(tnn.Linear(num_channels, 512), tnn.ReLU(), tnn.Linear(512, token_dim))
        self.cluster_features = tnn.Sequential(tnn.Conv2d(num_channels, 512, 1), tnn.Dropout(0.3), tnn.ReLU(),
                                               tnn.Conv2d(512, cluster_dim, 1))
        self.score = tnn.Sequential(tnn.Conv2d(num_channels, 512, 1), tnn.Dropout(0.3), tnn.ReLU(),
                                    tnn.Conv2d(512, num_clusters, 1))
        self.dust_bin = tnn.Parameter(torch.tensor(1.))

    def forward(self, x):
        x, t = x
        f = self.cluster_features(x).flatten(2)
        p = self.score(x).flatten(2)
        t = self.token_features(t)
        p = torch.exp(get_matching_probs(p, self.dust_bin, 3))[:, :-1, :]
        p = p.unsqueeze(1).repeat(1, self.cluster_dim, 1, 1)
        f = f.unsqueeze(2).repeat(1, 1, self.num_clusters, 1)
        f = torch.cat([F.normalize(t, p=2, dim=-1), F.normalize((f * p).sum(dim=-1), p=2, dim=1).flatten(1)], dim=-1)
        return F.normalize(f, p=2, dim=-1)


class SaladDINOv2(tnn.Module):
    """SALAD's backbone wrapper: the hub ViT as `model`, its final norm applied, (map, cls) out."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        B, C, H, W = x.shape
        x = self.model.prepare_tokens_with_masks(x)
        for blk in self.model.blocks:
            x = blk(x)
        x = self.model.norm(x)
        f = x[:, 1:].reshape((B, H // 14, W // 14, x.shape[-1])).permute(0, 3, 1, 2)
        return f, x[:, 0]


class SaladVPRModel(tnn.Module):
    """SALAD's VPRModel: `backbone.model.*` and `aggregator.*`, as in its dino_salad.ckpt."""

    def __init__(self, backbone, aggregator):
        super().__init__()
        self.backbone, self.aggregator = backbone, aggregator

    def forward(self, x):
        return self.aggregator(self.backbone(x))


class TorchBoQBlock(tnn.Module):
    """amaralibey/Bag-of-Queries' BoQBlock (its attention maps not returned)."""

    def __init__(self, in_dim, num_queries, nheads=8):
        super().__init__()
        self.encoder = tnn.TransformerEncoderLayer(d_model=in_dim, nhead=nheads, dim_feedforward=4 * in_dim,
                                                   batch_first=True, dropout=0.)
        self.queries = tnn.Parameter(torch.randn(1, num_queries, in_dim))
        self.self_attn = tnn.MultiheadAttention(in_dim, num_heads=nheads, batch_first=True)
        self.norm_q = tnn.LayerNorm(in_dim)
        self.cross_attn = tnn.MultiheadAttention(in_dim, num_heads=nheads, batch_first=True)
        self.norm_out = tnn.LayerNorm(in_dim)

    def forward(self, x):
        x = self.encoder(x)
        q = self.queries.repeat(x.size(0), 1, 1)
        q = self.norm_q(q + self.self_attn(q, q, q)[0])
        return x, self.norm_out(self.cross_attn(q, x, x)[0])


class TorchBoQ(tnn.Module):
    def __init__(self, in_channels=1024, proj_channels=512, num_queries=32, num_layers=2, row_dim=32):
        super().__init__()
        self.proj_c = tnn.Conv2d(in_channels, proj_channels, kernel_size=3, padding=1)
        self.norm_input = tnn.LayerNorm(proj_channels)
        self.boqs = tnn.ModuleList([TorchBoQBlock(proj_channels, num_queries, nheads=proj_channels // 64)
                                    for _ in range(num_layers)])
        self.fc = tnn.Linear(num_layers * num_queries, row_dim)

    def forward(self, x):
        x = self.norm_input(self.proj_c(x).flatten(2).permute(0, 2, 1))
        outs = []
        for boq in self.boqs:
            x, out = boq(x)
            outs.append(out)
        out = self.fc(torch.cat(outs, dim=1).permute(0, 2, 1)).flatten(1)
        return F.normalize(out, p=2, dim=-1)


class BoQDinoV2(tnn.Module):
    """BoQ's DINOv2 wrapper: the hub ViT as `dino`, the last block's patch tokens as a map (no final norm)."""

    def __init__(self, dino):
        super().__init__()
        self.dino = dino

    def forward(self, x):
        B, _, H, W = x.shape
        x = self.dino.prepare_tokens_with_masks(x)
        for blk in self.dino.blocks:
            x = blk(x)
        x = x[:, 1:]
        return x.permute(0, 2, 1).reshape(B, x.shape[-1], H // 14, W // 14)


class BoQVPRModel(tnn.Module):
    """BoQ's hubconf VPRModel (`backbone.*`, `aggregator.*`), the descriptor only."""

    def __init__(self, backbone, aggregator):
        super().__init__()
        self.backbone, self.aggregator = backbone, aggregator

    def forward(self, x):
        return self.aggregator(self.backbone(x))


class MegaLocNet(tnn.Module):
    """gmberton/MegaLoc's network: its DINOv2 (dinov2's ViT without a mask token) as `backbone`,
    SALAD as `aggregator.agg` and a Linear as `aggregator.linear`, then L2."""

    def __init__(self, dim, depth, heads, clusters=64, cluster_dim=256, out_dim=8448):
        super().__init__()
        self.backbone = DinoVisionTransformer(dim, depth, heads)
        self.backbone.mask_token = None
        self.aggregator = tnn.Module()
        self.aggregator.agg = TorchSALAD(dim, clusters, cluster_dim, 256)
        self.aggregator.linear = tnn.Linear(256 + clusters * cluster_dim, out_dim)

    def forward(self, x):
        B, _, H, W = x.shape
        features = self.backbone.forward_features(x)
        maps = features["x_norm_patchtokens"].reshape(B, H // 14, W // 14, -1).permute(0, 3, 1, 2)
        return F.normalize(self.aggregator.linear(self.aggregator.agg((maps, features["x_norm_clstoken"]))), dim=-1)
