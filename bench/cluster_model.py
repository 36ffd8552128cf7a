"""The cuda backend's clustered Hopper kernels (csrc/cuda/pointwise_cluster.cuh, and with
``--form wgmma`` pointwise_wgmma.cuh) by a static model, per dense 1x1 layer of a layer table,
against what the table measured; with ``--kgrad POINTWISE.json``, its 1x1 kernel gradient
(pointwise_kgrad.cuh) against a pointwise table's kernel-gradient rows.

    python bench/cluster_model.py [LAYERS.json] [--form fragments|wmma|wgmma] [--out FILE.md]
    python bench/cluster_model.py --kgrad [POINTWISE.json] [--out FILE.md]

LAYERS.json is a forward table of ``bench_layers.py`` (default: the third H200 run's, batch 256,
bfloat16, channels_last); its 1x1 layers are modeled at its batch, forward (rows = Cout, depth
= Cin) and grad_x (rows = Cin, depth = Cout). Its ``fused:triton`` and ``fused:cuda`` columns go
beside the model: run on a table made after this kernel landed, ``fused:cuda`` is this kernel's
forward, measured, and the last column says how far the model was off.

The model, per block (4 examples x 64 rows x 64 pixels, 256 threads, one block an SM at ~190 KB
of shared memory), per step of 32 along the reduction, in SM cycles at 1.78 GHz:

- the mix (between the step's barrier wait and its __syncthreads): the larger of its FMAs
  (8 elements x E experts x 4 examples a thread: 64 E cycles at 128 a cycle) and its shared
  memory (E expert tiles read, 4 mixed tiles written: 4 KB each, 128 bytes a cycle);
- the products: the larger of the tensor cores (4 x 64 x 64 x 32 multiply-adds at 1024 a cycle,
  mma.sync's rate, half of wgmma's) and the fragment loads (each warp its example's A tile, 4
  KB, and its half of the input tile, 2 KB: conflict-free through ldmatrix on the swizzled
  tiles, the kernel's default form; ``--form wmma``: the wmma form's loads of the input tile, 4
  ways bank-conflicted on its 64-byte rows);
- the copies (TMA) overlap both; the two phases do not overlap each other (one block an SM, a
  barrier between them);
- and the step is at least its shared-memory traffic, all of it (the copies' writes, the mix's,
  the fragment loads) at 128 bytes a cycle.

A block adds ``BLOCK_CYCLES`` (its first copies' latency and its epilogue); blocks run in waves
of 132. Traffic bounds beside it: L2 -> SM (each expert tile once a cluster of 4 blocks, every
input tile once a row tile, the outputs) at 5.5 TB/s, HBM (inputs, outputs and experts once)
at 4.2 TB/s (both the H200's, measured). The modeled time is the largest of the three.

``--form wgmma``, the wgmma kernel (4 examples x 128 rows x 64 pixels a block, two warpgroups of
64 rows, stages of E expert tiles of 8 KB and 4 input tiles of 4 KB): a step is the largest of
its mix's FMAs (16 elements x E experts x 4 examples a thread: 128 E cycles), its tensor cores
(4 x 128 x 64 x 32 multiply-adds at wgmma's 2048 a cycle) and its shared memory, all of it at
128 bytes a cycle (the copies' writes; the mix's ldmatrix reads of the E tiles; wgmma's reads of
each input tile by both warpgroups): the mix of one half-step runs while the other's products
do, and no mixed tile goes through shared memory. L2: the experts once a cluster, every input
tile once a tile of 128 rows.

The kernel gradient (``kgrad_model``; a block: 64 output x 32 input channels of every expert's
gradient, a slice of the batch, 256 threads, one block an SM): per step of 64 pixels of an
example, the larger of its tensor cores (64 x 32 x 64 multiply-adds at mma.sync's 1024 a cycle)
and its shared memory (the copies' 12 KB, the fragment loads: grad_out's tile by 2 warps a row,
x's by 4 a column, 32 KB); per example, its fold on the CUDA cores after the steps (8 elements x
E experts x 2 multiply-adds a thread: 32 E cycles). Blocks: tiles x slices (the host's plan),
in waves of 132; plus the slices' and tiles' partial sums through HBM (float32, written and
read once).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

from condconv_kernels.cli import parser as cli_parser

HERE = Path(__file__).resolve().parent
DEFAULT = HERE / "results" / "gpu-h200" / "4c707b7" / "layers-b256-bf16-cl-fwd.json"

CLOCK = 1.78e9
SMS = 132
L2_BYTES_PER_S = 5.5e12
HBM_BYTES_PER_S = 4.2e12
SMEM_BYTES_PER_CYCLE = 128
FMA_PER_CYCLE = 128
MMA_PER_CYCLE = 1024          # mma.sync, 16-bit operands, multiply-adds an SM a cycle
WGMMA_PER_CYCLE = 2048        # wgmma, the same
FORMS = ("fragments", "wmma", "wgmma")
WMMA_CONFLICT = 4             # the wmma form's loads of the input tile (64-byte rows)
BLOCK_CYCLES = 2500           # first copies' latency and the epilogue, a block
ROWS, PIXELS, DEPTH, EXAMPLES, CLUSTER, TILE = 64, 64, 32, 4, 4, 4096


def model(batch: int, rows: int, depth: int, pixels: int, experts: int,
          form: str = "fragments") -> dict:
    """The modeled time (us) of one pass and its terms, for the kernel ``form`` names (FORMS)."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {', '.join(FORMS)}; got {form!r}")
    block_rows = 2 * ROWS if form == "wgmma" else ROWS
    row_tiles = math.ceil(rows / block_rows)
    pixel_tiles = math.ceil(pixels / PIXELS)
    example_blocks = math.ceil(math.ceil(batch / EXAMPLES) / CLUSTER) * CLUSTER
    steps = math.ceil(depth / DEPTH)
    blocks = row_tiles * pixel_tiles * example_blocks
    expert_tile = block_rows * DEPTH * 2
    if form == "wgmma":
        fma = 128 * experts
        tensor = EXAMPLES * block_rows * PIXELS * DEPTH / WGMMA_PER_CYCLE
        shared = ((experts * expert_tile + EXAMPLES * TILE)      # the copies' writes
                  + experts * expert_tile                        # the mix's ldmatrix reads
                  + 2 * EXAMPLES * TILE) / SMEM_BYTES_PER_CYCLE  # wgmma's reads of the inputs
        step = max(fma, tensor, shared)
    else:
        mix = max(64 * experts, (experts + EXAMPLES) * TILE / SMEM_BYTES_PER_CYCLE)
        conflict = WMMA_CONFLICT if form == "wmma" else 1
        fragments = 8 * (TILE + TILE // 2 * conflict) / SMEM_BYTES_PER_CYCLE
        products = max(EXAMPLES * ROWS * PIXELS * DEPTH / MMA_PER_CYCLE, fragments)
        shared = (2 * (experts + EXAMPLES) * TILE / SMEM_BYTES_PER_CYCLE + fragments)
        step = max(mix + products, shared)
    waves = math.ceil(blocks / SMS)
    compute_us = waves * (steps * step + BLOCK_CYCLES) / CLOCK * 1e6
    padded_depth = steps * DEPTH
    clusters = example_blocks // CLUSTER
    l2 = (row_tiles * pixel_tiles * clusters * steps * experts * expert_tile  # experts, multicast
          + row_tiles * batch * pixels * padded_depth * 2                    # inputs, a row tile
          + batch * pixels * rows * 2)                                       # outputs
    hbm = (batch * pixels * (depth + rows) + experts * rows * depth) * 2
    terms = {"compute": compute_us, "L2": l2 / L2_BYTES_PER_S * 1e6,
             "HBM": hbm / HBM_BYTES_PER_S * 1e6}
    bound = max(terms, key=terms.get)
    return {"us": terms[bound], "bound": bound, "blocks": blocks, "waves": waves,
            "steps": steps, "step_cycles": step, "l2_over_hbm": l2 / hbm, **terms}


KGRAD_DEFAULT = HERE / "results" / "gpu-h200" / "4c707b7" / "pointwise.json"
KGRAD_TILE_O, KGRAD_TILE_I, KGRAD_PIXELS = 64, 32, 64


def kgrad_plan(batch: int, tiles: int, sms: int = SMS):
    """(slices, examples a slice, waves): pointwise_kgrad.cuh's plan() where a slice's routing
    weights fit in shared memory beside 2 stages (batches under ~5400 at 8 experts)."""
    best = None
    for slices in range(1, batch + 1):
        per = math.ceil(batch / slices)
        used = math.ceil(batch / per)
        if used > 1 and tiles * used > 2 * sms:
            break
        waves = math.ceil(tiles * used / sms)
        if best is None or waves * per < best[0]:
            best = (waves * per, used, per, waves)
    return best[1:]


KGRAD_FORMS = ("cuda-fold", "tc-fold")
FOLD_GROUP = 16  # the tensor-core fold's examples a group (tc-fold)


def kgrad_model(batch: int, cin: int, cout: int, pixels: int, experts: int,
                form: str = "cuda-fold") -> dict:
    """The modeled time (us) of the 1x1 kernel gradient kernel and its terms: ``cuda-fold``
    the kernel as built, ``tc-fold`` the design of analysis item 57 (G_b by wgmma from the
    staged tiles, rounded to 16 bits into shared memory; both folds as tensor-core products
    over groups of 16 examples)."""
    if form not in KGRAD_FORMS:
        raise ValueError(f"form must be one of {', '.join(KGRAD_FORMS)}; got {form!r}")
    tiles = math.ceil(cout / KGRAD_TILE_O) * math.ceil(cin / KGRAD_TILE_I)
    slices, per, waves = kgrad_plan(batch, tiles)
    steps = math.ceil(pixels / KGRAD_PIXELS)
    go_tile, x_tile = KGRAD_TILE_O * KGRAD_PIXELS * 2, KGRAD_TILE_I * KGRAD_PIXELS * 2
    elements = KGRAD_TILE_O * KGRAD_TILE_I
    if form == "tc-fold":
        # a step: the copies written, then read once by wgmma; an example: G_b (2 bytes an
        # element) written, then read by both folds (mma.sync, A from shared memory), whose
        # products (elements x E x 16 examples, twice, a group) run at mma.sync's rate
        tensor = KGRAD_TILE_O * KGRAD_TILE_I * KGRAD_PIXELS / WGMMA_PER_CYCLE
        shared = 2 * (go_tile + x_tile) / SMEM_BYTES_PER_CYCLE
        fold = max(2 * elements * max(experts, 8) / MMA_PER_CYCLE,
                   3 * elements * 2 / SMEM_BYTES_PER_CYCLE)
    else:
        tensor = KGRAD_TILE_O * KGRAD_TILE_I * KGRAD_PIXELS / MMA_PER_CYCLE
        shared = (go_tile + x_tile + 2 * go_tile + 4 * x_tile) / SMEM_BYTES_PER_CYCLE
        fold = 32 * experts
    example = steps * max(tensor, shared) + fold
    compute_us = waves * (per * example + BLOCK_CYCLES) / CLOCK * 1e6
    partials = 2 * 4 * (slices * experts * cout * cin + tiles * batch * experts)
    inputs = batch * pixels * (cin + cout) * 2
    hbm_us = (partials + inputs) / HBM_BYTES_PER_S * 1e6
    return {"us": compute_us + partials / HBM_BYTES_PER_S * 1e6, "compute": compute_us,
            "hbm": hbm_us, "tiles": tiles, "slices": slices, "waves": waves,
            "example_cycles": example}


def kgrad_floors(batch: int, cin: int, cout: int, pixels: int, experts: int) -> dict:
    """Lower bounds (us) of any fused 1x1 kernel gradient: ``hbm`` (x and grad_out read once),
    ``tensor`` (every example's G_b at wgmma's rate), ``cuda_fold`` (the two folds,
    gw[e] += r[b, e] G_b and <G_b, W_e>, as float32 multiply-adds on the CUDA cores)."""
    sms_per_s = SMS * CLOCK
    return {"hbm": batch * pixels * (cin + cout) * 2 / HBM_BYTES_PER_S * 1e6,
            "tensor": batch * pixels * cin * cout / (WGMMA_PER_CYCLE * sms_per_s) * 1e6,
            "cuda_fold": 2 * experts * cin * cout * batch / (FMA_PER_CYCLE * sms_per_s) * 1e6}


def kgrad_report(table: dict, experts: int = 8) -> str:
    """The kernel gradient's model beside a pointwise table's kernel-gradient rows, with the
    floor of a fold on the CUDA cores and the tensor-core fold's model (``tc-fold``)."""
    batch = table.get("batch", 256)
    lines = [f"1x1 kernel gradient kernel (pointwise_kgrad.cuh) by model (`bench/cluster_model.py "
             f"--kgrad`), batch {batch}, {experts} experts, us; measured: "
             f"{table['machine'].get('gpu', '?')}, commit {table['machine'].get('commit', '?')}",
             "", "| layer | cin -> cout @ pixels | tiles x slices (waves) | cycles an example "
             "a tile | modeled | static, measured | Triton dense, measured | modeled / Triton "
             "| modeled / static | CUDA-core fold, floor | tensor-core fold: cycles an example a "
             "tile | modeled | / static |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for layer in table["layers"]:
        if layer["pass"] != "grad_routing+weight":
            continue
        m = SHAPE.match(layer["shape"])
        cin, cout, h, w = map(int, m.groups())
        k = kgrad_model(batch, cin, cout, h * w, experts)
        t = kgrad_model(batch, cin, cout, h * w, experts, form="tc-fold")
        fold = kgrad_floors(batch, cin, cout, h * w, experts)["cuda_fold"]
        static, dense = layer["device_us"]["static"], layer["device_us"]["dense"]
        lines.append(f"| {layer['layer']} | {cin} -> {cout} @ {h * w} | {k['tiles']} x "
                     f"{k['slices']} ({k['waves']}) | {k['example_cycles']:.0f} | "
                     f"{k['us']:.1f} | {static:.1f} | {dense:.1f} | {k['us'] / dense:.2f} | "
                     f"{k['us'] / static:.2f} | {fold:.1f} | {t['example_cycles']:.0f} | "
                     f"{t['us']:.1f} | {t['us'] / static:.2f} |")
    return "\n".join(lines)


SHAPE = re.compile(r"pw 1x1/s1 (\d+)->(\d+) @(\d+)x(\d+)")


def rows_of(table: dict, experts: int):
    """(layer, cin, cout, pixels, measured ms by column) of every 1x1 layer of the table."""
    for layer in table["layers"]:
        m = SHAPE.match(layer["shape"])
        if m:
            cin, cout, h, w = map(int, m.groups())
            yield layer["name"], cin, cout, h * w, layer["ms"]


def report(table: dict, experts: int = 8, form: str = "fragments") -> str:
    batch = table["batch"]
    title = {"fragments": "ldmatrix and mma.sync", "wmma": "wmma",
             "wgmma": "the wgmma kernel, 128-row blocks"}[form]
    lines = [
        f"Clustered 1x1 kernel ({title}) by model (`bench/cluster_model.py`), batch {batch}, "
        f"{experts} experts, us; measured: {table['machine'].get('gpu', '?')}, commit "
        f"{table['machine'].get('commit', '?')}",
        "",
        "| layer | cin -> cout @ pixels | forward, modeled | bound | blocks (waves) | L2 / HBM "
        "| grad_x, modeled | bound | fused:triton, measured | fused:cuda, measured "
        "| fused:cuda / modeled |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
    ratios, fwd_all, tri_all = [], [], []
    for name, cin, cout, pixels, ms in rows_of(table, experts):
        f = model(batch, cout, cin, pixels, experts, form)
        g = model(batch, cin, cout, pixels, experts, form)
        tri = ms.get("fused:triton", float("nan")) * 1e3
        cud = ms.get("fused:cuda", float("nan")) * 1e3
        ratios.append(cud / f["us"])
        fwd_all.append(f["us"])
        tri_all.append(tri)
        lines.append(f"| {name} | {cin} -> {cout} @ {pixels} | {f['us']:.1f} | {f['bound']} | "
                     f"{f['blocks']} ({f['waves']}) | {f['l2_over_hbm']:.1f} | {g['us']:.1f} | "
                     f"{g['bound']} | {tri:.1f} | {cud:.1f} | {cud / f['us']:.2f} |")

    def geomean(v):
        return math.exp(sum(math.log(x) for x in v) / len(v))
    lines += ["", f"Forward over the {len(fwd_all)} layers: modeled {sum(fwd_all):.0f} us "
              f"against the Triton kernels' measured {sum(tri_all):.0f} us (geomean modeled / "
              f"Triton {geomean([a / b for a, b in zip(fwd_all, tri_all)]):.2f}); "
              f"fused:cuda measured / modeled, geomean {geomean(ratios):.2f}."]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = cli_parser(__doc__)
    parser.add_argument("table", nargs="?", default=None,
                        help="A forward layer table's JSON (bench_layers.py), or with --kgrad a "
                             "pointwise table's (bench_pointwise.py).")
    parser.add_argument("--experts", type=int, default=8,
                        help="The layers' experts (the model's tables have 8).")
    parser.add_argument("--form", choices=FORMS, default="fragments",
                        help="The kernel to model: the clustered kernel through ldmatrix and "
                             "mma.sync (the default), its wmma form (CONDCONV_CUDA_CLUSTER=wmma), "
                             "or the wgmma kernel (CONDCONV_CUDA_CLUSTER=wgmma).")
    parser.add_argument("--kgrad", action="store_true",
                        help="Model the 1x1 kernel gradient kernel (CONDCONV_CUDA_KGRAD=1) "
                             "against a pointwise table instead.")
    parser.add_argument("--out", help="Also write the table to this Markdown file.")
    args = parser.parse_args(argv)
    if args.kgrad:
        table = json.loads(Path(args.table or KGRAD_DEFAULT).read_text())
        text = kgrad_report(table, args.experts)
    else:
        table = json.loads(Path(args.table or DEFAULT).read_text())
        text = report(table, args.experts, args.form)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
