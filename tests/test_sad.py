"""uint8 SAD kernels (addersr.ops.sad): both variants against int64 / float64 references."""

import numpy as np
import pytest

from addersr.ops import sad
from addersr.ops.sad_ir import has_avx2, has_isa

VARIANTS = sad.variants()
# (N, H, W, C, O, k, stride): odd sizes, channels not a multiple of 32, filter counts off
# the psadbw groups (8 / 4 filters) and their register blocks (4 / 2 groups: 33, 40, 13),
# widths not a multiple of the pixel blocks (6 / 4 / 2), stride 2.
SHAPES = [(2, 7, 9, 5, 6, 3, (1, 1)), (1, 11, 13, 32, 7, 3, (2, 2)), (1, 6, 5, 40, 9, 1, (1, 2)),
          (1, 8, 10, 64, 13, 3, (2, 1)), (3, 5, 4, 3, 1, 5, (1, 1)), (1, 4, 1, 20, 5, 3, (1, 1)),
          (1, 3, 2, 32, 13, 3, (1, 1)), (2, 5, 13, 31, 9, 3, (1, 1)), (1, 4, 14, 64, 40, 3, (1, 1)),
          (1, 5, 7, 32, 33, 3, (1, 2)), (1, 3, 8, 96, 64, 3, (1, 1))]


def _ref_sad(xq, wq, stride):
    """int64 brute force, one kernel tap at a time."""
    sh, sw = stride
    _, hp, wp, _ = xq.shape
    _, kh, kw, _ = wq.shape
    ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    x, w = xq.astype(np.int64), wq.astype(np.int64)
    out = np.zeros((xq.shape[0], ho, wo, wq.shape[0]), np.int64)
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]
            out += np.abs(patch[:, :, :, None, :] - w[None, None, None, :, i, j, :]).sum(-1)
    return out


def _random_layout(rng, n, h, w, c, o, k, zero_point=0):
    """Padded NHWC input (border = zero_point, padded channels 0) and padded filters."""
    cp = sad.padded_channels(c, k)
    p = k // 2
    xq = np.zeros((n, h + 2 * p, w + 2 * p, cp), np.uint8)
    xq[:, p:p + h, p:p + w, :c] = rng.integers(0, 256, (n, h, w, c))
    sad.fill_border(xq, zero_point, (p, p), c)
    wq = np.zeros((o, k, k, cp), np.uint8)
    wq[..., :c] = rng.integers(0, 256, (o, k, k, c))
    return xq, wq


def test_padded_channels():
    assert [sad.padded_channels(c, 3) for c in (1, 32, 33, 64)] == [32, 32, 64, 64]
    assert sad.padded_channels(5, 2) == 16 and sad.padded_channels(40, 1) == 64


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:6])) + f"s{s[6][0]}{s[6][1]}")
def test_sad_is_exact(variant, shape):
    rng = np.random.default_rng(hash(shape) % 2**32)
    *dims, stride = shape
    xq, wq = _random_layout(rng, *dims, zero_point=int(rng.integers(0, 256)))
    out = sad.sad2d(xq, wq, stride, variant=variant)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, _ref_sad(xq, wq, stride))


@pytest.mark.parametrize("variant", VARIANTS)
def test_sad_extremes(variant):
    """All 0 against all 255: the largest sum (9 * 64 * 255) fits without overflow."""
    xq = np.zeros((1, 4, 5, 64), np.uint8)
    wq = np.full((5, 3, 3, 64), 255, np.uint8)
    assert (sad.sad2d(xq, wq, variant=variant) == 9 * 64 * 255).all()


def _ref_layer(acc, xc, alpha, beta, s_in, a_pow, relu, skip, res_scale):
    f = np.float64
    v = f(alpha) * acc + f(beta) + f(np.float32(s_in)) * xc
    if relu:
        v = np.maximum(v, 0)
    v = np.sign(v) * np.abs(v) ** f(np.float32(a_pow))
    return v if skip is None else skip + f(np.float32(res_scale)) * v


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("relu, a_pow, with_skip", [(True, 0.37, False), (False, 3.36, True), (False, 1.0, True)])
def test_fused_epilogue(variant, relu, a_pow, with_skip):
    """BN (alpha, beta), shortcut, ReLU, power and skip within float32 rounding of a float64
    reference; the requantised output within one level (exact off rounding boundaries)."""
    rng = np.random.default_rng(7)
    n, h, w, c = 2, 9, 11, 24
    xq, wq = _random_layout(rng, n, h, w, c, c, 3, zero_point=77)
    alpha = rng.normal(0, 2e-4, c).astype(np.float32)
    beta = rng.normal(0, 1, c).astype(np.float32)
    skip = rng.normal(size=(n, h, w, c)).astype(np.float32) if with_skip else None
    fout = np.zeros((n, h, w, c), np.float32)
    qout = np.full((n, h + 2, w + 2, sad.padded_channels(c, 3)), 9, np.uint8)
    s_out, z_out = 0.02, 50
    sad.adder_layer(xq, wq, alpha, beta, 0.01, a_pow, relu, skip, 0.1, fout, qout, s_out, z_out, variant)
    acc = _ref_sad(xq, wq, (1, 1)).astype(np.float64)
    ref = _ref_layer(acc, xq[:, 1:-1, 1:-1, :c], alpha, beta, 0.01, a_pow, relu, skip, 0.1)
    np.testing.assert_allclose(fout, ref, rtol=2e-6, atol=2e-6 * np.abs(ref).max())
    q_ref = np.clip(np.floor(ref / s_out + z_out + 0.5), 0, 255)
    q = qout[:, 1:-1, 1:-1, :c].astype(np.float64)
    assert np.abs(q - q_ref).max() <= 1
    near = np.abs((ref / s_out + z_out + 0.5) % 1 - 0.5) > 0.49  # within 1% of a boundary
    assert (q == q_ref)[~near].all()
    assert (qout[:, 0] == 9).all() and (qout[..., c:] == 9).all()  # border and padding untouched


def test_fused_layer_without_outputs_is_a_noop_and_bad_layouts_fail():
    rng = np.random.default_rng(0)
    xq, wq = _random_layout(rng, 1, 4, 4, 8, 8, 3)
    sad.adder_layer(xq, wq, np.ones(8), np.zeros(8), 0.1)
    with pytest.raises(ValueError, match="multiple of 32"):
        sad.sad2d(xq[..., :8].copy(), wq[..., :8].copy())
    with pytest.raises(ValueError, match="uint8"):
        sad.sad2d(xq.astype(np.int16), wq)
    with pytest.raises(ValueError, match="fout"):
        sad.adder_layer(xq, wq, np.ones(8), np.zeros(8), 0.1, fout=np.zeros((1, 4, 4, 9), np.float32))


@pytest.mark.parametrize("variant", VARIANTS)
def test_packed_filters(variant):
    """Filters packed once give the plain array's result; a pack is tied to its variant."""
    rng = np.random.default_rng()
    xq, wq = _random_layout(rng, 1, 6, 9, 64, 19, 3)
    packed = sad.pack_filters(wq, variant)
    assert packed.shape == wq.shape and sad.pack_filters(packed, variant) is packed
    np.testing.assert_array_equal(sad.sad2d(xq, packed), _ref_sad(xq, wq, (1, 1)))
    alpha, beta = np.full(19, -1e-3, np.float32), np.ones(19, np.float32)
    outs = [np.zeros((1, 6, 9, 19), np.float32) for _ in range(2)]
    for filters, out in zip((wq, packed), outs):
        sad.adder_layer(xq, filters, alpha, beta, 0.0, fout=out, variant=variant)
    np.testing.assert_array_equal(outs[0], outs[1])
    for other in set(VARIANTS) - {variant}:
        with pytest.raises(ValueError, match="packed for SAD variant"):
            sad.sad2d(xq, packed, variant=other)
    with pytest.raises(ValueError, match="one value per filter"):
        sad.adder_layer(xq, packed, alpha[:5], beta, 0.0, fout=outs[0])


def test_variant_choice(monkeypatch):
    assert sad.default_variant() == VARIANTS[0]
    assert ("vpsadbw" in VARIANTS) == has_avx2()
    monkeypatch.setenv("ADDERSR_SAD", "portable")
    assert sad.default_variant() == "portable"
    with pytest.raises(ValueError, match="unknown SAD variant"):
        sad.default_variant("sse")
    for variant, isa in (("vpsadbw", "avx2"), ("avx512", "avx512bw")):
        if not has_isa(isa):
            with pytest.raises(ValueError, match=isa.upper()):
                sad.default_variant(variant)


_TARGET_CHECK = """
import numpy as np
from addersr.ops import sad
assert sad.variants() == {variants!r}, sad.variants()
r = np.random.default_rng()
for c, o, w, stride in ((32, 3, 6, (1, 2)), (64, 13, 9, (1, 1)), (32, 33, 7, (2, 1)), (96, 4, 5, (1, 1))):
    x = r.integers(0, 256, (1, 5, w + 2, c)).astype(np.uint8)
    wq = r.integers(0, 256, (o, 3, 3, c)).astype(np.uint8)
    ref = np.abs(np.lib.stride_tricks.sliding_window_view(x.astype(int), (3, 3), (1, 2))
                 [0, :, :, None].transpose(0, 1, 2, 4, 5, 3) - wq[None, None].astype(int)).sum((3, 4, 5))
    for v in sad.variants():
        assert (sad.sad2d(x, wq, stride, variant=v)[0] == ref[::stride[0], ::stride[1]]).all(), (v, c, o)
print("ok")
"""


@pytest.mark.parametrize("cpu_name, features, expected", [
    ("generic", None, ["portable"]),
    ("haswell", "+avx2,+avx,+fma,+sse4.2,+popcnt", ["vpsadbw", "portable"])], ids=["generic", "haswell"])
def test_sad_on_narrower_targets(cpu_name, features, expected, tmp_path):
    """With numba targeting a generic x86-64 only the portable kernel is offered (the
    intrinsics are never compiled, which would abort the process); targeting an AVX2 CPU
    (16 vector registers, masked stores without AVX-512) the vpsadbw kernel is built for
    it; both exact, also at stride 2."""
    import subprocess
    import sys
    if features and not has_avx2():
        pytest.skip("this CPU cannot run AVX2 code")
    env = {**__import__("os").environ, "NUMBA_CPU_NAME": cpu_name, "NUMBA_CACHE_DIR": str(tmp_path)}
    if features:
        env["NUMBA_CPU_FEATURES"] = features
    code = _TARGET_CHECK.format(variants=expected)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_power_activation_precision():
    """sad._pow against float64 on fresh random inputs: within its documented 5e-7 relative
    error for 1e-3 <= y <= 1e3, a <= 1 (1e-6 allowed), and 0 below 1e-37."""
    from numba import njit

    @njit(fastmath=sad._FM, error_model="numpy")
    def power(y, a):
        out = np.empty_like(y)
        for i in range(y.size):
            out[i] = sad._pow(y[i], a)
        return out

    rng = np.random.default_rng()
    y = (10.0 ** rng.uniform(-3, 3, 10007)).astype(np.float32)
    for a in (0.37, 0.8, 1.0):
        ref = y.astype(np.float64) ** np.float64(np.float32(a))
        np.testing.assert_allclose(power(y, np.float32(a)), ref, rtol=1e-6)
    assert (power(np.array([0.0, 1e-38, 5e-38], np.float32), np.float32(0.5)) == 0).all()
