"""LLVM IR for the uint8 SAD kernels (:mod:`addersr.ops.sad`), as numba intrinsics.

``sad_row(width, P, G)``: the ``psadbw`` kernels (``width`` 64: AVX-512BW
``llvm.x86.avx512.psad.bw.512``; 32: AVX2 ``llvm.x86.avx2.psad.bw``). ``psadbw`` sums the
byte-wise ``|a - b|`` of each 8-byte lane group into that lane's 64-bit total; with the
filters grouped ``L = width / 8`` at a time and their taps interleaved (8 channels of
filter 0, 8 of filter 1, ...; ``sad.pack_filters``), and 8 input channels of one pixel
broadcast to every lane, lane ``l`` of an accumulator collects the whole patch sum of
filter ``l`` of the group: no horizontal reduction, and each accumulator is one masked
vector store of L totals. One call covers a whole output row: blocks of P pixels x G
filter groups (accumulators in registers), the last pixel block and filter groups clamped
(recomputed). Compiling these for a CPU without the instructions aborts the process, so
:func:`has_isa` must be checked first.

``portable_block(P, F)``: zext to <32 x i32>, sub, ``llvm.abs``, ``vector.reduce.add`` per
32 bytes of a kernel row (plain filter layout); LLVM selects SAD instructions for it where
the target has them (psadbw on x86, uabd on arm64) and plain vector code elsewhere.

Also float32 bit helpers in 32-bit integer IR (numba would widen int32 arithmetic to
int64, which halves the vector width): ``f32_split`` (exponent and mantissa) and
``f32_exp2i`` (2 ** n for an integral n).
"""

import functools
import platform

from llvmlite import ir
from numba import types
from numba.core import cgutils, config
from numba.extending import intrinsic

_I8, _I32, _I64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
_LANES = 32


def has_isa(feature):
    """True when numba compiles for an x86-64 CPU with ``feature`` ("avx2", "avx512bw"): the
    host, unless NUMBA_CPU_NAME / NUMBA_CPU_FEATURES select another target."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    if config.CPU_FEATURES:
        return f"+{feature}" in config.CPU_FEATURES.split(",")
    if config.CPU_NAME not in (None, "host"):
        return False
    return bool(_host_features().get(feature, False))


@functools.cache
def _host_features():
    """LLVM's host feature map: asking costs ~0.5 ms, so once per process."""
    import llvmlite.binding as ll
    return dict(ll.get_host_cpu_features())


def has_avx2():
    return has_isa("avx2")


def _vector_load(builder, base, offset, lanes=_LANES):
    ptr = builder.gep(base, [offset])
    ptr = builder.bitcast(ptr, ir.VectorType(_I8, lanes).as_pointer())
    return builder.load(ptr, align=1)


def _portable_step(builder):
    # Each 32-byte step is reduced at once: LLVM's x86 back end recognises
    # reduce.add(abs(zext a - zext b)) as psadbw; a vector accumulator hides the pattern.
    vec_t = ir.VectorType(_I32, _LANES)
    abs_fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec_t, [vec_t, ir.IntType(1)]),
                                            "llvm.abs.v32i32")
    red = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_I32, [vec_t]),
                                         "llvm.vector.reduce.add.v32i32")

    def step(acc, a, b):
        d = builder.sub(builder.zext(a, vec_t), builder.zext(b, vec_t))
        return builder.add(acc, builder.call(red, [builder.call(abs_fn, [d, ir.Constant(ir.IntType(1), 0)])]))

    return step


def _const(v):
    return ir.Constant(_I64, v)


def _i64_args(builder, args):
    return [builder.sext(v, _I64) if v.type.width < 64 else v for v in args]


def _data(context, builder, arytype, value):
    return cgutils.create_struct_proxy(arytype)(context, builder, value=value).data


def _block_args(context, builder, signature, args):
    """The data pointers of (x, xoffs, w, fidx, out, ooffs) and rowstride, kh, seg as i64."""
    ptrs = [_data(context, builder, ty, value) for ty, value in zip(signature.args[:6], args[:6])]
    return ptrs + _i64_args(builder, args[6:])


def _min(builder, a, b):
    return builder.select(builder.icmp_signed("<", a, b), a, b)


def _masked_store(builder, vec, ptr, mask):
    vec_t = vec.type
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [vec_t, vec_t.as_pointer(), _I32,
                                                        ir.VectorType(ir.IntType(1), vec_t.count)]),
        f"llvm.masked.store.v{vec_t.count}i32.p0v{vec_t.count}i32")
    builder.call(fn, [vec, builder.bitcast(ptr, vec_t.as_pointer()), ir.Constant(_I32, 4), mask])


def sad_row(width, n_pix, n_grp):
    """The ``psadbw`` row intrinsic (module doc) for ``width``-byte vectors, blocks of
    ``n_pix`` output pixels x ``n_grp`` filter groups.

    Signature ``(x, w, out, xstart, pstride, out_w, g0, n_out, rowstride, kh, seg)``: ``x``
    flat uint8, ``xstart`` the byte offset of output pixel 0's patch (kernel row 0),
    ``pstride`` the bytes between two output pixels' patches, ``rowstride`` between kernel
    rows; ``w`` packed filters (group g at ``g * kh * seg * L``); ``out`` flat int32 of
    ``out_w * n_out``, pixel-major; computes filter groups ``g0 .. g0 + n_grp - 1`` (clamped
    to the last) of every pixel; ``seg`` = kw * Cp bytes, a multiple of 8."""
    if width not in (32, 64):
        raise ValueError("psadbw vectors are 32 or 64 bytes")
    lanes = width // 8

    @intrinsic
    def _sad(typingctx, x, w, out, xstart, pstride, out_w, g0, n_out, rowstride, kh, seg):
        sig = types.void(x, w, out, xstart, pstride, out_w, g0, n_out, rowstride, kh, seg)

        def codegen(context, builder, signature, args):
            xp, wp, op = [_data(context, builder, ty, v) for ty, v in zip(signature.args[:3], args[:3])]
            xs, ps, ow, first_g, nout, rs, nkh, nseg = _i64_args(builder, args[3:])
            acc_t, byte_t, out_t = (ir.VectorType(_I64, lanes), ir.VectorType(_I8, width),
                                    ir.VectorType(_I32, lanes))
            psad = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(acc_t, [byte_t] * 2),
                "llvm.x86.avx2.psad.bw" if width == 32 else "llvm.x86.avx512.psad.bw.512")
            last_g = builder.sub(builder.udiv(builder.add(nout, _const(lanes - 1)), _const(lanes)), _const(1))
            firsts = [builder.mul(_min(builder, builder.add(first_g, _const(g)), last_g), _const(lanes))
                      for g in range(n_grp)]  # first filter of each group
            wbase = [builder.mul(f, builder.mul(nkh, nseg)) for f in firsts]
            full = [builder.icmp_signed("<=", builder.add(f, _const(lanes)), nout) for f in firsts]
            masks = []
            for f in firsts:
                mask = ir.Constant(ir.VectorType(ir.IntType(1), lanes), None)
                for j in range(lanes):
                    mask = builder.insert_element(mask, builder.icmp_signed("<", builder.add(f, _const(j)), nout),
                                                  ir.Constant(_I32, j))
                masks.append(mask)
            nsteps = builder.udiv(nseg, _const(8))
            splat = ir.Constant(ir.VectorType(_I32, lanes), [0] * lanes)
            accs = [cgutils.alloca_once(builder, acc_t) for _ in range(n_pix * n_grp)]
            last_pix = builder.sub(ow, _const(1))
            n_blocks = builder.udiv(builder.add(ow, _const(n_pix - 1)), _const(n_pix))
            with cgutils.for_range(builder, n_blocks) as blk:
                wo0 = builder.mul(blk.index, _const(n_pix))
                wos = [_min(builder, builder.add(wo0, _const(p)), last_pix) for p in range(n_pix)]
                xbase = [builder.add(xs, builder.mul(wo, ps)) for wo in wos]
                for slot in accs:
                    builder.store(ir.Constant(acc_t, None), slot)
                with cgutils.for_range(builder, nkh) as row:
                    xrow = builder.mul(row.index, rs)
                    wrow = builder.mul(builder.mul(row.index, nseg), _const(lanes))
                    with cgutils.for_range(builder, nsteps) as step:
                        xt = builder.add(xrow, builder.mul(step.index, _const(8)))
                        wt = builder.add(wrow, builder.mul(step.index, _const(width)))
                        wv = [_vector_load(builder, wp, builder.add(b, wt), width) for b in wbase]
                        for p in range(n_pix):
                            ptr = builder.bitcast(builder.gep(xp, [builder.add(xbase[p], xt)]), _I64.as_pointer())
                            v = builder.insert_element(ir.Constant(acc_t, None), builder.load(ptr, align=1),
                                                       ir.Constant(_I32, 0))
                            xv = builder.bitcast(builder.shuffle_vector(v, v, splat), byte_t)
                            for g in range(n_grp):
                                slot = accs[p * n_grp + g]
                                builder.store(builder.add(builder.load(slot), builder.call(psad, [xv, wv[g]])), slot)
                for g in range(n_grp):
                    totals = [builder.trunc(builder.load(accs[p * n_grp + g]), out_t) for p in range(n_pix)]
                    ptrs = [builder.gep(op, [builder.add(builder.mul(wo, nout), firsts[g])]) for wo in wos]
                    with builder.if_else(full[g]) as (whole, part):
                        with whole:
                            for t, ptr in zip(totals, ptrs):
                                builder.store(t, builder.bitcast(ptr, out_t.as_pointer()), align=4)
                        with part:
                            for t, ptr in zip(totals, ptrs):
                                _masked_store(builder, t, ptr, masks[g])
            return context.get_dummy_value()

        return sig, codegen

    return _sad


def portable_block(n_pix, n_filt):
    """The portable SAD register block: ``n_pix`` output pixels x ``n_filt`` filters over kh
    kernel rows of ``seg`` bytes each (a multiple of 32), plain filter layout (O, kh, kw, Cp).

    Signature ``(x, xoffs, w, fidx, out, ooffs, rowstride, kh, seg)``: ``xoffs`` (P,) the byte
    offset of each pixel's patch (kernel row 0), ``fidx`` (F,) filter indices (filter f at
    ``f * kh * seg`` in ``w``); pixel p, filter f is stored at ``out[ooffs[p] + fidx[f]]``."""

    @intrinsic
    def _sad(typingctx, x, xoffs, w, fidx, out, ooffs, rowstride, kh, seg):
        sig = types.void(x, xoffs, w, fidx, out, ooffs, rowstride, kh, seg)

        def codegen(context, builder, signature, args):
            xp, xo, wp, fi, op, oo, rs, nkh, nseg = _block_args(context, builder, signature, args)
            step = _portable_step(builder)
            xbase = [builder.load(builder.gep(xo, [_const(p)])) for p in range(n_pix)]
            fids = [builder.load(builder.gep(fi, [_const(f)])) for f in range(n_filt)]
            wbase = [builder.mul(f, builder.mul(nkh, nseg)) for f in fids]
            accs = [cgutils.alloca_once_value(builder, ir.Constant(_I32, 0)) for _ in range(n_pix * n_filt)]
            with cgutils.for_range(builder, nkh) as row:
                xrow = builder.mul(row.index, rs)
                wrow = builder.mul(row.index, nseg)
                with cgutils.for_range(builder, builder.udiv(nseg, _const(_LANES))) as chunk:
                    t = builder.mul(chunk.index, _const(_LANES))
                    wv = [_vector_load(builder, wp, builder.add(builder.add(b, wrow), t)) for b in wbase]
                    for p in range(n_pix):
                        xv = _vector_load(builder, xp, builder.add(builder.add(xbase[p], xrow), t))
                        for f in range(n_filt):
                            slot = accs[p * n_filt + f]
                            builder.store(step(builder.load(slot), xv, wv[f]), slot)
            for p in range(n_pix):
                obase = builder.load(builder.gep(oo, [_const(p)]))
                for f in range(n_filt):
                    builder.store(builder.load(accs[p * n_filt + f]),
                                  builder.gep(op, [builder.add(obase, fids[f])]))
            return context.get_dummy_value()

        return sig, codegen

    return _sad


@intrinsic
def f32_split(typingctx, x):
    """(e, m) as float32 with ``x = m * 2 ** e``, ``1 <= m < 2``, for a normal float32 x > 0."""
    def codegen(context, builder, signature, args):
        bits = builder.bitcast(args[0], _I32)
        e = builder.sub(builder.and_(builder.lshr(bits, ir.Constant(_I32, 23)), ir.Constant(_I32, 255)),
                        ir.Constant(_I32, 127))
        m = builder.or_(builder.and_(bits, ir.Constant(_I32, 0x7FFFFF)), ir.Constant(_I32, 0x3F800000))
        return context.make_tuple(builder, signature.return_type,
                                  [builder.sitofp(e, ir.FloatType()), builder.bitcast(m, ir.FloatType())])
    return types.UniTuple(types.float32, 2)(types.float32), codegen


@intrinsic
def f32_exp2i(typingctx, n):
    """2 ** n for a float32 holding an integer in [-126, 127]."""
    def codegen(context, builder, signature, args):
        k = builder.add(builder.fptosi(args[0], _I32), ir.Constant(_I32, 127))
        return builder.bitcast(builder.shl(k, ir.Constant(_I32, 23)), ir.FloatType())
    return types.float32(types.float32), codegen
