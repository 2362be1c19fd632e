"""Routing preview: selection parsing, grid rendering, subject masks."""
import pytest
import torch

from anystory.preview import (
    PALETTE_HEX,
    default_layers,
    default_steps,
    hex_to_rgb,
    palette,
    parse_selection,
    render_grid,
    subject_masks,
)
from anystory.recorder import RunRecord


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


def test_recorder_keeps_copies_in_one_buffer_after_the_first_step():
    """The maps of steps after the first land in one buffer made once (no allocation per layer and step,
    which would move the sampler's later allocations); each map is a copy that outlives the caller's
    tensor; a layer first seen later, a changed shape or a step beyond the run gets its own copy; the
    run's end moves all of it to the host."""
    from anystory.recorder import RoutingRecorder
    rec = RoutingRecorder(2)
    rec.begin_run(sigmas=torch.linspace(1, 0, 4))  # 3 steps
    grids = {("input", 4, 0): (2, 3), ("middle", 0, 0): (1, 2)}
    idx = {k: torch.zeros(1, h * w, dtype=torch.long) for k, (h, w) in grids.items()}
    src = torch.zeros(1, 6, dtype=torch.uint8)
    want = {}
    for step in range(5):  # two steps more than the schedule says
        for k, (h, w) in grids.items():
            idx[k].copy_(torch.randint(0, 3, (1, h * w)))  # the patch reuses its index buffers
            rec.record(step, k, (h, w), idx[k], src[:, :h * w])
            want[(step, k)] = idx[k].clone()
        if step == 2:
            rec.record(step, ("output", 1, 0), (1, 1), torch.ones(1, 1, dtype=torch.long), src[:, :1])
    run = rec.current()
    slab = run.slab
    assert slab.buf is not None and slab.buf.shape == (3, 2 * (6 + 2))
    base = slab.buf.untyped_storage().data_ptr()
    for step in (1, 2, 3):  # the rows of the buffer
        for k in grids:
            assert run.steps[step][k][1].untyped_storage().data_ptr() == base
    for step in (0, 4):  # the first step and the one beyond the buffer: own copies
        for k in grids:
            assert run.steps[step][k][1].untyped_storage().data_ptr() != base
    assert run.steps[2][("output", 1, 0)][1].untyped_storage().data_ptr() != base  # unknown layer
    for (step, k), v in want.items():
        got = run.steps[step][k][1]
        assert got.dtype == torch.uint8 and torch.equal(got.long(), v), (step, k)
    rec.end_run()
    done = rec.runs[-1]
    assert done.slab is None
    for (step, k), v in want.items():
        assert torch.equal(done.steps[step][k][1].long(), v)


def test_recorder_reserves_its_buffer_before_a_later_steps_call():
    """reserve() before the model call of a later step makes the buffer then (not at that step's first
    record, in the middle of the call); before the first step is recorded it does nothing."""
    from anystory.recorder import RoutingRecorder
    rec = RoutingRecorder(1)
    rec.begin_run(sigmas=torch.linspace(1, 0, 3))
    rec.reserve(0)
    assert rec.current().slab is None
    idx = torch.zeros(1, 4, dtype=torch.long)
    rec.record(0, ("input", 4, 0), (2, 2), idx, idx.to(torch.uint8))
    rec.reserve(0)
    assert rec.current().slab.buf is None  # still the first step
    rec.reserve(1)
    buf = rec.current().slab.buf
    assert buf is not None and buf.shape == (2, 8)
    rec.record(1, ("input", 4, 0), (2, 2), idx + 1, idx.to(torch.uint8))
    assert rec.current().slab.buf is buf
    assert rec.current().steps[1][("input", 4, 0)][1].untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()


@pytest.mark.parametrize("inference", [False, True])
def test_recorder_copies_a_map_shared_by_layers_once_per_call(inference):
    """Masks and the attention router pass one map for all layers of a grid: it is copied once per call
    and shared by those layers; passed in the next call, it is copied again; rewritten in place within
    a call it is copied again where torch counts writes (not for inference tensors: ComfyUI samples
    under inference mode, whose tensors count none — there the patch never rewrites a map in a call)."""
    with torch.inference_mode(inference):
        _shared_map_once_per_call(inference)


def _shared_map_once_per_call(inference):
    from anystory.recorder import RoutingRecorder
    rec = RoutingRecorder(1)
    rec.begin_run(sigmas=torch.linspace(1, 0, 4))
    shared = torch.zeros(1, 4, dtype=torch.long)
    src = torch.zeros(1, 4, dtype=torch.uint8)
    keys = [("input", 4, 0), ("input", 4, 1)]
    for step in range(3):
        rec.reserve(step)
        shared.fill_(step)
        for k in keys:
            rec.record(step, k, (2, 2), shared, src)
        run = rec.current()
        a, b = (run.steps[step][k][1] for k in keys)
        assert a is b and torch.equal(a.long(), torch.full((1, 4), step))
    rec.reserve(2)  # a second call of step 2, the map rewritten in place: a new copy
    shared.fill_(7)
    rec.record(2, keys[0], (2, 2), shared, src)
    assert torch.equal(rec.current().steps[2][keys[0]][1].long(), torch.full((1, 4), 7))
    shared.fill_(9)  # rewritten within the call: copied again where the version counter says so
    rec.record(2, keys[1], (2, 2), shared, src)
    assert torch.equal(rec.current().steps[2][keys[1]][1].long(), torch.full((1, 4), 7 if inference else 9))
    assert torch.equal(rec.current().steps[1][keys[0]][1].long(), torch.full((1, 4), 1))
