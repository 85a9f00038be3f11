"""Backbones as one table of specs (backbone_specs.py): every spec builds, each stage halves the
resolution from stride 4 to 32, and the channels are read off the built network."""

import pytest
import torch
from torch import nn

from querydet_models import backbone_specs
from querydet_models.backbone_specs import BACKBONE_SPECS, BACKBONES, BackboneSpec
from querydet_models.config import ModelConfig
from querydet_models.layers.backbones import build_backbone, stage_channels

# the channels torchvision's own feature extractors report for these stages
KNOWN = {"resnet18": [64, 128, 256, 512], "resnet34": [64, 128, 256, 512],
         "resnet50": [256, 512, 1024, 2048], "mobilenet_v2": [24, 32, 96, 320],
         "shufflenet_v2": [24, 116, 232, 464]}


@pytest.mark.parametrize("name", BACKBONES)
def test_every_spec_builds_c2_to_c5(name):
    backbone = build_backbone(name).eval()
    assert backbone.out_channels == KNOWN[name]
    with torch.no_grad():
        out = backbone(torch.zeros(1, 3, 128, 160))
    assert list(out) == ["c2", "c3", "c4", "c5"]
    assert [tuple(v.shape[1:]) for v in out.values()] == [
        (c, 128 // s, 160 // s) for c, s in zip(KNOWN[name], (4, 8, 16, 32))]


def test_the_config_lists_the_table():
    assert BACKBONES == tuple(BACKBONE_SPECS)
    assert ModelConfig(backbone="shufflenet_v2").backbone == "shufflenet_v2"
    with pytest.raises(Exception, match="model.backbone"):
        ModelConfig(backbone="vgg16")


def test_channels_are_read_off_the_network_without_changing_it():
    stages = [nn.Sequential(nn.Conv2d(3, 5, 3, 2, 1), nn.BatchNorm2d(5)),
              nn.Conv2d(5, 7, 3, 2, 1)]
    stages[0].train()
    before = stages[0][1].running_mean.clone()
    assert stage_channels(stages) == [5, 7]
    assert torch.equal(stages[0][1].running_mean, before)  # no statistics updated
    assert stages[0].training and stages[1].training  # modes restored


def test_a_new_backbone_is_one_spec(monkeypatch):
    spec = BackboneSpec("resnet18_wide_stem", "resnet18", "ResNet18_Weights",
                        (("conv1", "bn1", "relu", "maxpool"), ("layer1", "layer2"), ("layer3",),
                         ("layer4",)))
    monkeypatch.setitem(backbone_specs.BACKBONE_SPECS, spec.name, spec)
    backbone = build_backbone(spec.name)
    assert backbone.out_channels == [64, 128, 256, 512]
    with torch.no_grad():
        shapes = [v.shape[-1] for v in backbone.eval()(torch.zeros(1, 3, 64, 64)).values()]
    assert shapes == [16, 8, 4, 2]
