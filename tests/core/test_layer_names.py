"""One lookup of a layer's entry by name (gdws_approx.layer_names), for both adapters."""

from __future__ import annotations

import pytest

from gdws_approx.layer_names import entry_keys, find_entry


@pytest.mark.parametrize(
    "key",
    ["conv1", "conv1.weight", "module.conv1", "module.conv1.weight"],
)
@pytest.mark.parametrize("name", ["conv1", "module.conv1"])
def test_every_spelling_of_a_layer_finds_its_entry(name, key):
    assert find_entry({key: 7, "other": 1}, name, what="w") == (key, 7)


def test_the_bare_name_comes_first_then_the_parameter_name_then_the_prefixed_ones():
    keys = ["module.conv1.weight", "module.conv1", "conv1.weight", "conv1"]
    mapping = {key: key for key in keys}
    for expected in reversed(keys):  # remove the winner: the next in priority wins
        assert find_entry(mapping, "conv1", what="w") == (expected, expected)
        del mapping[expected]
    assert find_entry(mapping, "conv1", what="w") is None
    assert entry_keys("module.conv1") == entry_keys("conv1") == tuple(reversed(keys))


def test_several_names_are_tried_in_order_as_onnx_names_a_conv():
    mapping = {"layer1.0.conv1.weight": 1, "/layer1/conv/Conv": 2}
    names = ("Conv:layer1.0.conv1.weight", "/layer1/conv/Conv", "layer1.0.conv1.weight")
    assert find_entry(mapping, names, what="w") == ("/layer1/conv/Conv", 2)
    assert find_entry(mapping, ("x", "", "layer1.0.conv1"), what="w") == (
        "layer1.0.conv1.weight",
        1,
    )


def test_a_missing_entry_is_none_or_an_error_listing_what_was_looked_for():
    mapping = {"a.weight": 1, "b": 2}
    assert find_entry(mapping, "c", what="channel_weights") is None
    assert find_entry(None, "c", what="channel_weights", required=True) is None
    with pytest.raises(
        ValueError,
        match=r"^channel_weights has no entry for layer 'c' \(looked for 'c', 'c\.weight', "
        r"'module\.c', 'module\.c\.weight'\); it has 2 entries, for example \['a\.weight', 'b'\]",
    ):
        find_entry(mapping, "c", what="channel_weights", required=True)
    with pytest.raises(TypeError, match="channel_weights must be a mapping"):
        find_entry([1.0], "c", what="channel_weights")
