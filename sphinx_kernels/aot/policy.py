"""What a specialisation must satisfy to count as launchable, and the justified exemptions.

Rules, per specialisation and target:

* ``compile``: it compiles down to a cubin for the target;
* ``shared``: its shared memory per block is within the target's opt-in limit (232448 B on sm_90,
  166912 B on sm_80): above it the launch fails with "out of resources";
* ``grid``: its grid fits the launch limits (2^31 - 1 programs on axis 0, 65535 on axes 1 and 2);
* ``spills``: it spills no registers when it moves bfloat16 or float16 data (float32 data may spill:
  its configurations are judged by shared memory and compiling alone);
* ``tensor cores``: every dot of 16-bit operands runs on the tensor cores, as ``wgmma`` on sm_90 and
  ``mma.sync`` on sm_80 (sm_90 runs ``mma.sync`` too, at a fraction of ``wgmma``'s rate).

A justified exemption is an :class:`Exemption` in ``EXEMPTIONS`` below, naming the kernel (and
optionally the dtype, the target and constexpr values) and the rule it is excused from, with the
measured reason. Nothing else excuses a violation.
"""
from __future__ import annotations

from dataclasses import dataclass

from sphinx_kernels.aot.compile import Measurement
from sphinx_kernels.aot.record import Launch, Target

RULES = ("compile", "shared", "grid", "spills", "tensor cores")
HALF_DTYPES = ("bfloat16", "float16")
GRID_LIMITS = (2**31 - 1, 65535, 65535)


@dataclass(frozen=True)
class Exemption:
    """A violation accepted for a reason: ``rule`` of ``kernel`` (``<op>.<kernel function>``, as
    ``Launch.name``), in ``dtype``, on ``target`` and at the constexpr values ``where`` (``(name,
    value)`` pairs) when given (else every dtype / target / specialisation)."""

    kernel: str
    rule: str
    reason: str
    dtype: str | None = None
    target: str | None = None
    where: tuple[tuple[str, object], ...] = ()

    def covers(self, launch: Launch, rule: str, target: str) -> bool:
        return (launch.name == self.kernel and rule == self.rule
                and (self.dtype is None or self.dtype in launch.dtypes)
                and (self.target is None or self.target == target)
                and all(launch.constant(name) == value for name, value in self.where))


# The one place exemptions are listed.
EXEMPTIONS: tuple[Exemption, ...] = tuple(
    Exemption(f"varlen_attention._attn_bwd_{kernel}_kernel", "tensor cores", (
        "head dim 256 only: every tiling with 64 query and key rows (wgmma's minimum per warp "
        "group) spills on sm_90 (dK/dV 248-828 B, dQ 68-412 B at 255 registers, 1-2 stages, 8 or "
        "16 warps), so the 32-row blocks that spill nothing take mma.sync for the dots whose "
        "rows are queries"), target="sm_90", where=(("BLOCK_D", 256),))
    for kernel in ("dkdv", "dq"))


@dataclass(frozen=True)
class Violation:
    rule: str
    detail: str                      # the measured numbers against the limit
    excused_by: Exemption | None = None


def violations(launch: Launch, measurement: Measurement, target: Target) -> list[Violation]:
    """Every rule the specialisation breaks on ``target`` (excused ones included, marked)."""
    m = measurement
    found: dict[str, str] = {}
    if m.error is not None:
        found["compile"] = m.error
    else:
        if m.shared > target.shared_per_block:
            found["shared"] = f"{m.shared} B shared memory per block > {target.shared_per_block} B"
        half = [d for d in launch.dtypes if d in HALF_DTYPES]
        if half and m.spills:
            found["spills"] = (f"{m.spill_stores} B spill stores, {m.spill_loads} B spill loads at "
                               f"{m.registers} registers ({', '.join(half)})")
        wanted = "wgmma" if target.arch >= 90 else "mma"
        missed = {kind: n for kind, n in m.dots.items() if kind != wanted}
        if missed:
            found["tensor cores"] = f"{_dots(missed)} of {_dots(m.dots)} 16-bit dots not {wanted}"
    over = [f"axis {axis}: {size} > {limit}" for axis, (size, limit)
            in enumerate(zip(launch.grid, GRID_LIMITS)) if size > limit]
    if over:
        found["grid"] = "grid " + ", ".join(over)
    return [Violation(rule, detail, _exemption(launch, rule, target))
            for rule, detail in found.items()]


def _exemption(launch: Launch, rule: str, target: Target) -> Exemption | None:
    return next((e for e in EXEMPTIONS if e.covers(launch, rule, target.name)), None)


def _dots(counts: dict[str, int]) -> str:
    return " + ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
