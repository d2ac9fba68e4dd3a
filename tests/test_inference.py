"""`classify`: top-k labels for image files, with the net's own preprocessing."""
from __future__ import annotations

import pytest
from nets import staged_net
from PIL import Image

from d2lft.images import BadImageError
from d2lft.inference import classify


def _net():
    net = staged_net(3)
    net.categories = ["ant", "bee", "wasp"]
    return net


def test_a_bad_file_among_good_ones_is_returned_in_its_place_when_asked(tmp_path):
    # Issue 11, defect 9: `d2lft predict good.jpg empty.jpg` printed nothing for the good image.
    good = tmp_path / "good.jpg"
    Image.new("RGB", (40, 30), (200, 40, 40)).save(good)
    (tmp_path / "empty.jpg").write_bytes(b"")
    net = _net()
    with pytest.raises(BadImageError, match="empty.jpg"):
        classify(net, [good, tmp_path / "empty.jpg"], topk=2)
    results = classify(net, [tmp_path / "empty.jpg", good, tmp_path / "missing.jpg"], topk=2, return_errors=True)
    assert isinstance(results[0], BadImageError) and "empty" in str(results[0])
    assert isinstance(results[2], FileNotFoundError)
    assert results[1] == classify(net, [good], topk=2)[0]  # the good image's labels, as if given alone
    assert [name for name, _ in results[1]] and all(0 <= p <= 1 for _, p in results[1])
    assert all(isinstance(r, BadImageError) for r in classify(net, [tmp_path / "empty.jpg"], return_errors=True))
