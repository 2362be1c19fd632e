"""Layer layout: execution order vs IP-Adapter's checkpoint numbering."""
import pytest

from anystory.layers import LayerLayout, sdxl_layout


def test_sdxl_layout_counts_and_numbering():
    L = sdxl_layout()
    assert len(L) == 70
    assert sum(s.dim == 640 for s in L) == 10 and sum(s.dim == 1280 for s in L) == 60
    assert L.ckpt_indices == list(range(1, 140, 2))
    # execution order: input, middle, output
    assert L[0].key == ("input", 4, 0) and L[24].key == ("middle", 0, 0) and L[69].key == ("output", 5, 1)
    # checkpoint (diffusers) order: input 1..47, output 49..119, middle 121..139
    assert L.by_key(("input", 8, 9)).ckpt_index == 47
    assert L.by_key(("output", 0, 0)).ckpt_index == 49
    assert L.by_key(("output", 5, 1)).ckpt_index == 119
    assert L.by_key(("middle", 0, 0)).ckpt_index == 121
    assert L.by_key(("middle", 0, 9)).ckpt_index == 139
    assert all(s.dim_head == 64 for s in L)


def test_layout_rejects_duplicates_and_bad_keys():
    with pytest.raises(ValueError):
        LayerLayout([(("input", 1, 0), 32, 2), (("input", 1, 0), 32, 2)])
    with pytest.raises(ValueError):
        LayerLayout([(("mid", 0, 0), 32, 2)])


def test_small_layout_orders():
    L = LayerLayout([(("output", 3, 0), 32, 2), (("middle", 0, 0), 64, 4), (("input", 2, 0), 32, 2)])
    assert [s.key[0] for s in L] == ["input", "middle", "output"]
    assert [L.by_key(k).ckpt_index for k in (("input", 2, 0), ("output", 3, 0), ("middle", 0, 0))] == [1, 3, 5]
