"""The loops of a compiled kernel's machine code (SASS), read without a GPU.

The static report's traffic-and-FLOPs model has no term for what a program does serially per
iteration of its main loop: the instructions each warp issues, the barriers that make every warp
wait for the slowest (a layout conversion through shared memory costs two per round, a
cross-warp reduction one or two), the global loads whose latency nothing overlaps. On the GPU
those set the time of the kernels that walk examples one after another (the kernel gradients:
482-721 us measured on the H200 against 47-118 us modeled). This module disassembles the cubin
with the ``nvdisasm`` Triton ships, finds every loop (a backward branch and the code it jumps
back over) and counts, per iteration:

- ``instructions`` (:func:`hot_loop` adds ``issue_cycles``: instructions x warps / 4 for
  ``warps`` warps on an SM's 4 schedulers, the fewest clocks one program's iteration takes);
- ``barriers``: ``BAR`` (CTA-wide synchronisation);
- ``sync_loads``: ``LDG``, global loads into registers (the copies into shared memory,
  ``LDGSTS`` / ``UTMALDG``, are ``async_copies``);
- ``mma``: tensor-core instructions (``HGMMA``, ``HMMA``); ``shuffles`` (``SHFL``); ``shared``
  (``LDS``, ``LDSM``, ``STS``, ``STSM``);
- ``full_waits``: waits for every asynchronous copy in flight (``DEPBAR.LE SB0, 0x0``) after
  the iteration committed copies of its own (``LDGDEPBAR``): such an iteration waits for the
  loads it issued, nothing overlaps them (the loop is not pipelined);
- ``skipped``: the longest run of the body a forward branch jumps over (a conditional part).

:func:`hot_loop` gives the loop with the most instructions: the per-program main loop (its body
includes an inner loop's body once).
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from typing import Dict, List, Optional

# Opcode (before the first dot) -> the counter it adds to.
CLASSES = {"BAR": "barriers", "LDG": "sync_loads", "LDGSTS": "async_copies",
           "UTMALDG": "async_copies", "UBLKCP": "async_copies", "HGMMA": "mma", "HMMA": "mma",
           "SHFL": "shuffles", "LDS": "shared", "LDSM": "shared", "STS": "shared",
           "STSM": "shared"}
COUNTERS = ("instructions", "barriers", "sync_loads", "async_copies", "mma", "shuffles",
            "shared", "full_waits")
# A wait for every asynchronous copy in flight (cp.async's wait_group 0) after a commit of
# copies (LDGDEPBAR) in the same iteration: the iteration waits for the loads it issued itself,
# nothing overlaps them (a wait before the iteration's commit waits for the previous one's).
_FULL_WAIT = re.compile(r"^DEPBAR\.LE\s+SB0,\s*0x0$")
_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b.*?`?\(?(\.L_x_\d+)\)?")


def tool(name: str) -> str:
    """The path of a CUDA tool Triton ships (ptxas, nvdisasm, ...)."""
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def disassemble(cubin: bytes) -> Optional[str]:
    """The SASS of a cubin (nvdisasm), or None where nvdisasm is missing or fails."""
    nvdisasm = tool("nvdisasm")
    if not os.path.exists(nvdisasm):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        result = subprocess.run([nvdisasm, "-c", path], capture_output=True, text=True)
    return result.stdout if result.returncode == 0 else None


def _opcode(text: str) -> str:
    """The opcode of an instruction's text, without its guard predicate and modifiers."""
    words = text.split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0].split(".")[0] if words else ""


def loops(sass: str) -> List[Dict[str, int]]:
    """Every loop of the SASS, in the order of its backward branches: the instructions from the
    branch's target to the branch, counted as the module's docstring says (``start`` and
    ``end``: their addresses)."""
    instructions, labels, pending = [], {}, []
    for line in sass.splitlines():
        label = _LABEL.match(line)
        if label:
            pending.append(label.group(1))
            continue
        match = _INSTRUCTION.match(line)
        if match:
            address = int(match.group(1), 16)
            for name in pending:
                labels[name] = len(instructions)
            pending = []
            instructions.append((address, match.group(2)))
    found = []
    for i, (address, text) in enumerate(instructions):
        if _opcode(text) != "BRA":
            continue
        target = _BRANCH.search(text)
        start = labels.get(target.group(1)) if target else None
        if start is None or start > i:
            continue
        counts = dict.fromkeys(COUNTERS, 0)
        skipped = 0  # the longest run a forward branch inside the loop jumps over
        committed = False  # copies committed earlier in this iteration
        for n, (_, body) in enumerate(instructions[start:i + 1], start):
            opcode = _opcode(body)
            counts["instructions"] += 1
            kind = CLASSES.get(opcode)
            if kind:
                counts[kind] += 1
            committed = committed or opcode == "LDGDEPBAR"
            if committed and _FULL_WAIT.match(body):
                counts["full_waits"] += 1
            forward = _BRANCH.search(body) if opcode == "BRA" else None
            over = labels.get(forward.group(1)) if forward else None
            if over is not None and n < over <= i:
                skipped = max(skipped, over - n - 1)
        found.append(dict(start=instructions[start][0], end=address, skipped=skipped,
                          **counts))
    return found


def hot_loop(sass: Optional[str], warps: int) -> Dict[str, Optional[int]]:
    """The largest loop's counts (``loop_`` before each name, ``loop_issue_cycles`` for
    ``warps`` warps), ``loop_inner_instructions``: those of the largest loop inside it (0
    where none; its body is counted once in the hot loop's), ``loop_nested``: the instructions
    of every loop inside it, in the order of their starts (a loop's count includes those of
    the loops inside it), and ``loop_skipped``: the most instructions one forward branch
    inside it jumps over (a conditional part of the body, as the kernel gradient's fold of an
    example after its last pixel tile), and ``loop_innermost``: the instructions of every loop
    of the kernel that holds no other, in the order of their starts (the depthwise kernels'
    row loop is the last, whichever loop is the largest); every key None where there is no
    SASS or no loop."""
    keys = (["loop_" + name for name in COUNTERS]
            + ["loop_issue_cycles", "loop_inner_instructions", "loop_nested", "loop_skipped",
               "loop_innermost"])
    found = [loop for loop in loops(sass) if loop["instructions"] > 1] if sass else []
    if not found:
        return dict.fromkeys(keys)
    loop = max(found, key=lambda l: l["instructions"])
    stats = {"loop_" + name: loop[name] for name in COUNTERS}
    stats["loop_issue_cycles"] = -(-loop["instructions"] * warps // 4)
    nested = sorted((l for l in found if l is not loop
                     and loop["start"] <= l["start"] and l["end"] <= loop["end"]),
                    key=lambda l: l["start"])
    stats["loop_inner_instructions"] = max((l["instructions"] for l in nested), default=0)
    stats["loop_nested"] = [l["instructions"] for l in nested]
    stats["loop_skipped"] = loop["skipped"]
    stats["loop_innermost"] = [
        l["instructions"] for l in sorted(found, key=lambda l: l["start"])
        if not any(o is not l and l["start"] <= o["start"] and o["end"] <= l["end"]
                   for o in found)]
    return stats
