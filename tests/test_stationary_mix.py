"""The host side of the experimental dense 1x1 forward and grad_x with the experts stationary and
their mix on the tensor cores (triton/stationary_mix.py), which runs without a GPU: its plan,
which calls it takes, the launch it makes, the kernel's algorithm (the slab's order, the
routing block, the mix products, the mixed tiles' order, the copies' tiles) emulated step by
step from the launch's own arguments against the convolution computed independently, and the
triton backend's use of it (the kernel itself runs only on an sm_90 GPU:
tests/test_gpu.py::test_gpu_stationary_mix; its compile: test_triton_compile.py)."""
from unittest import mock

import pytest
import torch
from conftest import LaunchRecorder

stationary_mix = pytest.importorskip("condconv_kernels.triton.stationary_mix")
pytestmark = pytest.mark.skipif(not stationary_mix.AVAILABLE, reason="this Triton has no Gluon")

CL = torch.channels_last


@pytest.mark.parametrize("experts,k,pixels,fits", [
    (8, 192, 49, True), (8, 192, 64, True), (1, 16, 1, True), (4, 112, 16, True),
    (8, 112, 196, True), (8, 80, 256, True), (8, 208, 49, False), (9, 192, 49, False),
    (8, 112, 257, False), (8, 192, 65, False), (8, 24, 49, False), (0, 16, 49, False)])
def test_plan_scope(experts, k, pixels, fits):
    """A plan for at most 8 experts, K a multiple of 16 whose slab fits (K <= 192 at 64-pixel
    planes; K = 192 with 4 tiles does not) and planes of at most 256 pixels: K / 16 chunks;
    up to 64 pixels one pixel tile of a power of two (at least 16), past that 4 tiles of 64;
    shared memory as the kernel allocates it (the slab, three stages of x tiles, the mixed
    tiles of a chunk, or of every chunk with 4 tiles, and then the output's staging buffer,
    the routing block)."""
    plan = stationary_mix.plan(experts, k, pixels)
    assert (plan is not None) == fits
    if fits:
        n, tiles, nb = plan["BLOCK_N"], plan["TILES"], stationary_mix.NB
        assert plan["NUM_C"] * 16 == k
        assert tiles == (1 if pixels <= 64 else 4)
        assert plan["REG_A"] == (tiles == 1 and stationary_mix.REGISTER_A)
        if tiles == 1:
            assert n >= max(16, pixels) and n & (n - 1) == 0 and n < 2 * max(16, pixels)
        else:
            assert n == 64
        mixed = nb * 64 * 16 * (1 if tiles == 1 else plan["NUM_C"])
        assert plan["shared_bytes"] == 2 * (plan["NUM_C"] * 8 * 64 * 16 + 3 * 16 * nb * n
                                            + mixed + (tiles > 1) * 64 * n + 16 * 2 * nb)
        assert plan["shared_bytes"] <= 226 * 1024
    assert stationary_mix.plan(8, 192, 196) is None  # the slab and every chunk's mixed tiles


def _gl_join(a, b):
    """Gluon's join: a new last dimension of size 2."""
    return torch.stack([a, b], -1)


def _emulate(grid, named, kwargs):
    """What the kernel writes, computed from the launch's own arguments step by step as the
    kernel does it: per program its 64 rows' slab (slot 8h + e of tile j holding column
    2j + h of expert e); the x tiles copied into three stages in the kernel's order (the
    slice's chunks in order, a unit of NB examples with one pixel tile each, or of one example
    with TILES, each copied two chunks ahead into the stage the last chunk used; zeros past
    the slice) and read from stage t % 3 at the slice's t-th chunk; per block of NB examples
    the routing block (slot 8h + e, column 2b + h) in the layer's dtype, per chunk the 8 mix
    products (float32) joined, reshaped and permuted into the NB mixed (64 x 16) tiles as
    _stack8 does, rounded; the products of the mixed tiles with the x tiles (one pixel tile
    an example: each example's tile its own; TILES: the block's mixed tiles made first, then
    each example's TILES pixel tiles against its own); then the mixed bias added and the tiles
    stored."""
    B, K, ROWS, P = named["B"], named["K"], named["ROWS"], named["P"]
    per, n_co = named["PER_PROG"], named["N_CO"]
    E, NUM_C, BN, NB = kwargs["E"], kwargs["NUM_C"], kwargs["BLOCK_N"], kwargs["NB"]
    TILES, S = kwargs["TILES"], kwargs["STAGES"]  # (3 stages)
    EPU, PX = NB // TILES, TILES * BN
    dtype = named["w_ptr"].dtype
    x = named["x_ptr"].as_strided((B, P, K), (named["s_xb"], named["s_xp"], 1))
    w = named["w_ptr"].as_strided((E, ROWS, K), (named["s_we"], named["s_wr"], named["s_wk"]))
    r = named["r_ptr"].as_strided((B, E), (named["s_rb"], named["s_re"]))
    out = named["out_ptr"].as_strided((B, P, ROWS), (named["s_ob"], named["s_op"], 1))
    bm = (named["bm_ptr"].as_strided((B, ROWS), (named["s_bb"], 1)) if kwargs["HAS_BIAS"]
          else None)
    for prog in range(grid[0]):
        i_m, i_s = prog % n_co, prog // n_co
        rows = torch.arange(i_m * 64, i_m * 64 + 64)
        live = rows < ROWS
        slab = torch.zeros(NUM_C * 8, 64, 16, dtype=dtype)
        for j in range(NUM_C * 8):
            for h in range(2):
                slab[j, live, 8 * h:8 * h + E] = w[:, rows[live], 2 * j + h].T
        b_start = i_s * per
        b_end = min(B, b_start + per)
        xs = torch.full((S, 16, NB * BN), float("nan"), dtype=dtype)

        def copy(stage, u):  # _copy_unit: the slice's u-th chunk
            c, first = u % NUM_C, b_start + (u // NUM_C) * EPU
            xs[stage] = 0
            for n0 in range(0, NB * BN, PX):
                b = first + n0 // PX
                if b < b_end:
                    xs[stage, :, n0:n0 + min(P, PX)] = x[b, :min(P, PX), 16 * c:16 * c + 16].T
        copy(0, 0)
        copy(1, 1)
        t = 0

        def products(mixed, t):  # the slice's t-th chunk: copy ahead, then its stage's tiles
            copy((t + 2) % S, t + 2)
            xc = xs[t % S]
            return [mixed[i].double() @ xc[:, i * BN:(i + 1) * BN].double() for i in range(NB)]

        def store(tile, b, p0):
            n = min(BN, P - p0)
            if b < b_end and n > 0:
                tile = tile[live, :n].float()
                if bm is not None:
                    tile = tile + bm[b, rows[live]][:, None]
                out[b, p0:p0 + n, rows[live]] = tile.T.to(out.dtype)
        for blk in range(b_start, b_end, NB):
            rs = torch.zeros(16, 2 * NB, dtype=dtype)
            for b in range(NB):
                if blk + b < b_end:
                    for h in range(2):
                        rs[8 * h:8 * h + E, 2 * b + h] = r[blk + b].to(dtype)
            mixed = []
            for c in range(NUM_C):
                m = [slab[8 * c + q].double() @ rs.double() for q in range(8)]
                tt = _gl_join(_gl_join(_gl_join(m[0], m[1]), _gl_join(m[2], m[3])),
                              _gl_join(_gl_join(m[4], m[5]), _gl_join(m[6], m[7])))
                tt = tt.float().reshape(64, NB, 2, 2, 2, 2).permute(1, 0, 5, 4, 3, 2)
                mixed.append(tt.reshape(NB, 64, 16).to(dtype))
            if TILES == 1:  # each chunk's products right after its mix
                acc = [torch.zeros(64, BN, dtype=torch.float64) for _ in range(NB)]
                for c in range(NUM_C):
                    acc = [a + p for a, p in zip(acc, products(mixed[c], t))]
                    t += 1
                for b in range(NB):
                    store(acc[b], blk + b, 0)
            else:  # each example's pixel tiles against its mixed tiles
                for i in range(NB):
                    if blk + i >= b_end:
                        continue
                    acc = [torch.zeros(64, BN, dtype=torch.float64) for _ in range(TILES)]
                    for c in range(NUM_C):
                        acc = [a + p for a, p in zip(acc, products(
                            [mixed[c][i]] * TILES, t))]
                        t += 1
                    for j in range(TILES):
                        store(acc[j], blk + i, j * BN)


def _run_emulated(inp, routing, weight, bias, transposed, sms=3):
    """run() on CPU tensors, the kernel replaced by _emulate, on a device of ``sms`` SMs (few:
    each program then walks several blocks of examples); the launch recorded."""
    recorder = LaunchRecorder(stationary_mix.pw_mix_kernel, _emulate)
    E, cout, cin = weight.shape[:3]
    rows = cin if transposed else cout
    B, k, H, W = inp.shape
    out = torch.full((B, rows, H, W), float("nan"), dtype=inp.dtype).contiguous(
        memory_format=CL)
    plan = stationary_mix.plan(E, k, H * W)
    props = mock.Mock(multi_processor_count=sms)
    with mock.patch.object(stationary_mix, "pw_mix_kernel", recorder), \
            mock.patch("torch.cuda.get_device_properties", lambda device: props):
        stationary_mix.run(inp, routing, weight, bias, out, plan, transposed=transposed)
    return out, recorder.launches


@pytest.mark.parametrize("sms", [3, 1])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("B,E,cin,cout,side,bias", [
    (5, 3, 48, 80, 7, True),  # 2 row blocks (the second partial), a partial example block
    (9, 8, 32, 64, 4, False),  # 16-pixel tiles, 8 experts, two example blocks and a bit
    (4, 1, 16, 16, 1, True),  # one pixel, one expert, one chunk
    (13, 2, 16, 16, 3, True),  # one chunk (K = 16) an example block, two blocks a program
    (3, 4, 112, 32, 8, False),  # 64 pixels, 7 chunks
    (6, 8, 32, 48, 14, True),  # 196 pixels: four tiles of 64 an example, a bias
    (13, 2, 16, 16, 9, False),  # 81 pixels, one chunk: 4 blocks of the 14x14 form (1 SM)
    (5, 3, 48, 16, 10, False)])  # 100 pixels (two of the four tiles empty), 3 chunks
def test_the_kernels_algorithm_against_the_convolution(B, E, cin, cout, side, bias,
                                                       transposed, sms):
    """The launch's arguments and the kernel's algorithm, emulated (_emulate), against the
    forward (or grad_x, W^T) computed independently in float64 from the same bfloat16 tensors:
    within the rounding of the routing weights and of the mixed kernel to bfloat16; every
    kernel parameter given once, the grid one program per (64 rows, batch slice). On a device
    of 3 SMs and of 1 (each program then walks every block of examples of its rows: the block
    boundaries of both forms)."""
    g = torch.Generator().manual_seed(B * 100 + cin)
    bf = torch.bfloat16
    x = torch.randn(B, cout if transposed else cin, side, side, generator=g).to(bf)
    x = x.contiguous(memory_format=CL)
    routing = torch.rand(B, E, generator=g)
    weight = (torch.randn(E, cout, cin, 1, 1, generator=g) / cin ** 0.5).to(bf)
    b = torch.randn(E, cout, generator=g).to(bf) if bias and not transposed else None
    out, launches = _run_emulated(x, routing, weight, b, transposed, sms)
    (grid, named, kwargs), = launches
    fn = stationary_mix.pw_mix_kernel
    constexprs = {p.name for p in fn.params if p.is_constexpr}
    assert len(named) == len(fn.arg_names) - len(constexprs)
    assert set(kwargs) == constexprs | {"num_warps"}
    assert kwargs["num_warps"] == stationary_mix.WARPS and kwargs["W_T"] == transposed
    rows = cin if transposed else cout
    assert grid == (stationary_mix.programs(B, rows, sms)[2],)
    mixed = torch.einsum("be,eoc->boc", routing.double(), weight.double()[..., 0, 0])
    if transposed:
        mixed = mixed.transpose(1, 2)
    ref = torch.einsum("brk,bkp->brp", mixed, x.double().flatten(2))
    if b is not None:
        ref = ref + (routing.double() @ b.double())[:, :, None]
    got = out.double().flatten(2)
    assert not got.isnan().any()
    # bfloat16: the routing and the mixed kernel each rounded (2^-9 relative), the output too.
    torch.testing.assert_close(got, ref, rtol=0, atol=2 ** -6 * ref.abs().max().item())


def test_fits_takes_only_what_the_kernel_reads():
    """Taken: a 1x1 layer at stride 1 without padding, one group, float16 / bfloat16, the
    reduced tensor channels_last with channels a multiple of 16 (and the rows for grad_x), an
    output channels_last, no per-example scales, within the plan. Refused: each of those
    broken."""
    bf = torch.bfloat16
    x = torch.randn(5, 32, 7, 7, dtype=bf).contiguous(memory_format=CL)
    out = torch.empty(5, 64, 7, 7, dtype=bf).contiguous(memory_format=CL)

    def fits(inp=x, experts=4, rows=64, groups=1, pointwise=True, wide=False,
             transposed=False, out=out, scales=(None,) * 3):
        return stationary_mix.fits(inp, experts, rows, groups, pointwise, wide, transposed,
                                   out, scales)
    assert fits() == stationary_mix.plan(4, 32, 49)
    assert fits(inp=x.half(), out=out.half()) is not None
    assert fits(out=None) is not None
    assert fits(transposed=True, rows=48) is not None
    # One pixel an example, where PyTorch leaves channels_last strides as (C, 1, 1, 1).
    one = torch.randn(3, 32, 1, 1, dtype=bf).contiguous(memory_format=CL)
    assert one.stride() == (32, 1, 1, 1)
    assert fits(inp=one, out=torch.randn(3, 64, 1, 1, dtype=bf).contiguous(
        memory_format=CL)) is not None
    refused = [dict(inp=x.float()), dict(inp=x.contiguous()), dict(out=out.contiguous()),
               dict(groups=2), dict(pointwise=False), dict(wide=True), dict(experts=9),
               dict(transposed=True, rows=40),
               dict(inp=torch.randn(5, 24, 7, 7, dtype=bf).contiguous(memory_format=CL)),
               dict(inp=torch.randn(5, 32, 17, 17, dtype=bf).contiguous(memory_format=CL)),
               dict(inp=torch.randn(5, 256, 7, 7, dtype=bf).contiguous(memory_format=CL)),
               dict(scales=(torch.rand(5, 32), None, None)),
               dict(scales=(None, None, torch.rand(5, 1, 1)))]
    for bad in refused:
        assert fits(**bad) is None, bad
    # Not on a CPU tensor, whatever fits says.
    assert stationary_mix.eligible(x, 4, 64, 1, True, False, out=out) is None


@pytest.mark.parametrize("passes,takes", [({"mix"}, True), ({"mix", "forward", "grad_x"}, True),
                                          ({"forward", "grad_x"}, False), (set(), False)])
def test_backend_takes_the_kernel_where_switched(passes, takes):
    """With the switch's mix pass on and the kernel taking the call (stand-ins here), the triton
    forward and grad_x call it (ahead of the stationary kernel's CUDA-core mix, which is then
    not asked), with W^T for grad_x; off, it is never asked."""
    import condconv_kernels.triton as backend
    from condconv_kernels import _env
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 32, 4, 4, generator=g).contiguous(memory_format=CL)
    routing = torch.rand(3, 2, generator=g)
    weight = torch.randn(2, 48, 32, 1, 1, generator=g)
    plan = {"NUM_C": 2, "BLOCK_N": 16}
    calls, stationary_asked = [], []

    def run(inp, r, w, bias, out, config, transposed=False, launches=None):
        calls.append((inp.shape[1], out.shape[1], config, transposed))
        return out.fill_(7.0)
    with mock.patch.object(stationary_mix, "eligible", lambda *a, **k: plan), \
            mock.patch.object(stationary_mix, "run", run), \
            mock.patch.object(backend.stationary, "eligible",
                              lambda *a, **k: stationary_asked.append(1)), \
            mock.patch.object(_env, "TRITON_STATIONARY", frozenset(passes)):
        out = backend.forward(x, routing, weight, None, (1, 1), (0, 0, 0, 0), (1, 1), 1)
        grad_out = torch.randn(3, 48, 4, 4, generator=g).contiguous(memory_format=CL)
        grads = backend.backward(grad_out, x, routing, weight, None, (1, 1), (0, 0, 0, 0),
                                 (1, 1), 1, (True, False, False, False))
    if takes:
        assert calls == [(32, 48, plan, False), (48, 32, plan, True)]
        assert (out == 7).all() and (grads[0] == 7).all()
        assert not stationary_asked
    else:
        assert calls == []
        assert not (out == 7).all()


def _layouts(ttgir):
    """The TTGIR's linear layouts by name: (register, lane, warp) bases."""
    import ast
    import re
    found = {}
    for m in re.finditer(r"^(#linear\d*) = #ttg\.linear<\{register = (\[.*?\]), lane = "
                         r"(\[.*?\]), warp = (\[.*?\]), block", ttgir, re.M):
        found[m.group(1)] = tuple(ast.literal_eval(g) for g in m.groups()[1:])
    return found


def _lanes_of(layout, shape):
    """For each logical index of a tensor of ``shape`` in ``layout`` (a linear layout's bases),
    its (register, lane, warp) numbers: the layout maps the bits of each to an index, XOR-ed."""
    import itertools
    reg, lane, warp = layout
    where = {}
    for bits in itertools.product(*[range(2)] * (len(reg) + len(lane) + len(warp))):
        idx = [0] * len(shape)
        for bit, base in zip(bits, reg + lane + warp):
            if bit:
                idx = [i ^ b for i, b in zip(idx, base)]
        r = sum(b << i for i, b in enumerate(bits[:len(reg)]))
        l = sum(b << i for i, b in enumerate(bits[len(reg):len(reg) + len(lane)]))
        w = sum(b << i for i, b in enumerate(bits[len(reg) + len(lane):]))
        where[tuple(idx)] = (r, l, w)
    assert len(where) == 2 ** (len(reg) + len(lane) + len(warp)) == torch.Size(shape).numel()
    return where


def _run_ptx(asm, lanes):
    """The inline assembly ``asm`` run on the 32 lanes of a warp at once: ``lanes`` maps each
    operand ($2, $3, ...) to its 32 values; returns every register's 32 values. Knows the
    instructions the butterfly uses (mov of %laneid or a register, and, setp.ne, selp,
    shfl.sync.bfly)."""
    import re
    regs = {name: list(v) for name, v in lanes.items()}
    for line in asm.replace("{", "\n").replace("}", "\n").split(";"):
        line = line.strip()
        if not line or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        a = [x.strip() for x in args.split(",")]

        def val(x, lane):
            return regs[x][lane] if x in regs else int(x)
        if op == "mov.u32" and a[1] == "%laneid":
            regs[a[0]] = list(range(32))
        elif op == "and.b32":
            regs[a[0]] = [val(a[1], i) & val(a[2], i) for i in range(32)]
        elif op == "setp.ne.u32":
            regs[a[0]] = [val(a[1], i) != val(a[2], i) for i in range(32)]
        elif op == "mov.b32":
            regs[a[0]] = list(regs[a[1]])
        elif op == "selp.b32":
            regs[a[0]] = [val(a[1], i) if regs[a[3]][i] else val(a[2], i) for i in range(32)]
        elif op == "shfl.sync.bfly.b32":
            assert a[3:] == ["31", "-1"], line  # the whole warp, no clamp
            regs[a[0]] = [regs[a[1]][i ^ int(a[2])] for i in range(32)]
        else:
            raise AssertionError(f"an instruction the emulation does not know: {line}")
        assert re.fullmatch(r"[\w$%.]+", a[0])
    return regs


def _exchange_emulated(t, layout, asm):
    """The inline assembly ``asm`` with the pair split from t's last axis as its operands $2
    and $3 ($0 and $1 the results, in their places), run warp by warp on the values as the
    compiler's ``layout`` of t places them in lanes and registers."""
    where = _lanes_of(layout, t.shape)
    at = {v: k for k, v in where.items()}
    reg = layout[0]
    split = [i for i, base in enumerate(reg) if base == [0] * (t.dim() - 1) + [1]]
    assert len(split) == 1, "the pair is not in one thread's registers"
    out = t.clone()
    for r in range(2 ** len(reg)):
        if r >> split[0] & 1:
            continue
        for w in range(2 ** len(layout[2])):
            pair = [[at[(r | bit << split[0], lane, w)] for lane in range(32)] for bit in (0, 1)]
            regs = _run_ptx(asm, {"$2": [t[i] for i in pair[0]], "$3": [t[i] for i in pair[1]]})
            for lane in range(32):
                out[pair[0][lane]], out[pair[1][lane]] = regs["$0"][lane], regs["$1"][lane]
    return out


def _interpret_operands(ttgir, layouts, mix):
    """Runs the TTGIR from the chunk's 8 mix products (the values the wait after them
    returns: ``mix``, each (64 rows x 8 columns)) to the A operands of the products that
    take them from registers, op by op: reshapes, transposes, joins, splits, the conversion
    to the dot's layout and the float32 -> dtype rounding as their logical meaning, the
    butterfly shuffles (inline assembly) lane by lane in their operands' layouts. Returns the
    A operands of the chunk's register-A products, in the order they are issued."""
    import re
    lines = ttgir.splitlines()
    wait = next(i for i, l in enumerate(lines) if "ttng.warp_group_dot_wait" in l
                and "tensor<64x8xf32" in l)
    name = re.match(r"\s*(%[\w]+):\d+ =", lines[wait]).group(1)
    values = {f"{name}#{i}": m for i, m in enumerate(mix)}
    operands = []

    def arg(token):
        assert token in values, f"an operand the emulation does not know: {token}"
        return values[token]
    for line in lines[wait + 1:]:
        line = re.sub(r" loc\(.*$", "", line).strip()
        m = re.match(r"(%[\w#]+(?:, %[\w#]+)*|%\w+:\d+) = ([\w.]+) (.*)$", line)
        if not m:
            continue
        outs, op, rest = m.groups()
        if op == "tt.elementwise_inline_asm":  # (the operands after the attributes)
            ins = list(re.search(r"\} (%[\w#]+), (%[\w#]+) : tensor", rest).groups())
        else:
            ins = re.findall(r"%[\w]+(?:#\d+)?", rest.split(" : ")[0])
        if op == "ttng.warp_group_dot" and ins[0] in values:
            operands.append(values[ins[0]])
            if len(operands) == 4:
                return operands
            continue
        if not any(i in values for i in ins):
            continue
        if op == "tt.join":
            values[outs] = torch.stack([arg(ins[0]), arg(ins[1])], -1)
        elif op == "tt.split":
            left, right = outs.split(", ")
            values[left], values[right] = arg(ins[0])[..., 0], arg(ins[0])[..., 1]
        elif op == "tt.reshape":
            shape = re.search(r"-> tensor<([\dx]+)x[a-z]", rest).group(1)
            values[outs] = arg(ins[0]).reshape([int(d) for d in shape.split("x")])
        elif op == "tt.trans":
            order = re.search(r"order = array<i32: ([\d, ]+)>", rest).group(1)
            values[outs] = arg(ins[0]).permute([int(d) for d in order.split(", ")])
        elif op in ("ttg.convert_layout", "arith.truncf"):
            values[outs] = arg(ins[0])
        elif op == "tt.elementwise_inline_asm":
            asm = re.match(r'"(.*?)" \{', rest).group(1).replace("\\0A", "\n")
            parent = re.search(r"#ttg\.slice<\{dim = (\d+), parent = (#linear\d*)\}>", rest)
            assert int(parent.group(1)) == arg(ins[0]).dim()  # split from the last axis
            done = _exchange_emulated(torch.stack([arg(ins[0]), arg(ins[1])], -1),
                                      layouts[parent.group(2)], asm)
            base = outs.split(":")[0]
            values[f"{base}#0"], values[f"{base}#1"] = done[..., 0], done[..., 1]
        else:
            raise AssertionError(f"an op the emulation does not know: {op}")
    raise AssertionError("fewer than 4 products with A from registers")


def test_the_mixed_tiles_reach_the_products_registers_as_compiled():
    """The 7x7 form's mix products into wgmma's A operands in registers (stationary_mix.
    _stack8, _operands), as compiled for sm_90: the TTGIR from the 8 mix accumulators to the
    4 products' A operands run op by op, the two butterfly shuffles lane by lane in the
    layouts the compiler gave their operands (:func:`_interpret_operands`), must give each
    product its example's (64 x 16) mixed tile (column 2q + h of example b is column 2b + h
    of mix product q); and the compiled chunk loop moves them with those 16 shuffles alone
    (no shared-memory stores, no other shuffles: the conversion to wgmma's layout stays
    within each thread's registers)."""
    import json
    import os
    import subprocess
    import sys
    if not stationary_mix.plan(8, 192, 49)["REG_A"]:
        pytest.skip("the kernel takes the mixed tiles from shared memory")
    # compiled in a process of its own (the interpreter the other tests use patches the
    # compiler)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE_7X7], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    compiled = json.loads(result.stdout.splitlines()[-1])
    ttgir = compiled["ttgir"]
    mix = torch.randn(8, 64, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    a = _interpret_operands(ttgir, _layouts(ttgir), list(mix))
    for b in range(4):
        truth = mix[:, :, 2 * b:2 * b + 2].permute(1, 0, 2).reshape(64, 16)  # (row, 2q + h)
        assert torch.equal(a[b], truth), f"example {b}'s mixed tile"
    chunk = compiled["chunk"]
    assert chunk["shuffles"] == 16 and chunk["mma"] == 12
    assert chunk["stores"] == 0, "the mixed tiles went through shared memory"
    assert chunk["register_a"] == 4  # the products' A from registers


# The 7x7 forward compiled for sm_90: its TTGIR and its chunk loop's counts (sass.loops).
_COMPILE_7X7 = r"""
import json, re, torch
from condconv_kernels.triton import sass, stationary_mix
c = stationary_mix.compile_for(8, 192, 49, torch.bfloat16, transposed=False)
code = sass.disassemble(c.asm["cubin"])
loop = sass.hot_loop(code, stationary_mix.WARPS)
chunk = [l for l in sass.loops(code) if l["instructions"] == loop["loop_inner_instructions"]][0]
lines = [m.group(2) for m in map(sass._INSTRUCTION.match, code.splitlines()) if m
         and chunk["start"] <= int(m.group(1), 16) <= chunk["end"]]
chunk = dict(chunk, stores=sum(sass._opcode(t).startswith("STS") for t in lines),
             register_a=sum(bool(re.match(r"HGMMA\.64x64x16\S* R\d+, R\d+,", t)) for t in lines))
print(json.dumps(dict(ttgir=c.asm["ttgir"], chunk=chunk)))
"""
