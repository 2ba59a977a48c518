"""The segmentation network, built from a small config (saved in every checkpoint).

Default: MONAI ``SegResNet`` (Myronenko 2018). Why this one of the three the issue allows:
- it trains with batch size 1-2 (group normalisation, no batch statistics), what a CPU or a
  single GPU affords on 3D patches;
- residual blocks of few filters: 16 initial filters give 4.7 M parameters (18.8 MB of float32
  weights, under the 20 MB the repository may ship) and a forward pass that stays usable on
  CPU, which is the pipeline's fallback device;
- the anisotropy of the acquisitions (1.4-1.9 mm in-plane, 3 mm slices) is handled by the
  working spacing (models/data.py) rather than by per-level anisotropic kernels, which is what
  DynUNet would add; DynUNet stays available here for the GPU training of the next step.
``BasicUNet`` is kept for comparison (more parameters for the same receptive field).
"""

from __future__ import annotations

from typing import Any

import torch

NETWORK_NAMES = ("segresnet", "basicunet", "dynunet")


def default_network_config(in_channels: int, out_channels: int) -> dict[str, Any]:
    return {"name": "segresnet", "in_channels": in_channels, "out_channels": out_channels, "init_filters": 16,
            "dropout": 0.1}


def build_network(config: dict[str, Any]) -> torch.nn.Module:
    """A MONAI 3D network from ``config`` (``name``, ``in_channels``, ``out_channels``, ``init_filters``)."""
    from monai.networks.nets import BasicUNet, DynUNet, SegResNet

    name = config.get("name")
    cin, cout, f = int(config["in_channels"]), int(config["out_channels"]), int(config.get("init_filters", 16))
    if name == "segresnet":
        return SegResNet(spatial_dims=3, in_channels=cin, out_channels=cout, init_filters=f,
                         blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1), dropout_prob=config.get("dropout"))
    if name == "basicunet":
        return BasicUNet(spatial_dims=3, in_channels=cin, out_channels=cout,
                         features=(f, f, 2 * f, 4 * f, 8 * f, f), dropout=float(config.get("dropout") or 0.0))
    if name == "dynunet":
        # Slices (array axis 0) are ~2x thicker than the pixels: no z pooling at the first level.
        strides = [(1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2)]
        kernels = [(1, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3)]
        return DynUNet(spatial_dims=3, in_channels=cin, out_channels=cout, kernel_size=kernels, strides=strides,
                       upsample_kernel_size=strides[1:], filters=[f, 2 * f, 4 * f, 8 * f], norm_name="instance",
                       dropout=config.get("dropout"))
    raise ValueError(f"unknown network {name!r}; choose from {NETWORK_NAMES}")


def count_parameters(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
