import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attrib_core import ravel, select

shapes = st.lists(st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple), min_size=1, max_size=5)


@given(shapes=shapes, lead=st.integers(1, 3))
def test_ravel_round_trip_keeps_order_shapes_and_leading_dims(shapes, lead):
    params = {f"p{i}": torch.randn(s, dtype=torch.float64) for i, s in enumerate(shapes)}
    flat, unravel = ravel(params)
    assert flat.shape == (sum(t.numel() for t in params.values()),)
    assert torch.equal(flat, torch.cat([t.reshape(-1) for t in params.values()]))
    back = unravel(flat)
    assert list(back) == list(params)
    for k in params:
        assert torch.equal(back[k], params[k])
    stacked = torch.stack([flat * (i + 1) for i in range(lead)])
    split = unravel(stacked)
    for k in params:
        assert split[k].shape == (lead, *params[k].shape)
        assert torch.equal(split[k][lead - 1], params[k] * lead)


def test_ravel_promotes_and_unravel_casts_back():
    params = {"a": torch.ones(2, dtype=torch.float16), "b": torch.ones(3, dtype=torch.float64)}
    flat, unravel = ravel(params)
    assert flat.dtype == torch.float64
    back = unravel(flat)
    assert back["a"].dtype == torch.float16 and back["b"].dtype == torch.float64


def test_unravel_rejects_wrong_width():
    _, unravel = ravel({"a": torch.ones(3)})
    with pytest.raises(ValueError, match="P=3"):
        unravel(torch.ones(4))


def test_ravel_rejects_empty_and_non_tensors():
    with pytest.raises(ValueError, match="empty"):
        ravel({})
    with pytest.raises(TypeError, match="params"):
        ravel([torch.ones(2)])


PARAMS = {
    "fc.weight": torch.ones(2, 2),
    "fc.bias": torch.ones(2),
    "fc2.weight": torch.ones(2, 2),
    "encoder.head.weight": torch.ones(3),
}


def test_select_by_parameter_name_prefix_and_list():
    assert list(select(PARAMS, "fc.weight")) == ["fc.weight"]
    # "fc" is a module prefix: it must not catch "fc2.weight".
    assert list(select(PARAMS, "fc")) == ["fc.weight", "fc.bias"]
    assert list(select(PARAMS, "encoder")) == ["encoder.head.weight"]
    assert list(select(PARAMS, "encoder.head")) == ["encoder.head.weight"]
    # The order is the parameters' order, whatever the order of the names.
    assert list(select(PARAMS, ["fc2", "fc.bias"])) == ["fc.bias", "fc2.weight"]
    assert list(select(PARAMS, None)) == list(PARAMS)


def test_select_treats_a_string_as_one_name():
    # Iterating "fc" character by character would look up "f" and "c".
    with pytest.raises(ValueError) as err:
        select(PARAMS, "f")
    assert "'f'" in str(err.value)
    assert select(PARAMS, ("fc",)) == select(PARAMS, "fc")


def test_select_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        select(PARAMS, ["fc", "decoder"])
    message = str(err.value)
    assert "decoder" in message and "fc.weight" in message and "encoder.head" in message


def test_select_rejects_bad_types():
    with pytest.raises(TypeError, match="names"):
        select(PARAMS, 3)
    with pytest.raises(TypeError, match="names"):
        select(PARAMS, ["fc", 3])
    with pytest.raises(ValueError, match="empty"):
        select(PARAMS, [])


def test_split_by_module_groups_columns_by_layer():
    from attrib_core import split_by_module

    params = {"a.weight": torch.zeros(2, 3), "a.bias": torch.zeros(2), "scale": torch.zeros(1),
              "b.c.weight": torch.zeros(4)}
    flat = torch.arange(2 * 13, dtype=torch.float64).reshape(2, 13)
    blocks = split_by_module(flat, params)
    assert list(blocks) == ["a", "", "b.c"]
    assert torch.equal(blocks["a"], flat[:, :8]) and torch.equal(blocks[""], flat[:, 8:9])
    assert torch.equal(blocks["b.c"], flat[:, 9:])
    with pytest.raises(ValueError, match="flat"):
        split_by_module(flat[:, :5], params)
