"""Low-precision codecs (edge.format.quant) and ComPEFT transport compression (edge.format.compress); numpy only."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edge.errors import ConfigError, EdgeError, FormatError, RegistryError
from edge.format import quant
from edge.format.adapter import Adapter, DenseDelta, load_adapter
from edge.format.compress import compeft, decompress, from_bytes, to_bytes

RNG = np.random.default_rng(0)


def _ndtr(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


# -- bit packing ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", quant.CODE_BITS)
@pytest.mark.parametrize("n", [1, 3, 7, 9, 17, 1001])
def test_pack_unpack_round_trip(bits, n):
    codes = RNG.integers(0, 1 << bits, n).astype(np.uint8)
    packed = quant.pack_bits(codes, bits)
    assert packed.dtype == np.uint8 and packed.shape == (math.ceil(n * bits / 8),)
    np.testing.assert_array_equal(quant.unpack_bits(packed, bits, n), codes)


@pytest.mark.parametrize(
    "bits,codes,packed",
    [
        (1, [1, 0, 1, 1, 0, 0, 0, 0, 1], [0b00001101, 0b00000001]),  # first code in the lowest bit
        (2, [1, 2, 3, 0, 3], [1 | 2 << 2 | 3 << 4, 3]),
        (4, [0xA, 0x5, 0xF], [0x5A, 0x0F]),
        (8, [0, 255, 7], [0, 255, 7]),
    ],
)
def test_pack_layout_is_little_endian_within_a_byte(bits, codes, packed):
    np.testing.assert_array_equal(quant.pack_bits(np.array(codes, np.uint8), bits), np.array(packed, np.uint8))


# -- codebooks ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bits,head",
    [
        (1, [-0.6744898]),
        (2, [-1.2657203, -0.3777542]),
        (4, [-2.2654906, -1.7077376, -1.3331067, -1.0340063]),  # the reference code's 500-iteration values
        (8, [-3.7854012, -3.4333725, -3.2159102]),
    ],
)
def test_codebooks_sorted_symmetric_and_known(bits, head):
    c = quant.codebook(bits).astype(np.float64)
    assert c.shape == (1 << bits,) and np.all(np.diff(c) > 0)
    np.testing.assert_allclose(c, -c[::-1], atol=1e-6)
    np.testing.assert_allclose(c[: len(head)], head, atol=2e-6)
    np.testing.assert_allclose(quant.thresholds(bits), (c[1:] + c[:-1]) / 2, atol=1e-6)


@pytest.mark.parametrize("bits", quant.CODE_BITS)
def test_codebook_is_the_fixed_point_every_code_the_median_of_its_cell(bits):
    c = quant.codebook(bits).astype(np.float64)
    edges = [0.0] + [_ndtr(t) for t in (c[1:] + c[:-1]) / 2] + [1.0]
    mids = np.array([(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])])
    np.testing.assert_allclose([_ndtr(v) for v in c], mids, atol=2e-7)


# -- schemes --------------------------------------------------------------------------------------------------------

# scheme, bits, bound on RMSE / std for Gaussian weights (large-sample values: 0.616, 0.360, 0.109, 0.008, 0.603)
ERROR_BOUNDS = [("gq", 1, 0.66), ("gq", 2, 0.39), ("gq", 4, 0.125), ("gq", 8, 0.012), ("sign", 1, 0.65)]


@pytest.mark.parametrize("scheme,bits,bound", ERROR_BOUNDS)
def test_encode_decode_error_is_bounded(scheme, bits, bound):
    w = (RNG.standard_normal((96, 40)) * 0.02 + 0.003).astype(np.float32)
    enc = quant.encode(w, scheme, bits)
    out = quant.decode(enc)
    assert out.dtype == np.float32 and out.shape == w.shape
    rel = float(np.sqrt(np.mean((out - w) ** 2)) / w.std())
    assert rel < bound
    assert quant.nbytes(enc) == math.ceil(w.size * bits / 8) + 4 * quant.SCHEMES.get(scheme).n_stats


@pytest.mark.parametrize("bits", quant.CODE_BITS)
def test_gq_decodes_to_scaled_codes(bits):
    w = RNG.standard_normal((33, 7)).astype(np.float32)
    enc = quant.encode(w, "gq", bits)
    mu, sigma = enc.stats
    assert (mu, sigma) == quant.gq_stats(w)
    np.testing.assert_allclose(sigma, w.astype(np.float64).std(ddof=1), rtol=1e-6)  # unbiased, as torch.std
    levels = sigma * quant.codebook(bits) + mu
    assert set(np.unique(quant.decode(enc))) <= set(levels)
    # every entry took its nearest code (in standardised units)
    w_hat = (w - mu) / (sigma + quant.EPS)
    code = (quant.decode(enc) - mu) / sigma
    assert np.all(np.abs(w_hat - code) <= np.min(np.abs(w_hat[..., None] - quant.codebook(bits)), axis=-1) + 1e-5)


def test_sign_scheme_is_bitdelta():
    w = np.array([[0.5, -0.25], [0.0, -1.0]], np.float32)
    enc = quant.encode(w, "sign", 1)
    np.testing.assert_allclose(enc.stats, [0.4375])
    np.testing.assert_array_equal(quant.decode(enc), np.float32(0.4375) * np.array([[1, -1], [1, -1]], np.float32))


def test_fp32_is_exact():
    w = RNG.standard_normal((5, 3)).astype(np.float32)
    w[0, 0] = -0.0
    enc = quant.encode(w, "fp32", 32)
    assert enc.codes.nbytes == w.nbytes and enc.stats.size == 0
    np.testing.assert_array_equal(quant.decode(enc).view(np.uint32), w.view(np.uint32))


def test_constant_tensor_round_trips():
    w = np.full((4, 4), 0.25, np.float32)
    np.testing.assert_array_equal(quant.fake_quant(w, "gq", 1), w)


def test_one_bit_file_is_at_most_1_25_of_fp32_header_included(tmp_path):
    """A realistic bottleneck (the paper's dim 32 on a ViT-B width of 768, two blocks) in the adapter file format."""
    shapes = {
        f"blocks.{i}.adapter.{p}.weight": s for i in range(2) for p, s in (("down", (32, 768)), ("up", (768, 32)))
    }
    values = {k: (RNG.standard_normal(s) * 0.02).astype(np.float32) for k, s in shapes.items()}
    sizes = {}
    for bits in (1, 32):
        scheme = "gq" if bits == 1 else "fp32"
        encs = {k: quant.encode(v, scheme, bits) for k, v in values.items()}
        tensors = {k: DenseDelta(quant.decode(e)) for k, e in encs.items()}
        a = Adapter("a", "sha256:" + "0" * 32, tensors, shapes, method="adapter", encodings=encs if bits < 32 else {})
        path = a.save(tmp_path / f"a{bits}.safetensors")
        sizes[bits] = path.stat().st_size
        back = load_adapter(path)
        for k in values:
            np.testing.assert_array_equal(back.tensors[k].values, tensors[k].values)
    assert sizes[1] * 25 <= sizes[32]


# -- registry and typed errors --------------------------------------------------------------------------------------


def test_scheme_registry_rejects_duplicates():
    assert {"gq", "sign", "fp32"} <= set(quant.SCHEMES.names())
    with pytest.raises(RegistryError):
        quant.SCHEMES.add("gq", quant.SCHEMES.get("gq"))


@pytest.mark.parametrize(
    "call,error",
    [
        (lambda: quant.encode(np.array([1.0, np.nan], np.float32)), ConfigError),
        (lambda: quant.encode(np.ones(4, np.float32), "gq", 3), ConfigError),
        (lambda: quant.encode(np.ones(4, np.float32), "sign", 2), ConfigError),
        (lambda: quant.encode(np.ones(4, np.float32), "fp32", 1), ConfigError),
        (lambda: quant.encode(np.ones(4, np.float32), "int3", 1), RegistryError),
        (lambda: quant.encode(np.ones(4, np.int64)), ConfigError),
        (lambda: quant.encode(np.zeros(0, np.float32)), ConfigError),
        (lambda: quant.pack_bits(np.array([4], np.uint8), 2), ConfigError),
        (lambda: quant.pack_bits(np.array([1], np.uint8), 3), ConfigError),
        (lambda: quant.unpack_bits(np.zeros(2, np.uint8), 1, 17), FormatError),
        (lambda: quant.unpack_bits(np.zeros(2, np.int32), 1, 16), FormatError),
        (lambda: quant.Encoded("gq", 1, (4, 4), np.zeros(3, np.uint8), np.zeros(2, np.float32)), FormatError),
        (lambda: quant.Encoded("gq", 1, (4, 4), np.zeros(2, np.uint8), np.array([0, np.inf], np.float32)), FormatError),
        (lambda: quant.Encoded("gq", 1, (4, 4), np.zeros(2, np.uint8), np.zeros(1, np.float32)), FormatError),
        (lambda: quant.Encoded("gq", 32, (4,), np.zeros(16, np.uint8), np.zeros(2, np.float32)), FormatError),
        (lambda: quant.Encoded("gq", 1, (0, 4), np.zeros(0, np.uint8), np.zeros(2, np.float32)), FormatError),
        (lambda: quant.Encoded("nope", 1, (4,), np.zeros(1, np.uint8), np.zeros(2, np.float32)), FormatError),
    ],
)
def test_bad_input_raises_typed_errors(call, error):
    with pytest.raises(error) as info:
        call()
    assert isinstance(info.value, EdgeError)


# -- ComPEFT --------------------------------------------------------------------------------------------------------


def _tensors():
    return {"a": RNG.standard_normal((16, 8)).astype(np.float32), "b": RNG.standard_normal(50).astype(np.float32)}


@pytest.mark.parametrize("density", [0.01, 0.1, 0.5, 1.0])
def test_compeft_keeps_global_top_k_with_signs_and_one_scale(density):
    t = _tensors()
    c = compeft(t, density)
    tau = np.concatenate([t["a"].ravel(), t["b"]])
    k = max(1, round(density * tau.size))
    assert c.kept == k
    out = decompress(c)
    flat = np.concatenate([out["a"].ravel(), out["b"]])
    kept = flat != 0
    assert kept.sum() == k and np.abs(tau[kept]).min() >= np.abs(tau[~kept]).max(initial=0)
    np.testing.assert_array_equal(np.sign(flat[kept]), np.sign(tau[kept]))
    np.testing.assert_allclose(np.abs(flat[kept]), np.abs(tau[kept]).mean(), rtol=1e-6)  # least-squares scale
    assert c.scales["a"] == c.scales["b"] and c.alpha == pytest.approx(c.scales["a"] / tau.astype(np.float64).std())


def test_compeft_tensor_scope_keeps_top_k_and_a_scale_per_tensor():
    t = {"big": RNG.standard_normal(100).astype(np.float32), "small": RNG.standard_normal(40).astype(np.float32) * 1e-3}
    assert compeft(t, 0.25).mask["small"].sum() == 0  # one adapter-wide top-k drops the small tensor entirely
    c = compeft(t, 0.25, scope="tensor")
    assert c.mask["big"].sum() == 25 and c.mask["small"].sum() == 10
    for k, v in decompress(c).items():
        kept = v != 0
        np.testing.assert_allclose(np.abs(v[kept]), np.abs(t[k][kept]).mean(), rtol=1e-6)


def test_compeft_alpha_sets_scale_from_std_and_bytes_round_trip():
    t = {**_tensors(), "c": RNG.standard_normal((64, 64)).astype(np.float32)}
    ind = np.arange(6, dtype=np.int32).reshape(2, 3)
    c = compeft(t, 0.2, alpha=2.0, passthrough={"a.indices": ind})
    tau = np.concatenate([t[k].ravel() for k in sorted(t)]).astype(np.float64)
    assert list(c.scales.values()) == pytest.approx([2.0 * tau.std()] * 3)
    blob = to_bytes(c, {"name": "x"})
    back, meta = from_bytes(blob)
    assert meta == {"name": "x"}
    for k, v in decompress(c).items():
        np.testing.assert_array_equal(decompress(back)[k], v)
    assert len(blob) < sum(v.nbytes for v in t.values()) / 10  # 1 mask bit per entry + 1 sign bit per kept one


@pytest.mark.parametrize(
    "call,error",
    [
        (lambda: compeft(_tensors(), 0.0), ConfigError),
        (lambda: compeft(_tensors(), 0.1, scope="row"), ConfigError),
        (lambda: compeft({}, 0.1), ConfigError),
        (lambda: compeft({"a": np.array([np.inf], np.float32)}, 0.5), ConfigError),
        (lambda: from_bytes(b"\x00" * 4), FormatError),
        (lambda: from_bytes(to_bytes(compeft(_tensors(), 0.1))[:-3]), FormatError),
    ],
)
def test_compeft_bad_input_raises_typed_errors(call, error):
    with pytest.raises(error):
        call()


def test_every_registered_scheme_has_cases():
    assert {s for s, _, _ in ERROR_BOUNDS} | {"fp32"} == set(quant.SCHEMES.names())
