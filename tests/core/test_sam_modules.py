"""Our SAM prompt encoder, mask decoder and ViT encoder against the official segment-anything modules.

Official modules come from PyPI ``segment-anything==1.0`` (see official_sam.py); weights are
random with fixed seeds, state dicts are exchanged strictly in both directions and outputs must
agree to 1e-5 relative (float32).
"""

from __future__ import annotations

import copy
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

try:
    from . import official_sam
except ImportError:
    import official_sam

from rwkvsam_core.modeling.common import LayerNorm2d
from rwkvsam_core.modeling.mask_decoder import MaskDecoder, TwoWayTransformer
from rwkvsam_core.modeling.prompt_encoder import PromptEncoder
from rwkvsam_core.modeling.sam_vit import VIT_CONFIGS, ImageEncoderViT, build_sam_vit_encoder

TOL = 1e-5


@pytest.fixture(scope="module")
def sa():
    return official_sam.load()


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    ours, ref = ours.double(), ref.double()
    return ((ours - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def randomise(module: nn.Module, seed: int, std: float = 0.5) -> None:
    """Give every parameter and buffer non-trivial random values (zero-initialised tables too)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            t.copy_(torch.randn(t.shape, generator=gen) * std)


def exchange(ours: nn.Module, official: nn.Module) -> None:
    """Same keys and shapes; strict loads both ways; ours ends up with official's weights."""
    ours_sd, off_sd = ours.state_dict(), official.state_dict()
    assert list(ours_sd) == list(off_sd)
    assert {k: tuple(v.shape) for k, v in ours_sd.items()} == {k: tuple(v.shape) for k, v in off_sd.items()}
    # ours -> official copy (strict), then official -> ours (strict)
    official_copy = copy.deepcopy(official)
    official_copy.load_state_dict(ours_sd, strict=True)
    ours.load_state_dict(off_sd, strict=True)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, off_sd[k]), k


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_official_helper_does_not_leak_torchvision(sa):
    import importlib.util
    import sys

    assert sa.SamPredictor is not None
    if importlib.util.find_spec("torchvision") is None:
        assert not any(name == "torchvision" or name.startswith("torchvision.") for name in sys.modules)
    # The stand-in resize is the one the official transform uses.
    image = (torch.rand(37, 53, 3) * 255).to(torch.uint8).numpy()
    out = sa.utils.transforms.ResizeLongestSide(64).apply_image(image)
    assert out.shape == (45, 64, 3) and out.dtype == np.uint8


# ----------------------------------------------------------------------------------- LayerNorm2d


def test_layernorm2d_matches_official_and_functional(sa):
    from segment_anything.modeling.common import LayerNorm2d as OffLN

    torch.manual_seed(0)
    ours, off = LayerNorm2d(24), OffLN(24)
    randomise(off, 1)
    ours.load_state_dict(off.state_dict(), strict=True)
    x = torch.randn(2, 24, 7, 5) * 3 + 1
    assert ours.eps == 1e-6
    assert rel_err(ours(x), off(x)) < TOL
    ref = F.layer_norm(x.permute(0, 2, 3, 1), (24,), ours.weight, ours.bias, eps=1e-6).permute(0, 3, 1, 2)
    assert rel_err(ours(x), ref) < TOL


# --------------------------------------------------------------------------------- prompt encoder


def make_prompt_encoders(sa, image_size: int, seed: int = 0) -> tuple[PromptEncoder, nn.Module]:
    emb = image_size // 16
    torch.manual_seed(seed)
    off = sa.modeling.PromptEncoder(
        embed_dim=256,
        image_embedding_size=(emb, emb),
        input_image_size=(image_size, image_size),
        mask_in_chans=16,
    )
    randomise(off, seed + 1)
    ours = PromptEncoder(256, (emb, emb), (image_size, image_size), mask_in_chans=16)
    exchange(ours, off)
    return ours, off


def prompt_cases(image_size: int, n: int = 3, seed: int = 0) -> dict[str, dict]:
    gen = torch.Generator().manual_seed(seed)
    pts = torch.rand(n, 5, 2, generator=gen) * image_size
    labels = torch.tensor([1, 0, 1, -1, 0]).repeat(n, 1)
    xy0 = torch.rand(n, 2, generator=gen) * image_size / 2
    boxes = torch.cat([xy0, xy0 + torch.rand(n, 2, generator=gen) * image_size / 2], dim=1)
    masks = torch.randn(n, 1, image_size // 4, image_size // 4, generator=gen) * 5
    return {
        "points": {"points": (pts, labels), "boxes": None, "masks": None},
        "boxes": {"points": None, "boxes": boxes, "masks": None},
        "points+boxes": {"points": (pts[:, :2], labels[:, :2]), "boxes": boxes, "masks": None},
        "masks": {"points": None, "boxes": None, "masks": masks},
        "points+masks": {"points": (pts, labels), "boxes": None, "masks": masks},
        "all": {"points": (pts, labels), "boxes": boxes, "masks": masks},
        "none": {"points": None, "boxes": None, "masks": None},
    }


@pytest.mark.parametrize("image_size", [1024, 512, 2048])
def test_prompt_encoder_matches_official(sa, image_size):
    ours, off = make_prompt_encoders(sa, image_size)
    assert n_params(ours) == n_params(off)
    assert rel_err(ours.get_dense_pe(), off.get_dense_pe()) < TOL
    assert ours.get_dense_pe().shape == (1, 256, image_size // 16, image_size // 16)
    for name, case in prompt_cases(image_size).items():
        with torch.no_grad():
            s_ours, d_ours = ours(**case)
            s_off, d_off = off(**case)
        assert s_ours.shape == s_off.shape, name
        if s_off.numel():
            assert rel_err(s_ours, s_off) < TOL, name
        assert rel_err(d_ours, d_off) < TOL, name


def test_prompt_encoder_semantics(sa):
    ours, _ = make_prompt_encoders(sa, 1024)
    pts = torch.tensor([[[10.0, 20.0], [500.0, 700.0]]])
    # No box: one padding point is appended and gets exactly the not-a-point embedding.
    sparse, dense = ours((pts, torch.tensor([[1, 0]])), None, None)
    assert sparse.shape == (1, 3, 256)
    assert torch.equal(sparse[0, 2], ours.not_a_point_embed.weight[0])
    # With a box: no padding, two corner tokens.
    sparse, _ = ours((pts, torch.tensor([[1, -1]])), torch.tensor([[0.0, 0.0, 100.0, 50.0]]), None)
    assert sparse.shape == (1, 4, 256)
    assert torch.equal(sparse[0, 1], ours.not_a_point_embed.weight[0])
    # +0.5 pixel shift and normalisation by the input size.
    pe = ours.pe_layer._pe_encoding(torch.tensor([[[10.5 / 1024, 20.5 / 1024]]]))
    assert rel_err(sparse[0, 0], pe[0, 0] + ours.point_embeddings[1].weight[0]) < TOL
    assert dense.shape == (1, 256, 64, 64)
    # Dense no-mask embedding is a broadcast view, not a copy.
    _, dense = ours(None, torch.zeros(2, 4), None)
    assert dense.stride(0) == 0 and dense.shape == (2, 256, 64, 64)
    with pytest.raises(ValueError, match="mask prompt must have shape"):
        ours(None, None, torch.zeros(1, 1, 128, 128))
    with pytest.raises(ValueError, match="batch sizes differ"):
        ours((pts, torch.tensor([[1, 0]])), torch.zeros(2, 4), None)


# ----------------------------------------------------------------------------------- mask decoder


def make_decoders(sa, seed: int = 0, **kw) -> tuple[MaskDecoder, nn.Module]:
    torch.manual_seed(seed)
    off = sa.modeling.MaskDecoder(
        transformer_dim=256,
        transformer=sa.modeling.TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        num_multimask_outputs=3,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    randomise(off, seed + 1, std=0.1)
    ours = MaskDecoder(
        transformer_dim=256,
        transformer=TwoWayTransformer(depth=2, embedding_dim=256, num_heads=8, mlp_dim=2048),
        num_multimask_outputs=3,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
        **kw,
    )
    return ours, off


@pytest.mark.parametrize("image_size", [256, 512, 1024])
def test_mask_decoder_matches_official(sa, image_size):
    pe_ours, pe_off = make_prompt_encoders(sa, image_size, seed=3)
    ours, off = make_decoders(sa, seed=5)
    exchange(ours, off)
    assert n_params(ours) == n_params(off)
    emb = image_size // 16
    image = torch.randn(1, 256, emb, emb, generator=torch.Generator().manual_seed(7))
    # Every prompt kind at 256; at larger sizes (slower on CPU) two representative combinations.
    names = (
        ("points+boxes", "points+masks")
        if image_size > 256
        else ("points", "boxes", "points+boxes", "masks", "points+masks", "all")
    )
    for name, case in prompt_cases(image_size, n=2, seed=11).items():
        if name not in names:
            continue
        for multimask in (True, False):
            with torch.no_grad():
                sp, de = pe_off(**case)
                m_off, i_off = off(image, pe_off.get_dense_pe(), sp, de, multimask)
                sp2, de2 = pe_ours(**case)
                m_ours, i_ours = ours(image, pe_ours.get_dense_pe(), sp2, de2, multimask)
            k = 3 if multimask else 1
            assert m_ours.shape == (2, k, image_size // 4, image_size // 4)
            assert rel_err(m_ours, m_off) < TOL, (name, multimask)
            assert rel_err(i_ours, i_off) < TOL, (name, multimask)


def test_mask_decoder_batched_images(sa):
    """N images paired with N prompts equals the official decoder run image by image."""
    pe_ours, pe_off = make_prompt_encoders(sa, 512, seed=3)
    ours, off = make_decoders(sa, seed=9)
    exchange(ours, off)
    images = torch.randn(3, 256, 32, 32, generator=torch.Generator().manual_seed(2))
    case = prompt_cases(512, seed=4)["all"]
    with torch.no_grad():
        sp, de = pe_ours(**case)
        m_ours, i_ours = ours(images, pe_ours.get_dense_pe(), sp, de, True)
        for j in range(3):
            m_off, i_off = off(images[j : j + 1], pe_off.get_dense_pe(), sp[j : j + 1], de[j : j + 1], True)
            assert rel_err(m_ours[j : j + 1], m_off) < TOL
            assert rel_err(i_ours[j : j + 1], i_off) < TOL
    with pytest.raises(ValueError, match="must be 1 or the number of prompts"):
        ours(images[:2], pe_ours.get_dense_pe(), sp, de, True)


def test_single_token_decoder(sa):
    """num_hypernetwork_mlps=1: the authors' layout; transformer sees [iou, mask token 0, prompts]."""
    ours, off = make_decoders(sa, seed=13, num_hypernetwork_mlps=1)
    sd = ours.state_dict()
    assert any(k.startswith("output_hypernetworks_mlps.0.") for k in sd)
    assert not any(k.startswith("output_hypernetworks_mlps.1.") for k in sd)
    assert ours.mask_tokens.weight.shape == (4, 256)
    assert ours.iou_prediction_head.layers[-1].out_features == 4
    off_sd = {
        k: v
        for k, v in off.state_dict().items()
        if not k.startswith(
            ("output_hypernetworks_mlps.1.", "output_hypernetworks_mlps.2.", "output_hypernetworks_mlps.3.")
        )
    }
    ours.load_state_dict(off_sd, strict=True)
    pe_ours, pe_off = make_prompt_encoders(sa, 1024, seed=3)
    image = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(1))
    case = prompt_cases(1024, seed=8)["points+boxes"]
    with torch.no_grad():
        sp, de = pe_off(**case)
        pe = pe_off.get_dense_pe()
        tokens = torch.cat([off.iou_token.weight, off.mask_tokens.weight[:1]], dim=0)
        tokens = torch.cat([tokens.unsqueeze(0).expand(sp.shape[0], -1, -1), sp], dim=1)
        src = image.repeat(sp.shape[0], 1, 1, 1) + de
        hs, keys = off.transformer(src, pe.repeat(sp.shape[0], 1, 1, 1), tokens)
        up = off.output_upscaling(keys.transpose(1, 2).reshape(src.shape))
        w = off.output_hypernetworks_mlps[0](hs[:, 1])
        ref_masks = torch.einsum("nc,nchw->nhw", w, up)[:, None]
        ref_iou = off.iou_prediction_head(hs[:, 0])[:, :1]
        for multimask in (True, False):
            masks, iou = ours(image, pe, sp, de, multimask)
            assert masks.shape == (3, 1, 256, 256)
            assert rel_err(masks, ref_masks) < TOL
            assert rel_err(iou, ref_iou) < TOL
    with pytest.raises(ValueError, match="num_hypernetwork_mlps"):
        make_decoders(sa, num_hypernetwork_mlps=5)


def test_decoder_gradients_match_official(sa):
    pe_ours, pe_off = make_prompt_encoders(sa, 256, seed=21)
    ours, off = make_decoders(sa, seed=22)
    exchange(ours, off)
    image = torch.randn(1, 256, 16, 16, generator=torch.Generator().manual_seed(3))
    case = prompt_cases(256, n=2, seed=5)["all"]
    for enc, dec in ((pe_ours, ours), (pe_off, off)):
        enc.zero_grad()
        dec.zero_grad()
        sp, de = enc(**case)
        masks, iou = dec(image, enc.get_dense_pe(), sp, de, True)
        (masks.square().mean() + iou.sum()).backward()
    ours_named = dict(
        list(pe_ours.named_parameters()) + [("dec." + k, v) for k, v in ours.named_parameters()]
    )
    off_named = dict(list(pe_off.named_parameters()) + [("dec." + k, v) for k, v in off.named_parameters()])
    total = torch.sqrt(sum(p.grad.double().square().sum() for p in off_named.values() if p.grad is not None))
    assert total > 0
    for name, p in ours_named.items():
        ref = off_named[name].grad
        if ref is None:
            # Official gives no gradient here: ours must not either (or only zeros).
            assert p.grad is None or p.grad.abs().max() == 0, name
            continue
        assert p.grad is not None, name
        # Relative check; gradients that are zero in exact arithmetic (attention key biases)
        # are rounding noise in both, so they get an absolute floor tied to the total gradient.
        err = (p.grad.double() - ref.double()).norm()
        assert err <= 1e-4 * ref.double().norm() + 1e-7 * total, (name, err.item(), ref.norm().item())


# ------------------------------------------------------------------------------------ ViT encoder


SMALL = {"embed_dim": 64, "depth": 3, "num_heads": 4, "global_attn_indexes": (1,)}


def official_vit(sa, img_size: int, cfg: dict) -> nn.Module:
    return sa.modeling.ImageEncoderViT(
        img_size=img_size,
        patch_size=16,
        embed_dim=cfg["embed_dim"],
        depth=cfg["depth"],
        num_heads=cfg["num_heads"],
        mlp_ratio=4,
        out_chans=256,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        global_attn_indexes=list(cfg["global_attn_indexes"]),
        window_size=14,
    )


def ours_vit(img_size: int, cfg: dict, pretrain_img_size: int | None = None) -> ImageEncoderViT:
    return ImageEncoderViT(
        img_size=img_size,
        embed_dim=cfg["embed_dim"],
        depth=cfg["depth"],
        num_heads=cfg["num_heads"],
        use_rel_pos=True,
        window_size=14,
        global_attn_indexes=cfg["global_attn_indexes"],
        pretrain_img_size=pretrain_img_size,
    )


def randomise_vit(vit: nn.Module, seed: int) -> None:
    """Default init, plus random position tables (officially zero-initialised)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vit.named_parameters():
            if "rel_pos" in name or "pos_embed" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


@pytest.mark.parametrize("img_size", [256, 224])
def test_vit_small_matches_official(sa, img_size):
    # 256: 16x16 grid (windows of 14 need padding); 224: 14x14 grid, windows fit exactly.
    torch.manual_seed(0)
    off = official_vit(sa, img_size, SMALL)
    randomise_vit(off, 1)
    ours = ours_vit(img_size, SMALL)
    exchange(ours, off)
    assert n_params(ours) == n_params(off)
    x = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y_off, y_ours = off(x), ours(x)
    assert y_ours.shape == (2, 256, img_size // 16, img_size // 16)
    assert rel_err(y_ours, y_off) < TOL


def test_vit_pretrained_at_1024_runs_at_512(sa):
    """Parameters shaped for 1024 (official checkpoints) used at 512: pos embed resized bicubically,
    global rel-pos tables resized linearly on the fly, as an official 512 model holding those tables."""
    torch.manual_seed(0)
    off1024 = official_vit(sa, 1024, SMALL)
    randomise_vit(off1024, 3)
    ours = ours_vit(512, SMALL, pretrain_img_size=1024)
    exchange(ours, off1024)  # an official 1024 checkpoint loads strictly into a 512 model

    off512 = official_vit(sa, 512, SMALL)
    sd = off1024.state_dict()
    pos = F.interpolate(
        sd["pos_embed"].permute(0, 3, 1, 2), size=(32, 32), mode="bicubic", align_corners=False
    )
    sd["pos_embed"] = pos.permute(0, 2, 3, 1)
    for i in SMALL["global_attn_indexes"]:
        # The official code interpolates rel-pos tables of another length on the fly.
        off512.blocks[i].attn.rel_pos_h = nn.Parameter(sd[f"blocks.{i}.attn.rel_pos_h"].clone())
        off512.blocks[i].attn.rel_pos_w = nn.Parameter(sd[f"blocks.{i}.attn.rel_pos_w"].clone())
    off512.load_state_dict(sd, strict=True)
    assert off512.blocks[1].attn.rel_pos_h.shape[0] == 127

    x = torch.randn(1, 3, 512, 512, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        y_off, y_ours = off512(x), ours(x)
    assert y_ours.shape == (1, 256, 32, 32)
    assert rel_err(y_ours, y_off) < TOL


def test_vit_b_config_at_512_matches_official(sa):
    torch.manual_seed(0)
    off = official_vit(sa, 512, VIT_CONFIGS["vit_b"])
    randomise_vit(off, 5)
    ours = build_sam_vit_encoder("vit_b", img_size=512, pretrain_img_size=512)
    exchange(ours, off)
    x = torch.randn(1, 3, 512, 512, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert rel_err(ours(x), off(x)) < TOL


@pytest.mark.slow
def test_vit_b_at_1024_matches_official(sa):
    """The real vit_b configuration at 1024 (about 100 s on a 2-core CPU, mostly the official model)."""
    torch.manual_seed(0)
    off = official_vit(sa, 1024, VIT_CONFIGS["vit_b"])
    randomise_vit(off, 7)
    ours = build_sam_vit_encoder("vit_b")
    exchange(ours, off)
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        y_off, y_ours = off(x), ours(x)
    assert y_ours.shape == (1, 256, 64, 64)
    assert rel_err(y_ours, y_off) < TOL


@pytest.mark.parametrize("name", sorted(VIT_CONFIGS))
def test_sam_layout_matches_official_builders(sa, name):
    """vit_b/l/h as the official builders make them (on the meta device): identical key names and
    shapes, parameter counts, window/global pattern and norm eps; plus the prompt encoder and
    mask decoder of the same official model."""
    builders = {"vit_b": sa.build_sam_vit_b, "vit_l": sa.build_sam_vit_l, "vit_h": sa.build_sam_vit_h}
    with torch.device("meta"):
        off = builders[name](checkpoint=None)
        ours = build_sam_vit_encoder(name, img_size=768)
        pe = PromptEncoder(256, 64, 1024)
        dec = MaskDecoder(256, TwoWayTransformer(2, 256, 8, 2048))

    def layout(m: nn.Module) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in m.state_dict().items()}

    assert layout(ours) == layout(off.image_encoder)
    assert layout(pe) == layout(off.prompt_encoder)
    assert layout(dec) == layout(off.mask_decoder)
    assert n_params(ours) == n_params(off.image_encoder)
    assert [b.window_size for b in ours.blocks] == [b.window_size for b in off.image_encoder.blocks]
    eps = [m.eps for m in ours.modules() if isinstance(m, nn.LayerNorm)]
    assert eps == [m.eps for m in off.image_encoder.modules() if isinstance(m, nn.LayerNorm)]
    assert eps == [1e-6] * len(eps)
    dec_eps = [m.eps for m in dec.modules() if isinstance(m, nn.LayerNorm)]
    assert dec_eps == [m.eps for m in off.mask_decoder.modules() if isinstance(m, nn.LayerNorm)] == [1e-5] * 9


def test_vit_gradients_and_checkpointing():
    torch.manual_seed(0)
    vit = ours_vit(256, SMALL)
    randomise_vit(vit, 9)
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(1), requires_grad=True)

    def run(ckpt: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        vit.zero_grad()
        x.grad = None
        vit.set_grad_checkpointing(ckpt)
        y = vit(x)
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        return y.detach(), {k: p.grad.clone() for k, p in vit.named_parameters()}, x.grad.clone()

    y0, g0, gx0 = run(False)
    y1, g1, gx1 = run(True)
    assert torch.isfinite(y0).all()
    assert set(g0) == {k for k, _ in vit.named_parameters()}
    assert all(g.abs().sum() > 0 for g in g0.values())
    assert torch.equal(y0, y1)
    for k in g0:
        assert rel_err(g1[k], g0[k]) < 1e-6, k
    assert rel_err(gx1, gx0) < 1e-6


def test_vit_rejects_bad_sizes():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ImageEncoderViT(img_size=500)
    vit = ours_vit(256, SMALL)
    with pytest.raises(ValueError, match="multiples of 16"):
        vit(torch.zeros(1, 3, 250, 256))
    with pytest.raises(ValueError, match="unknown SAM encoder"):
        build_sam_vit_encoder("vit_x")
