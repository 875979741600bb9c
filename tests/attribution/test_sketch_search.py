"""The sketch search: an int8 scan of every document's sketch, then float32 products of the
best 4 x count, returns the float32 search's top (the scan only narrows it)."""

import numpy as np
import pytest
import torch

from core.attribution.influence.sketch import CandidateSearch, _int8_products


def float32_top(vectors: np.ndarray, queries: np.ndarray, count: int) -> list[set[int]]:
    products = torch.from_numpy(vectors) @ torch.from_numpy(queries).T  # (D, c)
    return [set(column.topk(count).indices.tolist()) for column in products.T]


@pytest.mark.parametrize("count", [1, 10, 50])
def test_int8_scan_returns_the_float32_top(count):
    generator = np.random.default_rng(0)
    # documents of very different norms (as unnormalised gradient sketches are) and a few
    # near-copies of one document, whose products differ by less than the int8 error
    vectors = generator.standard_normal((3000, 64)).astype(np.float32) * generator.lognormal(0, 1, (3000, 1)).astype(
        np.float32
    )
    vectors[:8] = vectors[8] + 1e-4 * generator.standard_normal((8, 64)).astype(np.float32)
    queries = generator.standard_normal((12, 64)).astype(np.float32)
    queries[0] = vectors[8]  # its top holds the near-copies
    search = CandidateSearch(vectors)
    quantized = bool({"fbgemm", "x86"} & set(torch.backends.quantized.supported_engines))
    assert (search.packed is not None) == quantized  # x86 torch: the int8 scan runs (4 x count < 3000)
    exact = torch.from_numpy(queries) @ torch.from_numpy(vectors).T
    if quantized:
        approximate = _int8_products(search.packed, torch.from_numpy(queries))
        assert not torch.equal(approximate, exact)  # the scan is an approximation...
    rows, values = search.search(queries, count)
    assert rows.shape == values.shape == (12, count)
    assert [set(r.tolist()) for r in rows] == float32_top(vectors, queries, count)  # ...the result is not
    np.testing.assert_allclose(values, np.take_along_axis(exact.numpy(), rows, 1), rtol=1e-5, atol=1e-5)
    assert (np.diff(values, axis=1) <= 0).all()  # largest first
    search.packed = None  # no quantized backend: the float32 scan, the same result
    fallback, _ = search.search(queries, count)
    assert [set(r.tolist()) for r in fallback] == [set(r.tolist()) for r in rows]


def test_small_collections_and_zero_vectors():
    """Fewer documents than asked for: all of them; a zero sketch (a document without gradient)
    and a zero query do not break the scales."""
    vectors = np.zeros((5, 16), dtype=np.float32)
    vectors[1:] = np.random.default_rng(1).standard_normal((4, 16))
    search = CandidateSearch(vectors)
    rows, values = search.search(np.ones((1, 16), dtype=np.float32), 10)
    assert sorted(rows[0].tolist()) == [0, 1, 2, 3, 4]
    rows, values = search.search(np.zeros((2, 16), dtype=np.float32), 2)
    assert rows.shape == (2, 2) and (values == 0).all()
