"""Routing preview: selection parsing, grid rendering, subject masks."""
import pytest
import torch

from anystory.preview import (PALETTE_HEX, RunRecord, default_layers, default_steps, hex_to_rgb, palette,
                              parse_selection, render_grid, subject_masks)


def _run():
    run = RunRecord()
    keys = [("input", 4, 0), ("input", 4, 1), ("middle", 0, 0)]
    run.layer_order = keys
    for step in range(3):
        rec = {}
        for key in keys:
            idx = torch.full((1, 4 * 6), 2, dtype=torch.uint8)  # background
            grid = idx.view(1, 4, 6)
            grid[0, :, :2] = 0  # subject 1 on the left third
            grid[0, :, 4:] = 1  # subject 2 on the right third
            src = torch.zeros_like(idx)
            src.view(1, 4, 6)[0, :, 4:] = 1  # subject 2 decided by a mask
            rec[key] = ((4, 6), idx, src)
        run.steps[step] = rec
    return run


def test_parse_selection():
    items = list("abcdef")
    assert parse_selection("all", items, "layer") == items
    assert parse_selection("last", items, "layer") == ["f"]
    assert parse_selection("0, 2-3,-1", items, "layer") == ["a", "c", "d", "f"]
    assert parse_selection("-2--1", items, "layer") == ["e", "f"]
    with pytest.raises(ValueError, match="layer 9 does not exist"):
        parse_selection("9", items, "layer")
    with pytest.raises(ValueError, match="cannot read"):
        parse_selection("first", items, "step")


def test_defaults():
    order = [("input", 4, 0), ("input", 4, 1), ("input", 5, 0), ("middle", 0, 0), ("middle", 0, 1)]
    assert default_layers(order) == [("input", 4, 0), ("input", 5, 0), ("middle", 0, 0)]
    assert default_steps(list(range(25)), 5) == [0, 6, 12, 18, 24]


def test_render_grid_colours_and_stripes():
    run = _run()
    img = render_grid(run, run.layer_order[:2], [0, 2], 2, cell=24, gap=2)
    assert img.shape[2] == 3
    colors = palette(2)
    # maps are 4x6 tokens (wider than tall): a cell is 16x24 px; the first starts at (2, 2)
    assert img.shape[0] == 2 * 16 + 3 * 2 and img.shape[1] == 2 * 24 + 3 * 2
    cell = img[2:2 + 16, 2:2 + 24]
    torch.testing.assert_close(cell[5, 3], colors[0])
    torch.testing.assert_close(cell[5, 12], colors[2])  # background, dark
    right = cell[:, 17:]
    dimmed = (right - colors[1]).abs().sum(-1) > 0.1
    assert dimmed.any() and not dimmed.all()  # striped: mask-decided
    torch.testing.assert_close(colors[0], torch.tensor(hex_to_rgb(PALETTE_HEX[0])))


def test_subject_masks_are_segmentation():
    run = _run()
    m = subject_masks(run, run.layer_order, [2], 2, (40, 60))
    assert m.shape == (2, 40, 60)
    assert m[0, 20, 5] > 0.99 and m[0, 20, 30] < 0.01 and m[1, 20, 55] > 0.99
    assert m.min() >= 0 and m.max() <= 1
