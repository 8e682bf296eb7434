"""LLVM IR for the uint8 SAD kernels (:mod:`addersr.ops.sad`), as numba intrinsics.

``sad_block(variant, P, F)`` makes an intrinsic that computes a register block of P output
pixels x F filters of ``sum |x - w|`` over kh kernel rows of ``seg`` bytes each (``seg`` a
multiple of 32), with the accumulators kept in vector registers:

* ``"avx512"``: ``llvm.x86.avx512.psad.bw.512`` on <64 x i8> for every whole 64 bytes of
  a kernel row, then the AVX2 form below for a remaining 32, added into the low half of
  the same 512-bit accumulator (AVX-512BW only).
* ``"vpsadbw"``: ``llvm.x86.avx2.psad.bw`` on <32 x i8> (32 byte-wise |a - b|, summed in
  four 64-bit lanes). Compiling these for a CPU without the instructions aborts the
  process, so :func:`has_isa` must be checked first.
* ``"portable"``: zext to <32 x i32>, sub, ``llvm.abs``, ``vector.reduce.add``; LLVM
  selects SAD instructions for it where the target has them (psadbw on x86, uabd on
  arm64) and plain vector code elsewhere.

Intrinsic signature: ``(x, xoffs, w, fidx, out, ooffs, rowstride, kh, seg)`` with ``x``,
``w`` flat uint8 arrays, ``xoffs`` (P,) the byte offset of each pixel's patch (kernel row
0), ``fidx`` (F,) filter indices (filter f starts at ``f * kh * seg`` in ``w``), and
``out`` a flat int32 array receiving pixel p, filter f at ``ooffs[p] + fidx[f]``. The
block's accumulators are folded together (``_fold``) and stored a pixel at a time with
masked vector stores that skip the clamped (repeated) filters of an edge block.
``sad_pair_block(Q, F)``: the AVX-512 block for 32 padded channels at stride 1, Q pairs
of adjacent pixels sharing each 64-byte load (same signature).
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


def _psadbw_ops(builder, lanes=_LANES):
    acc_t = ir.VectorType(_I64, lanes // 8)
    name = "llvm.x86.avx2.psad.bw" if lanes == 32 else "llvm.x86.avx512.psad.bw.512"
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(acc_t, [ir.VectorType(_I8, lanes)] * 2), name)
    red = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_I64, [acc_t]),
                                         f"llvm.vector.reduce.add.v{lanes // 8}i64")
    return (acc_t, lambda acc, a, b: builder.add(acc, builder.call(fn, [a, b])),
            lambda acc: builder.call(red, [acc]))


def _portable_ops(builder):
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

    return _I32, step, lambda acc: builder.sext(acc, _I64)


def _passes(variant, builder):
    """(acc type, reduce, [(bytes per step, step)]): a kernel row is covered by as many steps
    of the first width as fit, then of the next, all into one accumulator per output."""
    if variant == "avx512":
        acc_t, step64, reduce_ = _psadbw_ops(builder, 64)
        _, step32, _ = _psadbw_ops(builder, 32)
        zero4 = ir.Constant(ir.VectorType(_I64, 4), None)
        widen = ir.Constant(ir.VectorType(_I32, 8), list(range(8)))

        def step_half(acc, a, b):  # a 32-byte SAD into the low half of the 512-bit accumulator
            return builder.add(acc, builder.shuffle_vector(step32(zero4, a, b), zero4, widen))

        return acc_t, reduce_, [(64, step64), (32, step_half)]
    acc_t, step, reduce_ = (_psadbw_ops if variant == "vpsadbw" else _portable_ops)(builder)
    return acc_t, reduce_, [(32, step)]


def _fold(builder, vecs, per_out=1):
    """Sum each of the equally long i64 vectors ``vecs`` (every lane and every total < 2 ** 31)
    over groups of L / ``per_out`` adjacent lanes; returns <2L x i32> vectors.

    Pairs are first packed into one vector (``x + (y << 32)``: in-lane, no shuffle, exact as
    no lane sum carries into the high half), then folded pairwise (even lanes + odd lanes of
    two vectors, zero-padded to an even count) until each lane is one group's total: half
    the cross-lane shuffles of folding the accumulators themselves. With ``per_out`` 1 the
    totals come out in order; otherwise packed vector m (inputs 2m, 2m+1) gives, in turn,
    the ``per_out`` groups of input 2m interleaved with those of input 2m + 1."""
    i64v = vecs[0].type
    lanes = i64v.count
    vecs = vecs + [ir.Constant(i64v, None)] * (len(vecs) % 2)
    shift = ir.Constant(i64v, [32] * lanes)
    vecs = [builder.add(x, builder.shl(y, shift)) for x, y in zip(vecs[0::2], vecs[1::2])]
    even = ir.Constant(ir.VectorType(_I32, lanes), list(range(0, 2 * lanes, 2)))
    odd = ir.Constant(ir.VectorType(_I32, lanes), list(range(1, 2 * lanes, 2)))
    per = lanes
    while per > per_out:
        if len(vecs) % 2:
            vecs.append(ir.Constant(i64v, None))
        vecs = [builder.add(builder.shuffle_vector(x, y, even), builder.shuffle_vector(x, y, odd))
                for x, y in zip(vecs[0::2], vecs[1::2])]
        per //= 2
    return [builder.bitcast(v, ir.VectorType(_I32, 2 * lanes)) for v in vecs]


def _store_sums(builder, vecs, n_filt, out, obases, fids):
    """Store the totals (``vecs`` from :func:`_fold`, pixel-major, ``n_filt`` per pixel) at
    ``obases[p] + fids[f]``: one masked vector store per pixel and lane group (filters that
    divide into lanes or lanes into filters), the mask dropping the clamped (repeated) filters;
    otherwise one scalar store per total."""
    lanes = vecs[0].type.count
    group = min(n_filt, lanes)
    if max(n_filt, lanes) % group:
        for p, obase in enumerate(obases):
            for f in range(n_filt):
                k, off = divmod(p * n_filt + f, lanes)
                total = builder.extract_element(vecs[k], ir.Constant(_I32, off))
                builder.store(total, builder.gep(out, [builder.add(obase, fids[f])]))
        return
    valid = [builder.icmp_signed("==", fids[f], builder.add(fids[0], ir.Constant(_I64, f)))
             for f in range(n_filt)]
    vec_t = ir.VectorType(_I32, group)
    mstore = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [vec_t, vec_t.as_pointer(), _I32,
                                                        ir.VectorType(ir.IntType(1), group)]),
        f"llvm.masked.store.v{group}i32.p0v{group}i32")
    for p, obase in enumerate(obases):
        for c in range(0, n_filt, group):
            k, off = divmod(p * n_filt + c, lanes)
            piece = builder.shuffle_vector(vecs[k], vecs[k], ir.Constant(
                ir.VectorType(_I32, group), list(range(off, off + group))))
            mask = ir.Constant(ir.VectorType(ir.IntType(1), group), None)
            for j in range(group):
                mask = builder.insert_element(mask, valid[c + j], ir.Constant(_I32, j))
            ptr = builder.bitcast(builder.gep(out, [builder.add(obase, fids[c])]), vec_t.as_pointer())
            builder.call(mstore, [piece, ptr, ir.Constant(_I32, 4), mask])


def _data(context, builder, arytype, value):
    return cgutils.create_struct_proxy(arytype)(context, builder, value=value).data


def _block_args(context, builder, signature, args):
    """The data pointers of (x, xoffs, w, fidx, out, ooffs) and rowstride, kh, seg as i64."""
    ptrs = [_data(context, builder, ty, value) for ty, value in zip(signature.args[:6], args[:6])]
    return ptrs + [builder.sext(v, _I64) if v.type.width < 64 else v for v in args[6:]]


def sad_block(variant, n_pix, n_filt):
    """The SAD register-block intrinsic for ``variant`` ("vpsadbw" or "portable")."""
    if variant not in ("avx512", "vpsadbw", "portable"):
        raise ValueError(f"unknown SAD variant {variant!r}")

    @intrinsic
    def _sad(typingctx, x, xoffs, w, fidx, out, ooffs, rowstride, kh, seg):
        sig = types.void(x, xoffs, w, fidx, out, ooffs, rowstride, kh, seg)

        def codegen(context, builder, signature, args):
            xp, xo, wp, fi, op, oo, rs, nkh, nseg = _block_args(context, builder, signature, args)
            acc_t, reduce_, passes = _passes(variant, builder)
            xbase = [builder.load(builder.gep(xo, [ir.Constant(_I64, p)])) for p in range(n_pix)]
            fids = [builder.load(builder.gep(fi, [ir.Constant(_I64, f)])) for f in range(n_filt)]
            flen = builder.mul(nkh, nseg)
            wbase = [builder.mul(f, flen) for f in fids]
            accs = [cgutils.alloca_once_value(builder, ir.Constant(acc_t, None)) for _ in range(n_pix * n_filt)]
            with cgutils.for_range(builder, nkh) as row:
                xrow = builder.mul(row.index, rs)
                wrow = builder.mul(row.index, nseg)
                start, left = ir.Constant(_I64, 0), nseg
                for width, step in passes:
                    size = ir.Constant(_I64, width)
                    count = builder.udiv(left, size)
                    with cgutils.for_range(builder, count) as chunk:
                        t = builder.add(start, builder.mul(chunk.index, size))
                        wv = [_vector_load(builder, wp, builder.add(builder.add(b, wrow), t), width)
                              for b in wbase]
                        for p in range(n_pix):
                            xv = _vector_load(builder, xp, builder.add(builder.add(xbase[p], xrow), t), width)
                            for f in range(n_filt):
                                slot = accs[p * n_filt + f]
                                builder.store(step(builder.load(slot), xv, wv[f]), slot)
                    start = builder.add(start, builder.mul(count, size))
                    left = builder.sub(left, builder.mul(count, size))
            obases = [builder.load(builder.gep(oo, [ir.Constant(_I64, p)])) for p in range(n_pix)]
            sums = [builder.load(slot) for slot in accs]
            if isinstance(acc_t, ir.VectorType):
                _store_sums(builder, _fold(builder, sums), n_filt, op, obases, fids)
            else:
                for i, total in enumerate(sums):
                    p, f = divmod(i, n_filt)
                    builder.store(builder.trunc(reduce_(total), _I32),
                                  builder.gep(op, [builder.add(obases[p], fids[f])]))
            return context.get_dummy_value()

        return sig, codegen

    return _sad


def sad_pair_block(n_pairs, n_filt):
    """AVX-512 SAD block for 32 padded channels at stride 1: ``n_pairs`` pairs of adjacent
    output pixels x ``n_filt`` filters (``n_filt`` 2, 4 or 8).

    With 32 bytes per pixel, the two pixels of a pair read, at each kernel tap, two adjacent
    32-byte columns: one 64-byte load, against the filter's tap stored twice (``w`` as
    (O, kh, kw, 64), see ``sad.paired_filters``), and one accumulator per pair whose low
    four lanes belong to the first pixel and high four to the second. A 3x3 patch is then
    4.5 vector steps per pixel instead of 3 whole and 3 half ones, and each accumulator folds
    into two outputs. Same signature as :func:`sad_block`, ``xoffs`` (2 * n_pairs) holding
    each pixel's patch offset (a pair's first one is read) and ``seg`` = kw * 32."""
    if n_filt not in (2, 4, 8):
        raise ValueError("a paired SAD block takes 2, 4 or 8 filters")
    n_pix = 2 * n_pairs

    @intrinsic
    def _sad(typingctx, x, xoffs, w, fidx, out, ooffs, rowstride, kh, seg):
        sig = types.void(x, xoffs, w, fidx, out, ooffs, rowstride, kh, seg)

        def codegen(context, builder, signature, args):
            xp, xo, wp, fi, op, oo, rs, nkh, nseg = _block_args(context, builder, signature, args)
            acc_t, step64, _ = _psadbw_ops(builder, 64)
            const = lambda v: ir.Constant(_I64, v)  # noqa: E731
            kw = builder.udiv(nseg, const(32))
            xbase = [builder.load(builder.gep(xo, [const(2 * q)])) for q in range(n_pairs)]
            fids = [builder.load(builder.gep(fi, [const(f)])) for f in range(n_filt)]
            flen = builder.mul(builder.mul(nkh, kw), const(64))
            wbase = [builder.mul(f, flen) for f in fids]
            accs = [cgutils.alloca_once_value(builder, ir.Constant(acc_t, None)) for _ in range(n_pairs * n_filt)]
            with cgutils.for_range(builder, nkh) as row:
                xrow = builder.mul(row.index, rs)
                wrow = builder.mul(builder.mul(row.index, kw), const(64))
                with cgutils.for_range(builder, kw) as tap:
                    xt = builder.add(xrow, builder.mul(tap.index, const(32)))
                    wt = builder.add(wrow, builder.mul(tap.index, const(64)))
                    wv = [_vector_load(builder, wp, builder.add(b, wt), 64) for b in wbase]
                    for q in range(n_pairs):
                        xv = _vector_load(builder, xp, builder.add(xbase[q], xt), 64)
                        for f in range(n_filt):
                            slot = accs[q * n_filt + f]
                            builder.store(step64(builder.load(slot), xv, wv[f]), slot)
            # packed vector m = (q, filters 2r and 2r+1): [2r lo, 2r+1 lo, 2r hi, 2r+1 hi]
            # (lo: the pair's first pixel); each 16-lane vector holds whole pixels: reorder
            # it pixel-major for the stores
            folded = _fold(builder, [builder.load(slot) for slot in accs], per_out=2)
            order = []
            for pix in range(16 // n_filt):
                q, h = divmod(pix, 2)
                order += [((q * n_filt + f) // 2) * 4 + h * 2 + f % 2 for f in range(n_filt)]
            mask = ir.Constant(ir.VectorType(_I32, 16), order)
            folded = [builder.shuffle_vector(v, v, mask) for v in folded]
            obases = [builder.load(builder.gep(oo, [const(p)])) for p in range(n_pix)]
            _store_sums(builder, folded, n_filt, op, obases, fids)
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
