"""LLVM IR for the column-vectorised input gradient of :mod:`addersr.ops.cpu`, as a numba
intrinsic.

``clamp_fma_block(n_ch, n_vec)`` makes an intrinsic that accumulates, for ``n_ch``
channels x ``n_vec`` vectors of adjacent image columns (one vector register each),

    acc[ch, p] += g(r, j, p) * clamp(key(r, j, ch), lo[ch, p], hi[ch, p])

over the steps t (kernel row x output channel x kernel column): ``g(t, p)`` is the vector of
``rows`` at ``rbase + steps[t] + p * lanes`` (the output gradient of the columns that step t
maps the block's columns to), ``key(t, ch)`` the scalar ``keys[kbase + t * n_ch + ch]``
broadcast, and ``lo``, ``hi`` vectors of bounds. Keys and bounds are integers ordered as the floats they hold (see
``cpu._order_key``), so the clamp is an integer max and min, which a Zen 5 issues on all four
vector pipes (float max / min: two). No horizontal sums: every lane is one output.

Intrinsic signature: ``(rows, rbase, steps, keys, kbase, x, xbase, cstride, nch, ncols,
shift, sums, gx)`` with 1-D arrays ``rows``, ``x``, ``sums``, ``gx`` (floats), ``steps``
(int64: the offset of step t in ``rows``), ``keys`` (integers of the floats' width). The
block's first column of channel ch is at ``xbase + ch * cstride`` in ``x`` and ``gx``; the
bounds are the keys of ``x + shift -/+ 1`` and the block writes
``gx = acc - (x + shift) * sums`` (``sums``: the output gradient summed over each column's
taps, from the block's first column), for the first ``nch`` channels and ``ncols`` columns
(masked loads and stores past them). Vectors are ``VECTOR_BYTES`` long.
"""

import hashlib
import types as pytypes
from pathlib import Path

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .sad_ir import has_isa

VECTOR_BYTES = 64 if has_isa("avx512f") else 32
_I64 = ir.IntType(64)


def source_tag(module_file):
    """A short hash of the source of ``module_file`` (a file next to this one)."""
    return hashlib.sha256(Path(__file__).with_name(module_file).read_bytes()).hexdigest()[:12]


def compile_template(fn, name, env, parallel, fastmath):
    """njit (cached) a copy of ``fn`` named ``name``, with ``env`` added to its globals.

    numba's cache only sees the time stamp of the file that defines a kernel: a kernel that
    inlines intrinsics from another file must carry that file's ``source_tag`` in its name,
    or a change there would load stale machine code."""
    f = pytypes.FunctionType(fn.__code__, {**fn.__globals__, **env}, name)
    f.__qualname__ = name
    return njit(parallel=parallel, cache=True, fastmath=fastmath)(f)


def _data(context, builder, arytype, value):
    return cgutils.create_struct_proxy(arytype)(context, builder, value=value).data


def _load(builder, base, offset, vec_t, align):
    ptr = builder.bitcast(builder.gep(base, [offset]), vec_t.as_pointer())
    return builder.load(ptr, align=align)


def _vector_types(context, dtype):
    """(float vector, integer vector of the same width, lanes, alignment) for ``dtype``."""
    width = dtype.bitwidth
    lanes = VECTOR_BYTES * 8 // width
    return (ir.VectorType(context.get_value_type(dtype), lanes), ir.VectorType(ir.IntType(width), lanes),
            lanes, width // 8)


def _kind(vec_t):
    """LLVM's name of a float vector type, e.g. v16f32."""
    return f"v{vec_t.count}f{32 if isinstance(vec_t.element, ir.FloatType) else 64}"


def _fma(builder, vec_t):
    fn_t = ir.FunctionType(vec_t, [vec_t] * 3)
    return cgutils.get_or_insert_function(builder.module, fn_t, f"llvm.fma.{_kind(vec_t)}")


def _no_unroll(builder, branch):
    """Tags the loop whose latch is ``branch`` ``llvm.loop.unroll.disable``: unrolled twice,
    a block's accumulators and bounds no longer fit in registers and are reloaded each step."""
    module = builder.module
    loop = module.add_metadata([ir.MetaDataString(module, "llvm.loop.unroll.disable")])
    node = module.add_metadata([loop, loop])
    node.operands = (node, loop)  # a loop ID refers to itself (LLVM LangRef)
    branch.set_metadata("llvm.loop", node)


def _counted_loop(builder, count):
    """Starts ``for t in range(count)``, never unrolled: returns (t, close), ``close()`` ends
    the body and leaves the builder after the loop."""
    index = cgutils.alloca_once_value(builder, ir.Constant(_I64, 0))
    head, body, after = (builder.append_basic_block(name) for name in ("steps", "step", "steps_done"))
    builder.branch(head)
    builder.position_at_end(head)
    t = builder.load(index)
    builder.cbranch(builder.icmp_signed("<", t, count), body, after)
    builder.position_at_end(body)

    def close():
        builder.store(builder.add(t, ir.Constant(_I64, 1)), index)
        _no_unroll(builder, builder.branch(head))
        builder.position_at_end(after)

    return t, close


def _step_loop(builder, n_acc, vec_t, align, nsteps, vectors, scalars, body):
    """``n_acc`` zero accumulators (slots) and ``for t in range(nsteps)`` around ``body(vecs,
    scalar, accs)``: ``vectors`` = (data, base, steps, count): vecs[p] the vector at
    ``data[base + steps[t] + p * lanes]``, p < count; ``scalars`` = (data, base, per):
    scalar(k) = ``data[base + t * per + k]``. Returns the slots."""
    const = lambda v: ir.Constant(_I64, v)  # noqa: E731
    accs = [cgutils.alloca_once_value(builder, ir.Constant(vec_t, None)) for _ in range(n_acc)]
    t, done = _counted_loop(builder, nsteps)
    data, base, steps, count = vectors
    start = builder.add(base, builder.load(builder.gep(steps, [t])))
    vecs = [_load(builder, data, builder.add(start, const(p * vec_t.count)), vec_t, align) for p in range(count)]
    sdata, sbase, per = scalars
    sstart = builder.add(sbase, builder.mul(t, const(per)))
    body(vecs, lambda k: builder.load(builder.gep(sdata, [builder.add(sstart, const(k))])), accs)
    done()
    return accs


def _splat(builder, value, vec_t):
    i32 = ir.IntType(32)
    first = builder.insert_element(ir.Constant(vec_t, None), value, ir.Constant(i32, 0))
    return builder.shuffle_vector(first, ir.Constant(vec_t, None), ir.Constant(ir.VectorType(i32, vec_t.count), None))


def _column_masks(builder, ncols, n_vec, lanes):
    """Per vector p, the lanes whose column p * lanes + lane is < ``ncols``."""
    iota = ir.Constant(ir.VectorType(_I64, lanes), list(range(lanes)))
    limit = _splat(builder, ncols, iota.type)
    return [builder.icmp_signed("<", builder.add(iota, _splat(builder, ir.Constant(_I64, p * lanes), iota.type)),
                                limit) for p in range(n_vec)]


def _masked(builder, name, vec_t, args):
    ptr_t, bvec = vec_t.as_pointer(), ir.VectorType(ir.IntType(1), vec_t.count)
    kind = _kind(vec_t)
    if name == "load":
        fn_t = ir.FunctionType(vec_t, [ptr_t, ir.IntType(32), bvec, vec_t])
    else:
        fn_t = ir.FunctionType(ir.VoidType(), [vec_t, ptr_t, ir.IntType(32), bvec])
    fn = cgutils.get_or_insert_function(builder.module, fn_t, f"llvm.masked.{name}.{kind}.p0{kind}")
    return builder.call(fn, args)


def _masked_load(builder, base, offset, vec_t, mask, align):
    ptr = builder.bitcast(builder.gep(base, [offset]), vec_t.as_pointer())
    return _masked(builder, "load", vec_t, [ptr, ir.Constant(ir.IntType(32), align), mask, ir.Constant(vec_t, None)])


def _masked_store(builder, value, base, offset, mask, align):
    ptr = builder.bitcast(builder.gep(base, [offset]), value.type.as_pointer())
    _masked(builder, "store", value.type, [value, ptr, ir.Constant(ir.IntType(32), align), mask])


def clamp_fma_block(n_ch, n_vec):
    """The block intrinsic for ``n_ch`` channels x ``n_vec`` column vectors (see the module doc)."""

    @intrinsic
    def _block(typingctx, rows, rbase, steps, keys, kbase, x, xbase, cstride, nch, ncols, shift, sums, gx):
        sig = types.void(rows, rbase, steps, keys, kbase, x, xbase, cstride, nch, ncols, shift, sums, gx)

        def codegen(context, builder, signature, args):
            a_rows, rbase, a_steps, a_keys, kbase, a_x, xbase, cstride, nch, ncols, shift, a_sums, a_gx = args
            tys = signature.args
            nsteps = cgutils.create_struct_proxy(tys[2])(context, builder, value=a_steps).nitems
            fvec, ivec, lanes, align = _vector_types(context, tys[0].dtype)
            rp, sp = _data(context, builder, tys[0], a_rows), _data(context, builder, tys[2], a_steps)
            kp, xp = _data(context, builder, tys[3], a_keys), _data(context, builder, tys[5], a_x)
            mp, gp = _data(context, builder, tys[11], a_sums), _data(context, builder, tys[12], a_gx)
            rbase, kbase, xbase, cstride, nch, ncols = (builder.sext(v, _I64) if v.type.width < 64 else v
                                                        for v in (rbase, kbase, xbase, cstride, nch, ncols))
            fma = _fma(builder, fvec)
            const = lambda v: ir.Constant(_I64, v)  # noqa: E731
            masks = _column_masks(builder, ncols, n_vec, lanes)
            one, vshift = ir.Constant(fvec, [1.0] * lanes), _splat(builder, shift, fvec)
            xs, lo, hi = [], [], []
            for ch in range(n_ch):  # channels past nch repeat the last one (never stored)
                row = builder.add(xbase, builder.mul(cstride, builder.select(
                    builder.icmp_signed("<", const(ch), nch), const(ch), builder.sub(nch, const(1)))))
                for p in range(n_vec):
                    v = builder.fadd(_masked_load(builder, xp, builder.add(row, const(p * lanes)), fvec,
                                                  masks[p], align), vshift)
                    xs.append(v)
                    lo.append(builder.bitcast(builder.fsub(v, one), ivec))
                    hi.append(builder.bitcast(builder.fadd(v, one), ivec))

            def step(g, key, accs):
                for ch in range(n_ch):
                    e = _splat(builder, key(ch), ivec)
                    for p in range(n_vec):
                        k = ch * n_vec + p
                        c = builder.select(builder.icmp_signed("<", e, lo[k]), lo[k], e)
                        c = builder.select(builder.icmp_signed(">", c, hi[k]), hi[k], c)
                        builder.store(builder.call(fma, [g[p], builder.bitcast(c, fvec), builder.load(accs[k])]),
                                      accs[k])

            accs = _step_loop(builder, n_ch * n_vec, fvec, align, nsteps, (rp, rbase, sp, n_vec),
                              (kp, kbase, n_ch), step)
            total = [_load(builder, mp, const(p * lanes), fvec, align) for p in range(n_vec)]
            for ch in range(n_ch):
                with builder.if_then(builder.icmp_signed("<", const(ch), nch)):
                    row = builder.add(xbase, builder.mul(cstride, const(ch)))
                    for p in range(n_vec):
                        k = ch * n_vec + p
                        v = builder.fsub(builder.load(accs[k]), builder.fmul(xs[k], total[p]))
                        _masked_store(builder, v, gp, builder.add(row, const(p * lanes)), masks[p], align)
            return context.get_dummy_value()

        return sig, codegen

    return _block


def abs_sum_block(n_out, n_vec):
    """The forward's block intrinsic: ``n_out`` filters x ``n_vec`` column vectors of

        acc[o, p] += |x(t, p) - w(t, o)| * one      (y = -acc)

    over the steps t (input channel x kernel row x kernel column): ``x(t, p)`` the vector of
    ``x`` at ``xbase + steps[t] + p * lanes``, ``w(t, o)`` the scalar ``w[wbase + t * n_out + o]``
    broadcast, ``one`` = ``unit[0]`` (1, unknown to LLVM: an FMA by it is the same exactly
    rounded sum as an add, issued on the FMA pipes so that the subtraction has the add pipes
    to itself). Signature ``(x, xbase, steps, w, wbase, unit, nout, ncols, y, ybase, ostride)``:
    filter o's columns go to ``y[ybase + o * ostride:]``, for the first ``nout`` filters and
    ``ncols`` columns (masked stores past them)."""

    @intrinsic
    def _block(typingctx, x, xbase, steps, w, wbase, unit, nout, ncols, y, ybase, ostride):
        sig = types.void(x, xbase, steps, w, wbase, unit, nout, ncols, y, ybase, ostride)

        def codegen(context, builder, signature, args):
            a_x, xbase, a_steps, a_w, wbase, a_unit, nout, ncols, a_y, ybase, ostride = args
            tys = signature.args
            nsteps = cgutils.create_struct_proxy(tys[2])(context, builder, value=a_steps).nitems
            fvec, ivec, lanes, align = _vector_types(context, tys[0].dtype)
            xp, sp = _data(context, builder, tys[0], a_x), _data(context, builder, tys[2], a_steps)
            wp, up = _data(context, builder, tys[3], a_w), _data(context, builder, tys[5], a_unit)
            yp = _data(context, builder, tys[8], a_y)
            xbase, wbase, nout, ncols, ybase, ostride = (builder.sext(v, _I64) if v.type.width < 64 else v
                                                         for v in (xbase, wbase, nout, ncols, ybase, ostride))
            fma = _fma(builder, fvec)
            const = lambda v: ir.Constant(_I64, v)  # noqa: E731
            one = _splat(builder, builder.load(up), fvec)
            magnitude = ir.Constant(ivec, [(1 << (ivec.element.width - 1)) - 1] * lanes)
            def step(xv, weight, accs):
                for o in range(n_out):
                    e = _splat(builder, weight(o), fvec)
                    for p in range(n_vec):
                        d = builder.bitcast(builder.and_(builder.bitcast(builder.fsub(xv[p], e), ivec), magnitude),
                                            fvec)
                        slot = accs[o * n_vec + p]
                        builder.store(builder.call(fma, [d, one, builder.load(slot)]), slot)

            accs = _step_loop(builder, n_out * n_vec, fvec, align, nsteps, (xp, xbase, sp, n_vec),
                              (wp, wbase, n_out), step)
            masks = _column_masks(builder, ncols, n_vec, lanes)
            for o in range(n_out):
                with builder.if_then(builder.icmp_signed("<", const(o), nout)):
                    row = builder.add(ybase, builder.mul(ostride, const(o)))
                    for p in range(n_vec):
                        _masked_store(builder, builder.fneg(builder.load(accs[o * n_vec + p])), yp,
                                      builder.add(row, const(p * lanes)), masks[p], align)
            return context.get_dummy_value()

        return sig, codegen

    return _block


@intrinsic
def prefetch(typingctx, arr, start, count, step):
    """Prefetches ``count`` cache lines of the 1-D array ``arr`` from element ``start``, one
    every ``step`` elements (the hardware prefetchers lose track of dozens of interleaved
    row streams, such as the channel rows of an NCHW image)."""
    sig = types.void(arr, start, count, step)

    def codegen(context, builder, signature, args):
        a_arr, (start, count, step) = args[0], (builder.sext(v, _I64) if v.type.width < 64 else v for v in args[1:])
        base = _data(context, builder, signature.args[0], a_arr)
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
            ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0i8")
        with cgutils.for_range(builder, count) as k:
            ptr = builder.bitcast(builder.gep(base, [builder.add(start, builder.mul(k.index, step))]), i8p)
            builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen
