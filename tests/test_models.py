"""The generalized-layer view must match METHOD.md §4's index tables exactly (32x32 inputs)."""

import pytest
import torch

from pipeline.errors import InputError
from pipeline.layers import LayerChain, TimmChain, layer_shapes, layer_view
from pipeline.models import STANDARD_LAYERS, ModelSpec, build_model


def _cnn(*groups):
    """Expand (count, channels, side) groups into a list of layer shapes."""
    return [(c, s, s) for n, c, s in groups for _ in range(n)]


TABLES = {
    "resnet9": _cnn((2, 64, 32), (1, 128, 16), (1, 256, 8), (1, 512, 4)) + [(512,)],
    "resnet34": _cnn((4, 64, 32), (4, 128, 16), (6, 256, 8), (3, 512, 4)) + [(512,)],
    "vgg19_bn": _cnn((2, 64, 32), (2, 128, 16), (4, 256, 8), (4, 512, 4), (4, 512, 2)) + [(512,), (4096,), (4096,)],
    "vgg11_bn": _cnn((1, 64, 32), (1, 128, 16), (2, 256, 8), (2, 512, 4), (2, 512, 2)) + [(512,), (4096,), (4096,)],
    "mobilenetv2": _cnn((1, 32, 32), (1, 16, 32), (2, 24, 16), (3, 32, 8), (4, 64, 4), (3, 96, 4), (3, 160, 2),
                        (1, 320, 2), (1, 1280, 2)) + [(1280,)],
    "vit_b": [(65, 768)] * 13,
    "vit_ett": [(65, 192)] * 9,
}


@pytest.mark.parametrize("arch", sorted(TABLES))
def test_layer_table_matches_method(arch):
    model = build_model(ModelSpec(arch, num_classes=100))
    assert layer_shapes(model, (3, 32, 32)) == TABLES[arch]


def test_table_sizes_and_standard_lists():
    counts = {a: len(t) for a, t in TABLES.items()}
    assert counts == {"resnet9": 6, "resnet34": 18, "vgg19_bn": 19, "vgg11_bn": 11, "mobilenetv2": 20,
                      "vit_b": 13, "vit_ett": 9}
    assert STANDARD_LAYERS == {"resnet9": [1, 2, 3, 4], "resnet34": [3, 7, 13, 16], "mobilenetv2": [3, 6, 13, 17],
                               "vgg11_bn": [1, 3, 5, 7], "vgg19_bn": [3, 7, 11, 15], "vit_ett": [1, 3, 5, 7],
                               "vit_b": [2, 4, 8, 10]}


def test_tinyimagenet_resnet_keeps_maxpool():
    shapes = layer_shapes(build_model(ModelSpec("resnet34", 200, image_size=64)), (3, 64, 64))
    assert shapes[0] == (64, 64, 64) and shapes[1] == (64, 32, 32) and shapes[14] == (512, 4, 4)


@pytest.mark.parametrize("arch", ["resnet9", "mobilenetv2", "vgg11_bn", "vit_ett"])
def test_collect_and_head_reproduce_forward(arch):
    torch.manual_seed(0)
    model = build_model(ModelSpec(arch, num_classes=10, in_chans=1, width=0.25)).eval()
    view = layer_view(model)
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        full = model(x)
        k = STANDARD_LAYERS[arch][-1]
        feats = view.collect(x, [k, 0, k])  # any order, duplicates allowed
        assert torch.equal(feats[0], feats[2])
        assert torch.allclose(view.head(feats[0], k), full, atol=1e-6)
        assert torch.equal(view.collect(x, [-1])[0], view.collect(x, [len(view) - 1])[0])


def test_collect_stops_after_deepest_layer():
    model = build_model(ModelSpec("resnet9", 10, width=0.25))
    view = LayerChain(model)
    calls = []
    model[-1].register_forward_hook(lambda *a: calls.append("linear"))
    view.collect(torch.randn(2, 3, 32, 32), [2])
    assert calls == []


def test_layer_index_out_of_range_is_input_error():
    view = layer_view(build_model(ModelSpec("resnet9", 10, width=0.25)))
    assert view.index(-1) == 5
    with pytest.raises(InputError, match="6 generalized layers"):
        view.index(6)


def test_width_multiplier_scales_channels():
    shapes = layer_shapes(build_model(ModelSpec("resnet34", 10, in_chans=1, width=0.125)), (1, 32, 32))
    assert [s[0] for s in shapes] == [8] * 4 + [16] * 4 + [32] * 6 + [64] * 4


def test_students_start_as_the_reference_initialises_them():
    torch.manual_seed(0)
    mnv2 = build_model(ModelSpec("mobilenetv2", 100))
    head = mnv2[-1]
    assert head.weight.std().item() == pytest.approx(0.01, rel=0.05) and not head.bias.any()
    vit = build_model(ModelSpec("vit_ett", 100, in_chans=3, image_size=32))
    patch, block = vit[0].proj, vit[1]
    assert patch.weight.std().item() == pytest.approx((1 / (3 * 4 * 4)) ** 0.5, rel=0.05) and not patch.bias.any()
    bound = (6 / (192 + 3 * 192)) ** 0.5  # xavier_uniform over the whole (3 dim, dim) in-projection
    assert block.qkv.weight.abs().max().item() == pytest.approx(bound, rel=0.01) and not block.qkv.bias.any()
    assert not block.proj.bias.any()
    assert 0 < block.mlp[0].bias.std().item() < 1e-5 and 0 < block.mlp[2].bias.std().item() < 1e-5


def test_vit_needs_an_image_size_divisible_by_8():
    with pytest.raises(InputError, match="vit_ett needs an image size divisible by 8"):
        build_model(ModelSpec("vit_ett", 10, in_chans=1, image_size=28))


def test_unknown_arch_and_pretrained_paper_model_fail_clearly():
    with pytest.raises(InputError, match="unknown arch 'resnet18'"):
        build_model(ModelSpec("resnet18", 10))
    with pytest.raises(InputError, match="no pretrained weights for resnet34"):
        build_model(ModelSpec("resnet34", 10, pretrained=True))


def test_timm_model_layers_from_feature_api():
    model = build_model(ModelSpec("timm:resnet18", num_classes=10, in_chans=1)).eval()
    view = layer_view(model)
    assert isinstance(view, TimmChain) and len(view) == 5
    assert layer_shapes(model, (1, 32, 32)) == [(64, 16, 16), (64, 8, 8), (128, 4, 4), (256, 2, 2), (512, 1, 1)]
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 10)
    x = torch.randn(2, 1, 32, 32)
    feats, logits = view.features_and_logits(x, [3, 1, 3])  # one forward pass, any order, repeats allowed
    assert [f.shape[1] for f in feats] == [256, 64, 256] and torch.equal(feats[0], view.collect(x, [3])[0])
    assert torch.allclose(logits, model(x), atol=1e-6)


def test_timm_pretrained_offline_fails_fast(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, when the hub was imported
    with pytest.raises(InputError, match="cannot fetch pretrained weights for timm:resnet18"):
        build_model(ModelSpec("timm:resnet18", num_classes=10, pretrained=True))


def test_unknown_timm_model():
    with pytest.raises(InputError, match="unknown timm model"):
        build_model(ModelSpec("timm:no_such_net", 10))
