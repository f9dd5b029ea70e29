"""The seed's arch names (PASSL/PLSC `-a moco_vit_small|moco_vit_base|moco_vit_conv_small|moco_vit_conv_base`)
are accepted by models' builders as aliases of ours; unknown names still fail with their own name."""
import numpy as np
import paddle
import pytest

from paddle_impl import models, vits

SMALL = dict(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2)


@pytest.mark.parametrize('alias,ours', [('moco_vit_small', 'vit_small'), ('moco_vit_base', 'vit_base'),
                                        ('moco_vit_conv_small', 'vit_conv_small'),
                                        ('moco_vit_conv_base', 'vit_conv_base')])
def test_canonical_arch(alias, ours):
    assert models.canonical_arch(alias) == ours
    assert models.canonical_arch(ours) == ours
    models.check_arch(alias)  # accepted


def test_unknown_names_pass_through_and_still_fail():
    for name in ('resnet50', 'vit_huge', 'moco_resnet50', 'MOCO_VIT_SMALL', 'bogus', '', None, 3):
        assert models.canonical_arch(name) is name
    with pytest.raises(ValueError, match="unknown arch 'moco_vit_tiny'"):
        models.encoder_factory('moco_vit_tiny')
    with pytest.raises(ValueError, match="unknown arch 'bogus'"):
        models.build_moco('bogus')


@pytest.mark.parametrize('alias,ours', [('moco_vit_small', 'vit_small'), ('moco_vit_conv_small', 'vit_conv_small')])
def test_alias_builds_the_same_model(alias, ours):
    small = dict(SMALL, patch_size=16, img_size=32) if 'conv' in ours else SMALL  # the conv stem is patch 16
    built = {}
    for name in (alias, ours):
        paddle.seed(0)
        m = models.build_moco(name, dim=8, mlp_dim=16, T=0.2, **small)
        built[name] = {k: v.numpy() for k, v in m.state_dict().items()}
    assert list(built[alias]) == list(built[ours])
    for k in built[ours]:
        np.testing.assert_array_equal(built[alias][k], built[ours][k], err_msg=k)
    enc = models.encoder_factory(alias, **small)(num_classes=4)
    assert isinstance(enc.patch_embed, vits.ConvStem) == ('conv' in ours)
