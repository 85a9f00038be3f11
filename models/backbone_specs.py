"""The backbones a config may name, one spec each: which torchvision architecture, its weights
enum, and the modules that make its four stages (C2..C5, strides 4, 8, 16, 32). Channel counts
are not written here: `layers.backbones.build_backbone` reads them off the built network.

Plain data, no torch: the config (and the CLI's `--help`) list the names without loading it.
Adding a backbone is one spec in this table.
"""

from __future__ import annotations

from dataclasses import dataclass

# A part of a stage: an attribute of the torchvision network ("layer2"), or a slice of one of
# its Sequentials ("features", 0, 4) meaning net.features[0:4].
Part = str | tuple[str, int, int]


@dataclass(frozen=True)
class BackboneSpec:
    """One backbone.

    Attributes:
        name: what configs call it (`model.backbone`).
        architecture: the torchvision.models function that builds it.
        weights_enum: torchvision's enum of its published weights.
        stages: the parts of each of the four stages, in order; a stage of one part is that
            module itself, a stage of several is a Sequential of them.
    """

    name: str
    architecture: str
    weights_enum: str
    stages: tuple[tuple[Part, ...], ...]


_RESNET_STAGES = (("conv1", "bn1", "relu", "maxpool", "layer1"), ("layer2",), ("layer3",),
                  ("layer4",))

BACKBONE_SPECS: dict[str, BackboneSpec] = {s.name: s for s in (
    BackboneSpec("resnet18", "resnet18", "ResNet18_Weights", _RESNET_STAGES),
    BackboneSpec("resnet34", "resnet34", "ResNet34_Weights", _RESNET_STAGES),
    BackboneSpec("resnet50", "resnet50", "ResNet50_Weights", _RESNET_STAGES),
    # strides: features[0:4] -> 4, [4:7] -> 8, [7:14] -> 16, [14:18] -> 32 (the 1280-wide
    # features[18] is skipped)
    BackboneSpec("mobilenet_v2", "mobilenet_v2", "MobileNet_V2_Weights",
                 ((("features", 0, 4),), (("features", 4, 7),), (("features", 7, 14),),
                  (("features", 14, 18),))),
    BackboneSpec("shufflenet_v2", "shufflenet_v2_x1_0", "ShuffleNet_V2_X1_0_Weights",
                 (("conv1", "maxpool"), ("stage2",), ("stage3",), ("stage4",))),
)}
BACKBONES = tuple(BACKBONE_SPECS)
