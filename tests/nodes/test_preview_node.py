"""AnyStoryRoutingPreview in-process with REAL ComfyUI sampling (issue #3): an IMAGE grid and one MASK per
subject at the image size, masks that match the region masks in masks mode, layer/step selection
strings, picking the sampling that made the LATENT, and refusals."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
from comfy_harness import load_module  # registered by tests/nodes/conftest.py

F = load_module("anystory_fixtures", Path(__file__).with_name("anystory_fixtures.py"))
env = F.env
temp_dir = F.temp_dir


def _preview(env, routing, latent, **kw):
    return F.node(env.pack, "AnyStoryRoutingPreview").preview(routing, {"samples": latent}, **kw)


def _err(pack):
    return F.pack_mod("nodes.types").AnyStoryError


def _iou(a, b):
    inter = (a & b).sum().item()
    union = (a | b).sum().item()
    return inter / max(union, 1)


@pytest.fixture(scope="module")
def sampled(env):
    """One patched MODEL (masks mode) sampled once: 1×4×16×24 latent, 3 steps."""
    import torch
    patched, routing = env.apply(eta=1.0, gamma=1.0)
    out = env.sample(patched, torch.zeros(1, 4, 16, 24), steps=3, seed=2)
    return patched, routing, out


def test_outputs_image_grid_and_subject_masks(env, sampled, temp_dir):
    import torch

    _, routing, out = sampled
    res = _preview(env, routing, out)
    grid, masks = res["result"]
    assert grid.ndim == 4 and grid.shape[0] == 1 and grid.shape[-1] == 3 and grid.dtype == torch.float32
    assert float(grid.min()) >= 0 and float(grid.max()) <= 1 and grid.std() > 0.05
    assert masks.shape == (2, 16 * 8, 24 * 8)
    assert float(masks.min()) >= 0 and float(masks.max()) <= 1
    # masks mode: each subject's mask is its region mask (resized to the image)
    region = torch.nn.functional.interpolate(env.masks[:, None], size=(128, 192), mode="nearest")[:, 0] > 0.5
    for i in range(2):
        iou = _iou(masks[i] > 0.5, region[i])
        assert iou > 0.9, f"subject {i + 1}: IoU {iou:.3f} with its region mask"
    assert _iou(masks[0] > 0.5, region[1]) < 0.1
    # the grid is shown in the editor (a PNG in ComfyUI's temp folder)
    files = res["ui"]["images"]
    assert len(files) == 1 and (temp_dir / files[0]["filename"]).is_file()


def test_grid_colours_follow_the_routing(env):
    """Square 16×16 latent, one layer, one step: the cell's left half has subject 1's colour, the right
    half subject 2's (plain or darkened by the 'decided by a mask' stripes)."""
    import torch

    patched, routing = env.apply(eta=1.0, gamma=0.0)
    out = env.sample(patched, torch.zeros(1, 4, 16, 16), steps=2, seed=0)
    grid = _preview(env, routing, out, layers="0", steps="last", cell_size=96)["result"][0][0]
    hexes = F.pack_mod("anystory.preview").PALETTE_HEX
    cols = [torch.tensor([int(h[i:i + 2], 16) / 255 for i in (1, 3, 5)]) for h in hexes[:2]]
    top, left, gap, cell = 22, 70, 2, 96  # labelled_grid's margins around render_grid's cells
    y0, x0 = top + gap, left + gap
    for i, (xa, xb) in enumerate(((x0 + 4, x0 + cell // 2 - 4), (x0 + cell // 2 + 4, x0 + cell - 4))):
        px = grid[y0 + 4:y0 + cell - 4, xa:xb].reshape(-1, 3)
        plain = (px - cols[i]).abs().amax(-1) < 0.02
        dark = (px - 0.55 * cols[i]).abs().amax(-1) < 0.02
        assert bool((plain | dark).all()), f"subject {i + 1}'s half of the cell has other colours"
        assert plain.float().mean() > 0.5


def test_selection_strings(env, sampled):
    _, routing, out = sampled
    run, _ = routing.find_run(out)
    n_layers, n_steps = len(run.layer_order), len(run.step_ids)
    assert (n_layers, n_steps) == (len(env.layout), 3)
    kw = {"cell_size": 192}  # wide enough that the canvas is not its minimum width
    base_h = _preview(env, routing, out, layers="0", steps="0", **kw)["result"][0].shape[1]
    all_layers = _preview(env, routing, out, layers="all", steps="0", **kw)["result"][0]
    two = _preview(env, routing, out, layers="0,-1", steps="0,-1", **kw)["result"][0]
    ranges = _preview(env, routing, out, layers="0-2", steps="all", mask_steps="all", **kw)["result"][0]
    assert all_layers.shape[1] > two.shape[1] > base_h  # rows = selected layers
    assert ranges.shape[2] > two.shape[2]                # columns = selected steps
    err = _err(env.pack)
    for kw, needle in (({"layers": "abc"}, "cannot read the layer selection"),
                       ({"steps": "7"}, "step 7 does not exist"),
                       ({"layers": f"{n_layers}"}, f"layer {n_layers} does not exist"),
                       ({"mask_steps": "1-x"}, "cannot read the step selection"),
                       ({"layers": "-99"}, "does not exist")):
        with pytest.raises(err) as ei:
            _preview(env, routing, out, **kw)
        assert needle in str(ei.value), (kw, str(ei.value))


def test_latent_selects_its_sampling_run(env, caplog):
    import torch

    patched, routing = env.apply(eta=1.0, gamma=1.0)
    lat = torch.zeros(1, 4, 16, 16)
    out1 = env.sample(patched, lat, steps=2, seed=1)
    grid1_alone = _preview(env, routing, out1, steps="all", cell_size=192)["result"][0]
    out2 = env.sample(patched, lat, steps=3, seed=2)       # the same MODEL again: another seed, 3 steps
    assert len(routing.runs) == 2 and not torch.equal(out1, out2)
    assert routing.find_run(out1) == (routing.runs[0], True)
    assert routing.find_run(out2) == (routing.runs[1], True)
    with caplog.at_level(logging.WARNING):
        grid1 = _preview(env, routing, out1, steps="all", cell_size=192)["result"][0]
        grid2 = _preview(env, routing, out2, steps="all", cell_size=192)["result"][0]
    assert not any("does not match" in r.getMessage() for r in caplog.records)
    assert torch.equal(grid1, grid1_alone), "the first latent's preview changed after a second sampling"
    assert grid2.shape[2] > grid1.shape[2]  # 3 step columns vs 2
    # a latent no sampling made: the latest run, with a warning
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        other = _preview(env, routing, torch.randn(1, 4, 16, 16), steps="all", cell_size=192)["result"][0]
    assert any("does not match" in r.getMessage() for r in caplog.records)
    assert other.shape == grid2.shape
    # another size: matched by shape, masks at that size
    out3 = env.sample(patched, torch.zeros(1, 4, 24, 16), steps=2, seed=3)
    assert routing.find_run(out3) == (routing.runs[-1], True)
    assert routing.find_run(out1)[0] is routing.runs[0]
    assert _preview(env, routing, out3)["result"][1].shape == (2, 192, 128)


def test_batch_image_index(env):
    import torch

    patched, routing = env.apply(eta=1.0, gamma=1.0)
    out = env.sample(patched, torch.zeros(2, 4, 16, 16), steps=2, seed=4)
    m0 = _preview(env, routing, out, image_index=0)["result"][1]
    m1 = _preview(env, routing, out, image_index=1)["result"][1]
    assert m0.shape == m1.shape == (2, 128, 128)
    with pytest.raises(_err(env.pack), match="image_index 2 does not exist: the sampling had 2 image"):
        _preview(env, routing, out, image_index=2)


def test_refusals(env):
    import torch

    err = _err(env.pack)
    with pytest.raises(err, match="must come from AnyStoryApply"):
        _preview(env, object(), torch.zeros(1, 4, 16, 16))
    patched, routing = env.apply(eta=1.0, gamma=1.0)
    with pytest.raises(err, match="no routing maps were recorded"):  # not sampled yet
        _preview(env, routing, torch.zeros(1, 4, 16, 16))
    quiet, routing_off = env.apply(eta=1.0, gamma=1.0, record_routing=False)
    out = env.sample(quiet, torch.zeros(1, 4, 16, 16), steps=2)
    assert torch.isfinite(out).all()
    with pytest.raises(err, match="no routing maps were recorded"):
        _preview(env, routing_off, out)
    with pytest.raises(err, match="image_index 1 does not exist"):
        out = env.sample(patched, torch.zeros(1, 4, 16, 16), steps=2)
        _preview(env, routing, out, image_index=1)


def test_legend_names_the_stripes_only_when_a_mask_decided(env, sampled):
    """Issue 18 point 5: the caption says "striped = decided by a region mask" only when a mask decided a cell
    on show (masks mode), not for the learned router."""
    import torch

    _, routing, out = sampled
    note = _preview(env, routing, out)["ui"]["anystory_routing_note"][0]
    assert "striped = decided by a region mask" in note and "router: masks" in note
    patched, routing = env.apply(router_mode="router", region_masks=None, gamma=0.0)
    out = env.sample(patched, torch.zeros(1, 4, 16, 24), steps=2, seed=0)
    res = _preview(env, routing, out)
    note = res["ui"]["anystory_routing_note"][0]
    assert "router: router" in note and "striped" not in note, note
    assert res["ui"]["warnings"] == []


def test_a_sampling_that_cannot_route_says_so_under_the_grid(env):
    """The run's warning (set by the patch when routing cannot start within the steps, see
    tests/anystory/test_patch.py) is in the caption and in the node's ui warnings (/history)."""
    import torch

    rec = F.pack_mod("anystory.recorder").RoutingRecorder(2)
    warning = "the attention router decides from the previous step's attention, so a 1-step sampling is never routed"
    rec.begin_run(sigmas=torch.tensor([10.0, 0.0]), warning=warning)
    rec.record(0, ("input", 1, 0), (4, 6), torch.full((1, 24), 2, dtype=torch.uint8), torch.zeros(1, 24, dtype=torch.uint8))
    latent = torch.ones(1, 4, 4, 6)
    rec.end_run(output=latent)
    res = _preview(env, rec, latent)
    assert res["ui"]["warnings"] == [warning]
    assert "1-step sampling is never routed" in res["ui"]["anystory_routing_note"][0]
