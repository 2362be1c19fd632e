"""Router training, core parts (issue #8; torch only — the UNet-driven tests are in
tests/nodes/test_train_router.py): the data folder format, reference augmentation, noise schedule,
ground-truth routes on layer grids, the routing loss, IoU, router attachment, the resumable training
state, the data order and the evaluation table."""
from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from anystory import train as T
from anystory.adapter import KIND_IPADAPTER_PLUS, KIND_NATIVE
from anystory.layers import LayerLayout
from anystory.paper.router import one_hot_maps, routing_loss, soft_maps
from anystory.prepare import prepare_subject
from anystory.synthetic import random_adapter


def _png(path, arr):
    import numpy as np
    Image.fromarray(np.asarray(arr)).save(path)


def _write_sample(root, name, size=32, masks=((0, 0, 16, 16),), ref=None, caption=None):
    import numpy as np
    img = np.full((size, size, 3), 128, np.uint8)
    for i, (y0, x0, y1, x1) in enumerate(masks):
        img[y0:y1, x0:x1] = [(255, 0, 0), (0, 0, 255), (0, 255, 0)][i % 3]
        m = np.zeros((size, size), np.uint8)
        m[y0:y1, x0:x1] = 255
        _png(root / f"{name}_mask{i}.png", m)
    _png(root / f"{name}.png", img)
    if ref is not None:
        _png(root / f"{name}_ref0.png", ref)
    if caption is not None:
        (root / f"{name}.txt").write_text(caption)


def tiny_layout() -> LayerLayout:
    return LayerLayout([(("input", 4, 0), 32, 2), (("middle", 0, 0), 64, 2), (("output", 3, 0), 32, 2)])


def tiny_adapter(kind=KIND_IPADAPTER_PLUS):
    return random_adapter(tiny_layout(), kind=kind, clip_dim=48, qformer_dim=64, depth=1, num_tokens=4,
                          router_dim=32, router_heads=2)


# ------------------------------------------------------------------------------------------------
# data folder
# ------------------------------------------------------------------------------------------------
def test_scan_dataset_masks_refs_captions(tmp_path):
    import numpy as np
    _write_sample(tmp_path, "a", masks=((0, 0, 16, 16), (16, 16, 32, 32)), caption="two boxes")
    _write_sample(tmp_path, "b", ref=np.zeros((8, 8, 4), np.uint8))
    (tmp_path / "notes.md").write_text("ignored")
    files = T.scan_dataset(tmp_path)
    assert [f.name for f in files] == ["a", "b"]
    a, b = files
    assert [p.name for p in a.masks] == ["a_mask0.png", "a_mask1.png"] and a.caption.name == "a.txt"
    assert b.refs[0].name == "b_ref0.png" and b.caption is None


def test_scan_dataset_label_png(tmp_path):
    import numpy as np
    _png(tmp_path / "x.png", np.zeros((16, 16, 3), np.uint8))
    lab = np.zeros((16, 16), np.uint8)
    lab[:8, :8] = 3
    lab[8:, 8:] = 7
    _png(tmp_path / "x_labels.png", lab)
    (f,) = T.scan_dataset(tmp_path)
    masks = T.load_labels(f.labels)
    assert masks.shape == (2, 16, 16)
    assert masks[0, :8, :8].all() and masks[0].sum() == 64 and masks[1, 8:, 8:].all() and masks[1].sum() == 64


@pytest.mark.parametrize("case, match", [
    ("no_masks", "have no instance masks"),
    ("gap", "without gaps"),
    ("orphan", "no target image"),
    ("both", "not both"),
    ("empty", "no training images"),
])
def test_scan_dataset_refusals(tmp_path, case, match):
    import numpy as np
    if case == "no_masks":
        _write_sample(tmp_path, "ok")
        _png(tmp_path / "lonely.png", np.zeros((8, 8, 3), np.uint8))
    elif case == "gap":
        _write_sample(tmp_path, "a", masks=((0, 0, 4, 4), (4, 4, 8, 8)))
        (tmp_path / "a_mask1.png").rename(tmp_path / "a_mask2.png")
    elif case == "orphan":
        _write_sample(tmp_path, "a")
        _png(tmp_path / "zzz_mask0.png", np.zeros((8, 8), np.uint8))
    elif case == "both":
        _write_sample(tmp_path, "a")
        _png(tmp_path / "a_labels.png", np.zeros((32, 32), np.uint8))
    with pytest.raises(T.DatasetError, match=match):
        T.scan_dataset(tmp_path)


def test_dataset_resizes_crops_and_keeps_masks_aligned(tmp_path):
    import numpy as np
    # 48×32 (H×W) image: centre crop to a square after the shorter side goes to 16
    img = np.full((48, 32, 3), 128, np.uint8)
    img[16:32, 0:16] = (255, 0, 0)
    _png(tmp_path / "a.png", img)
    m = np.zeros((48, 32), np.uint8)
    m[16:32, 0:16] = 255
    _png(tmp_path / "a_mask0.png", m)
    tiny = np.zeros((48, 32), np.uint8)
    tiny[0, 0] = 255  # one pixel in the part that is cropped away → dropped
    _png(tmp_path / "a_mask1.png", tiny)
    (tmp_path / "a.txt").write_text(" a red box \n")
    ds = T.InstanceDataset(tmp_path, resolution=16)
    s = ds[0]
    assert s.image.shape == (16, 16, 3) and s.masks.shape == (1, 16, 16) and s.caption == "a red box"
    inside = s.image[s.masks[0] > 0.5]
    assert inside.shape[0] == 64 and (inside[:, 0] > 0.9).all() and (inside[:, 2] < 0.1).all()
    assert s.key.endswith("a.png") and s.refs == [None]


def test_dataset_max_instances_keeps_largest(tmp_path):
    _write_sample(tmp_path, "a", size=32, masks=((0, 0, 4, 4), (8, 8, 24, 24), (0, 24, 8, 32)))
    s = T.InstanceDataset(tmp_path, resolution=32, max_instances=2, min_area=0)[0]
    areas = s.masks.flatten(1).sum(1).tolist()
    assert sorted(areas) == [64.0, 256.0]
    assert areas == [256.0, 64.0]  # original order kept (instance 1, then 2)


def test_shapes_dataset_masks_and_label_png_agree(tmp_path):
    a = T.make_shapes_dataset(tmp_path / "a", 3, size=64, seed=5)
    b = T.make_shapes_dataset(tmp_path / "b", 3, size=64, seed=5, label_png=True, with_refs=True)
    da, db = T.InstanceDataset(a, resolution=64), T.InstanceDataset(b, resolution=64)
    for i in range(3):
        sa, sb = da[i], db[i]
        assert sa.num_instances == 2 and torch.equal(sa.masks, sb.masks) and torch.equal(sa.image, sb.image)
        assert all(r is not None and r.shape[-1] == 4 for r in sb.refs)
        # an instance has the single colour of its shape
        for j in range(2):
            px = sa.image[sa.masks[j] > 0.5]
            assert px.std(0).max() < 0.02


# ------------------------------------------------------------------------------------------------
# reference views and augmentation
# ------------------------------------------------------------------------------------------------
def _blob(size=64):
    img = torch.full((size, size, 3), 0.5)
    mask = torch.zeros(size, size)
    mask[10:40, 20:50] = 1
    img[mask > 0] = torch.tensor([1.0, 0.0, 0.0])
    return img, mask


def test_rotate_identity_and_quarter_turn():
    img = torch.rand(9, 9, 3)
    mask = torch.zeros(9, 9)
    mask[4, 8] = 1
    out, m = T.rotate(img, mask, 0.0, (4, 4))
    torch.testing.assert_close(out, img, atol=1e-5, rtol=0)
    _, m90 = T.rotate(img, mask, 90.0, (4, 4))
    assert m90.argmax().item() in (8 * 9 + 4, 0 * 9 + 4)  # the pixel right of the centre goes below/above it
    assert m90.max() > 0.99


def test_augment_reference_shapes_determinism_and_padding():
    img, mask = _blob()
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a = T.augment_reference(img, mask, g1)
    b = T.augment_reference(img, mask, g2)
    c = T.augment_reference(img, mask, torch.Generator().manual_seed(2))
    assert a.shape == (224, 224, 3) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    black = [float((T.augment_reference(img, mask, torch.Generator().manual_seed(s),
                                        T.AugmentConfig(rotation=0, crop_jitter=0, pad=0.5, p_flip=0)).sum(-1) == 0)
                   .float().mean()) for s in range(6)]
    assert max(black) > 0.1 and min(black) < max(black)  # zero (black) padding of random size
    plain = T.augment_reference(img, mask, None, T.AugmentConfig(0, 0, 0, 0))
    ref = prepare_subject(img[None], mask[None], clip_size=224, ref_size=8).clip_image[0]
    torch.testing.assert_close(plain, ref)


def test_augment_keeps_the_subject_colour():
    img, mask = _blob()
    for seed in range(5):
        v = T.augment_reference(img, mask, torch.Generator().manual_seed(seed))
        red = (v[..., 0] > 0.8) & (v[..., 1] < 0.2)
        assert red.float().mean() > 0.1  # most of the view is still the red subject


def test_reference_views_use_given_refs(tmp_path):
    img, mask = _blob()
    ref = torch.zeros(32, 32, 4)
    ref[8:24, 8:24] = torch.tensor([0.0, 1.0, 0.0, 1.0])  # a green cut-out (alpha = subject)
    s = T.TrainSample("x", img, torch.stack([mask, mask]), [ref, None])
    v = T.reference_views(s, torch.Generator().manual_seed(0), augment=False)
    assert v.shape == (2, 224, 224, 3)
    assert v[0, 112, 112, 1] > 0.9 and v[0, 112, 112, 0] < 0.1  # the given green reference
    assert v[1, 112, 112, 0] > 0.9                                 # a crop of the red target
    empty = T.TrainSample("y", img, torch.zeros(0, 64, 64), [])
    assert T.reference_views(empty).shape == (0, 224, 224, 3)


# ------------------------------------------------------------------------------------------------
# schedule, targets, losses, IoU
# ------------------------------------------------------------------------------------------------
def test_sdxl_schedule():
    ac = T.sdxl_alphas_cumprod()
    assert ac.shape == (1000,) and ac.dtype == torch.float64
    assert math.isclose(float(ac[0]), 1 - 0.00085, rel_tol=1e-9)
    assert 0.004 < float(ac[-1]) < 0.005 and bool((ac[1:] < ac[:-1]).all())
    sig = ((1 - ac) / ac).sqrt()  # ComfyUI's sigmas
    torch.testing.assert_close(T.alphas_cumprod_from_sigmas(sig), ac)


def test_instance_index_on_grids():
    m = torch.zeros(2, 8, 8)
    m[0, :4, :4] = 1
    m[1, 4:, 4:] = 1
    idx = T.instance_index(m, (2, 2))
    assert idx.tolist() == [0, 2, 2, 1]
    idx4 = T.instance_index(m, (4, 4)).view(4, 4)
    assert idx4[0, 0] == 0 and idx4[3, 3] == 1 and idx4[0, 3] == 2
    # a cell half covered counts, less than half does not
    h = torch.zeros(1, 4, 4)
    h[0, :, :1] = 1
    assert T.instance_index(h, (1, 2)).tolist() == [0, 1]      # coverage 0.5 and 0
    assert T.instance_index(h, (1, 4)).tolist() == [0, 1, 1, 1]
    assert T.instance_index(h, (1, 1)).tolist() == [1]         # coverage 0.25: background
    assert T.instance_index(torch.zeros(0, 4, 4), (2, 2)).tolist() == [0, 0, 0, 0]


def test_layer_routing_loss_is_the_paper_loss_on_soft_maps():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 10, requires_grad=True)
    tgt = torch.randint(0, 4, (3, 10))
    got = T.layer_routing_loss(logits, tgt)
    want = routing_loss(soft_maps(logits), one_hot_maps(tgt, 4), 3)
    torch.testing.assert_close(got, want)
    # eq. 4 (the default): a sum over the 10 tokens; the mean option is that / 10
    diff = (soft_maps(logits)[:, :3] - one_hot_maps(tgt, 4)[:, :3]) ** 2
    torch.testing.assert_close(got, diff.sum(-1).sum(1).mean() / 3)
    torch.testing.assert_close(T.layer_routing_loss(logits, tgt, "mean"), got / 10)
    got.backward()
    assert logits.grad.abs().sum() > 0
    perfect = one_hot_maps(tgt, 4) * 50.0
    assert T.layer_routing_loss(perfect, tgt) < 1e-12
    # only subject routes count (background = last route): a wrong background score alone costs nothing
    bg_only = torch.zeros(1, 2, 4)
    bg_only[0, 1] = 50.0
    assert T.layer_routing_loss(bg_only, torch.ones(1, 4, dtype=torch.long)) < 1e-12


def test_background_route_is_encoded_from_the_zero_image_convention():
    """The trainer's background route (E_{N+1}, R_{N+1}) comes from the subject branch's zero image: zeros of the
    normalised CLIP input (IP-Adapter's) by default — given to the model as pixel values when the encoder can take
    them, else as the image that normalises to them — or black pixels ((0 − mean)/std) for files trained so."""
    from anystory.paper.encoder import CLIP_MEAN, CLIP_STD, zero_image_pixels, zero_image_rgb
    seen = {}
    enc = T.Encoders(clip=lambda im: seen.setdefault("image", im) * 0 + 1,
                     clip_pixels=lambda px: seen.setdefault("pixels", px)[:, :1] * 0 + 2)
    assert float(enc.background().flatten()[0]) == 2.0
    assert torch.equal(seen["pixels"], torch.zeros(1, 3, T.CLIP_SIZE, T.CLIP_SIZE)) and "image" not in seen
    only_images = T.Encoders(clip=lambda im: seen.setdefault("image", im) * 0 + 1)
    only_images.background()
    torch.testing.assert_close(seen["image"][0, 0, 0], torch.tensor(CLIP_MEAN))  # the mean colour: normalises to 0
    black = zero_image_pixels("pixel_black")
    torch.testing.assert_close(black[0, :, 0, 0], -torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD))
    assert torch.equal(zero_image_rgb("pixel_black"), torch.zeros(1, 224, 224, 3))
    with pytest.raises(ValueError, match="zero image"):
        zero_image_pixels("grey")


def test_iou_per_subject():
    gt = torch.tensor([0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 1, 1, 1, 2, 0])
    assert T.iou_per_subject(pred, gt, 2) == [pytest.approx(1 / 3), pytest.approx(2 / 3)]
    assert T.iou_per_subject(pred, torch.full((6,), 2), 2) == []  # subjects absent at this grid: skipped


# ------------------------------------------------------------------------------------------------
# router attachment, routing state
# ------------------------------------------------------------------------------------------------
def test_attach_router_to_ipadapter_weights():
    ad = tiny_adapter()
    assert not ad.has_router
    sp_before = {k: v.clone() for k, v in ad.subject_proj.state_dict().items()}
    T.attach_router(ad, router_dim=16, router_heads=2, seed=3)
    assert ad.has_router and ad.kind == KIND_NATIVE and ad.meta["derived_from"] == KIND_IPADAPTER_PLUS
    assert sorted(int(k) for k in ad.router) == sorted(ad.layer_dims)
    assert ad.routing_proj.num_queries == 1 and ad.router_dim == 16
    for n, p in ad.named_parameters():
        trainable = n.startswith(("routing_proj.", "router."))
        assert p.requires_grad == trainable, n
        if trainable:
            assert p.dtype == torch.float32
    rp = ad.routing_proj.state_dict()
    torch.testing.assert_close(rp["latents"], sp_before["latents"].mean(1, keepdim=True))
    torch.testing.assert_close(rp["proj_out.weight"], sp_before["proj_out.weight"])
    assert all(float(r.refine_out.weight.detach().abs().sum()) == 0 for r in ad.router.values())
    # deterministic from the seed, independent of the global RNG
    torch.manual_seed(123)
    other = T.attach_router(tiny_adapter(), router_dim=16, router_heads=2, seed=3)
    for (k, v), (_, w) in zip(ad.router.state_dict().items(), other.router.state_dict().items()):
        assert torch.equal(v, w), k
    # a native adapter keeps its router (training continues from it)
    nat = tiny_adapter(KIND_NATIVE)
    before = {k: v.clone() for k, v in nat.router.state_dict().items()}
    T.attach_router(nat)
    assert all(torch.equal(before[k], v) for k, v in nat.router.state_dict().items())


def test_export_adapter_one_dtype():
    ad = T.attach_router(tiny_adapter().half())
    out = T.export_adapter(ad)
    assert {p.dtype for p in out.parameters()} == {torch.float16}
    assert ad.router["1"].proj_z.weight.dtype == torch.float32  # the original is untouched


def test_routing_state_groups_rows_by_route_count():
    E = [torch.randn(3, 4, 8), torch.randn(2, 4, 8), torch.randn(3, 4, 8)]
    R = [torch.randn(3, 8), torch.randn(2, 8), torch.randn(3, 8)]
    st = T.RoutingState(E, R, [torch.zeros(2, 4, 4), torch.zeros(1, 4, 4), torch.zeros(2, 4, 4)])
    assert [g.K for g in st.groups] == [2, 3]
    assert st.groups[0].rows.tolist() == [1] and st.groups[1].rows.tolist() == [0, 2]
    x = torch.arange(3).float().view(3, 1)
    parts = [st.gather(x, i) * 10 for i in range(2)]
    assert st.scatter(parts).view(-1).tolist() == [0, 10, 20]
    one = T.RoutingState(E[:1], R[:1], None)
    assert one.groups[0].full and one.targets(0, (2, 2), "cpu") is None
    with pytest.raises(ValueError):
        T.RoutingState(E, R, None, mode="nope")


# ------------------------------------------------------------------------------------------------
# resumable state, data order
# ------------------------------------------------------------------------------------------------
class _FakeTrainer(torch.nn.Module):
    def __init__(self, ad):
        super().__init__()
        self.routing_proj = ad.routing_proj
        self.router = ad.router


def test_training_state_roundtrip_weights_only(tmp_path):
    ad = T.attach_router(tiny_adapter(), router_dim=16, router_heads=2)
    cfg = T.TrainConfig(lr=1e-3, routing_proj_lr=1e-4)
    opt = T.make_optimizer(_FakeTrainer(ad), cfg)
    assert [g["name"] for g in opt.param_groups] == ["router", "routing_proj"]
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-4]
    loss = sum((p ** 2).sum() for p in ad.router.parameters()) + sum((p ** 2).sum() for p in ad.routing_proj.parameters())
    loss.backward()
    opt.step()
    path = tmp_path / "s.pt"
    T.save_training_state(path, ad, opt, 17, cfg)
    st = torch.load(path, weights_only=True)  # plain tensors and values only
    assert st["step"] == 17 and st["config"]["routing_proj_lr"] == 1e-4
    fresh = T.attach_router(tiny_adapter(), router_dim=16, router_heads=2, seed=9)
    opt2 = T.make_optimizer(_FakeTrainer(fresh), cfg)
    assert T.restore_training_state(T.load_training_state(path), fresh, opt2) == 17
    for (k, v), (_, w) in zip(T.trainable_state(ad).items(), T.trainable_state(fresh).items()):
        assert torch.equal(v, w), k
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys() and all(torch.equal(s1[i]["exp_avg"], s2[i]["exp_avg"]) for i in s1)
    wrong = T.attach_router(tiny_adapter(), router_dim=32, router_heads=2)
    with pytest.raises(ValueError, match="router_dim"):
        T.restore_training_state(T.load_training_state(path), wrong)
    torch.save({"hello": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an AnyStory router training state"):
        T.load_training_state(tmp_path / "other.pt")


def test_warmup_and_group_learning_rates():
    ad = T.attach_router(tiny_adapter(), router_dim=16, router_heads=2)
    cfg = T.TrainConfig(lr=1e-3, routing_proj_lr=1e-4, warmup_steps=4)

    class M(_FakeTrainer):
        def forward(self, batch):
            loss = sum((p ** 2).sum() for p in self.parameters())
            z = loss.detach()
            return {"loss": loss, "diffusion": z, "routing": z}

    m = M(ad)
    opt = T.make_optimizer(m, cfg)
    logs = T.train_step(m, opt, None, cfg, step=0)
    assert logs["lr"] == pytest.approx(2.5e-4)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(2.5e-4), pytest.approx(2.5e-5)]
    T.train_step(m, opt, None, cfg, step=10)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(1e-3), pytest.approx(1e-4)]


def test_step_batches_deterministic_and_sharded():
    one = T.StepBatches(10, 2, seed=4)
    assert one.per_epoch == 5
    epoch0 = [i for s in range(5) for i in one.batch(s)]
    assert sorted(epoch0) == list(range(10))
    assert one.batch(7) == T.StepBatches(10, 2, seed=4).batch(7)  # a resumed run sees the same data
    assert [i for s in range(5, 10) for i in one.batch(s)] != epoch0  # another permutation next epoch
    r0, r1 = T.StepBatches(10, 2, seed=4, rank=0, world_size=2), T.StepBatches(10, 2, seed=4, rank=1, world_size=2)
    a = [i for s in range(r0.per_epoch) for i in r0.batch(s)]
    b = [i for s in range(r1.per_epoch) for i in r1.batch(s)]
    assert not set(a) & set(b) and len(a) == len(b) == 4
    with pytest.raises(T.DatasetError, match="fewer than the batch size"):
        T.StepBatches(3, 4)
    assert T.step_seed(0, 5, 0) != T.step_seed(0, 5, 1) != T.step_seed(0, 6, 0)


# ------------------------------------------------------------------------------------------------
# evaluation table
# ------------------------------------------------------------------------------------------------
def test_layer_group_and_table():
    assert T.layer_group(("input", 4, 0), (64, 64), (128, 128)) == "down 1/2"
    assert T.layer_group(("middle", 0, 3), (32, 32), (128, 128)) == "mid 1/4"
    assert T.layer_group(("output", 5, 1), (63, 38), (125, 75)) == "up 1/2"
    a = T.RoutingEval({("input", 4, 0): [0.1, 0.3], ("output", 0, 0): [0.5]},
                      {"down 1/2": (0.2, 1, 2), "up 1/4": (0.5, 1, 1)}, ["down 1/2", "up 1/4"])
    b = T.RoutingEval({("input", 4, 0): [0.6], ("output", 0, 0): [0.7]},
                      {"down 1/2": (0.6, 1, 1), "up 1/4": (0.7, 1, 1)}, ["down 1/2", "up 1/4"])
    assert a.mean == pytest.approx(0.3)
    table = T.format_iou_table({"before": a, "after": b})
    lines = table.splitlines()
    assert "before" in lines[1] and "after" in lines[1]
    assert lines[3].split() == ["down", "1/2", "1", "0.200", "0.600"]
    assert lines[-1].split() == ["all", "2", "0.300", "0.650"]
    assert a.as_dict()["groups"]["up 1/4"]["iou"] == 0.5


# ------------------------------------------------------------------------------------------------
# the reference branch in training (eq. 6-8 with W̃, routed by M^{l-1})
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("w_tilde", [True, False])
def test_training_reference_attention_is_the_paper_form(w_tilde):
    """TrainReferenceAttn1 = routed_reference_attention with K̃ = G W̃_k, Ṽ = G W̃_v (the adapter's W̃, else the
    UNet's attn1 stand-in) and the previous layer's maps resized to this grid; rows without references get
    the plain attention."""
    from anystory.paper.attention import sdpa
    from anystory.paper.reference import routed_reference_attention
    from anystory.paper.router import one_hot_maps, resize_index
    from anystory.train.hooks import STATE_KEY, TrainReferenceAttn1

    layout = tiny_layout()
    ad = random_adapter(layout, kind=KIND_NATIVE, clip_dim=48, qformer_dim=64, depth=1, num_tokens=4,
                        router_dim=32, router_heads=2, reference_proj="all" if w_tilde else None)
    prev, spec = layout[0], layout[2]  # ("input", 4, 0) 32 wide → ("output", 3, 0) 32 wide
    g = torch.Generator().manual_seed(0)
    C, H = spec.dim, spec.heads
    attn1 = torch.nn.Module()
    attn1.to_k, attn1.to_v = torch.nn.Linear(C, C, bias=False), torch.nn.Linear(C, C, bias=False)
    rep = TrainReferenceAttn1(ad, spec, prev.key, attn1)
    G = torch.randn(2, 5, C, generator=g)  # two subjects of row 0; row 1 has none
    E = [torch.randn(3, 4, 2048, generator=g), torch.randn(3, 4, 2048, generator=g)]
    state = T.RoutingState(E, None, None, refs=[{spec.key: G}, None])
    idx_prev = torch.randint(0, 3, (2, 16), generator=g)
    state.maps[prev.key] = [one_hot_maps(idx_prev, 3)]
    state.hw[prev.key] = (4, 4)
    q, k, v = (torch.randn(2, 4, C, generator=g) for _ in range(3))
    out = rep(q, k, v, {"n_heads": H, "activations_shape": (2, C, 2, 2), STATE_KEY: state})
    index = resize_index(idx_prev, (4, 4), (2, 2))
    proj = ad.reference_proj[str(spec.ckpt_index)] if w_tilde else attn1
    kr, vr = proj.to_k(G.flatten(0, 1)).view(2, 5, C), proj.to_v(G.flatten(0, 1)).view(2, 5, C)
    want = routed_reference_attention(q[:1], k[:1], v[:1], list(kr), list(vr), index[:1], H)
    torch.testing.assert_close(out[:1], want)
    torch.testing.assert_close(out[1:], sdpa(q[1:], k[1:], v[1:], H))
    assert (out[:1] - sdpa(q[:1], k[:1], v[:1], H)).abs().max() > 1e-3
