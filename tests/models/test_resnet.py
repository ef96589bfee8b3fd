import torch

from lean.models.resnet import Bottleneck, resnet50


def test_resnet50_levels_and_strides():
    model = resnet50().eval()
    with torch.no_grad():
        levels = model(torch.zeros(1, 3, 64, 96))
    assert [tuple(t.shape) for t in levels] == [(1, 512, 8, 12), (1, 1024, 4, 6), (1, 2048, 2, 3)]
    assert sum(isinstance(m, Bottleneck) for m in model.modules()) == 16


def test_level_consumers_are_the_next_stage_first_convs():
    model = resnet50()
    consumers = model.level_consumers()
    assert consumers[0] is model.layer3[0].conv1 and consumers[1] is model.layer4[0].conv1
