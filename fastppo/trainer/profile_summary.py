"""What a ``fastppo profile`` trace says: time per phase, kernels, memory, host syncs, FLOP utilization.

:func:`summarize` reads the Chrome trace that ``torch.profiler`` exports (``trace.json``) and the facts
the run knows besides (:class:`RunFacts`); :func:`markdown` renders the result. All from the trace:

* **phases**: the ``record_function`` ranges of :mod:`fastppo.trainer.phases`. ``host_ms`` is the
  wall time of a phase's ranges (a phase has several ranges per step, e.g. ``update_actor``), its
  ``share`` that of the ``step`` ranges; ``other`` is the step's time outside every named phase
  (metrics, glue), so the shares sum to 1. ``kernel_ms``: on CUDA the time of the kernels (and
  copies) launched inside the phase, on the CPU the self time of the ops run inside it.
* **top kernels**: CUDA kernels / copies by device time, or, on the CPU, ``aten`` ops by self time;
  one marked with ``fastppo`` ran inside a ``fastppo.<op>`` range or inside the backward of one of
  fastppo's autograd functions (named by the range, or by the backward).
* **peak memory** of each phase: the largest ``Total Allocated`` of the profiler's memory events in
  its ranges (CUDA: the caching allocator's allocated bytes; CPU: bytes allocated since profiling
  started, net of frees, so weights allocated before are not in it).
* **host syncs per decode step**, inside ``gen``: CUDA: the runtime's synchronizing calls
  (:data:`SYNC_CALLS`); CPU: host reads of tensor values (``aten::_local_scalar_dense``, behind
  ``.item()`` / ``int()`` / ``bool()``, and ``aten::nonzero``), each a sync on CUDA; divided by the
  decode steps of the Generator.
* **MFU**: :class:`RunFacts`' model FLOPs per phase over the phase's host time, against the matmul
  peak measured in the same run.
"""

from __future__ import annotations

import bisect
import collections
from dataclasses import dataclass, field

from fastppo.trainer.phases import PHASES

SUBPHASES = PHASES[1:]  # every phase but "step", which holds them
DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_CATS = ("cpu_op", "user_annotation", "cuda_runtime", "cuda_driver")
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
              "cuStreamSynchronize", "cuCtxSynchronize", "cuEventSynchronize", "cuMemcpyDtoH_v2")  # fmt: skip
HOST_READS = ("aten::_local_scalar_dense", "aten::nonzero")
BACKWARD = "autograd::engine::evaluate_function: "
TOP = 15
FLOPS_FORMULA = (
    "model FLOPs = 2 N T per no-grad forward (gen: prefill + decode, reward, old_log_prob, ref, values) and "
    "6 N T per trained pass (update_actor, update_critic: forward + backward, once per PPO epoch; 4 N T for the "
    "first when keep_first_forward ran its forward in old_log_prob / values), with N the "
    "model's parameters outside its input embedding (the lm_head counts) and T the non-padding tokens "
    "(prompt + completion) of the rollout; attention's T^2 term is left out. MFU = model FLOPs / (host time "
    "x matmul peak)."
)


@dataclass
class RunFacts:
    """What the run knows besides the trace."""

    device: str
    """"cpu" or "cuda"."""
    steps: int
    """Profiled trainer steps."""
    generated_tokens: int
    """Completion tokens sampled in the profiled steps."""
    prompt_tokens: int
    """Non-padding prompt tokens of the profiled rollouts."""
    decode_steps: int
    """Decode steps of the Generator in the profiled steps."""
    flops: dict = field(default_factory=dict)
    """Model FLOPs per phase over the profiled steps (:data:`FLOPS_FORMULA`)."""
    peak_tflops: float = 0.0
    """The matmul peak measured in the same run, TFLOP/s."""
    peak_name: str = ""
    """Which peak (``matmul_fp32_tflops``, ``matmul_bf16_tflops``)."""
    not_run: dict = field(default_factory=dict)
    """``{phase: why}`` for the phases this configuration has not got."""
    fastppo_backward: frozenset = frozenset()
    """Names of the backward nodes of fastppo's autograd functions (``LinearLogprobsEntropyTorchBackward``)."""
    setup: dict = field(default_factory=dict)
    """What ran (model, device, versions, sizes), copied into the summary."""


def _spans(trace) -> list:
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [e for e in events if e.get("ph") == "X" and "dur" in e and "ts" in e]


class _Windows:
    """Sorted, non-overlapping ``[start, end)`` ranges, each with a label; :meth:`at` finds a time's label."""

    def __init__(self, ranges):
        self.ranges = sorted(ranges)
        self.starts = [r[0] for r in self.ranges]

    def at(self, ts):
        i = bisect.bisect_right(self.starts, ts) - 1
        return self.ranges[i][2] if i >= 0 and ts < self.ranges[i][1] else None


def _host_tree(spans, backward: frozenset):
    """Per host event (by ``id``): its self time (µs) and the fastppo op it ran under (or None),
    from the nesting of the events of each thread."""
    threads = collections.defaultdict(list)
    for e in spans:
        if e.get("cat") in HOST_CATS:
            threads[(e.get("pid"), e.get("tid"))].append(e)
    self_us, tag = {}, {}
    for events in threads.values():
        events.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack = []
        for e in events:
            while stack and stack[-1]["ts"] + stack[-1]["dur"] <= e["ts"]:
                stack.pop()
            parent = stack[-1] if stack else None
            name = e.get("name", "")
            own = None
            if name.startswith("fastppo.") and e.get("cat") == "user_annotation":
                own = name
            elif name.startswith(BACKWARD) and name[len(BACKWARD) :] in backward:
                own = name[len(BACKWARD) :]
            tag[id(e)] = own or (tag[id(parent)] if parent is not None else None)
            self_us[id(e)] = e["dur"]
            if parent is not None:
                self_us[id(parent)] -= e["dur"]
            stack.append(e)
    return self_us, tag


def _kernels(spans, phase_at, self_us, tag, device):
    """``[(name, fastppo tag, phase, µs)]``: device kernels/copies (CUDA) or CPU ops' self time."""
    out = []
    if device == "cuda":
        launches = {
            e["args"]["correlation"]: e
            for e in spans
            if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})
        }
        for d in spans:
            if d.get("cat") not in DEVICE_CATS:
                continue
            host = launches.get(d.get("args", {}).get("correlation"))
            where = phase_at(host["ts"] if host is not None else d["ts"])
            if where is not None:
                out.append((d["name"], tag.get(id(host)) if host is not None else None, where, d["dur"]))
        return out
    for e in spans:
        if e.get("cat") == "cpu_op":
            where = phase_at(e["ts"])
            if where is not None:
                out.append((e["name"], tag[id(e)], where, max(self_us[id(e)], 0.0)))
    return out


def _rows(kernels, total_us):
    acc = collections.defaultdict(lambda: [0.0, 0])
    for name, op, _, us in kernels:
        acc[(name, op)][0] += us
        acc[(name, op)][1] += 1
    rows = sorted(acc.items(), key=lambda kv: -kv[1][0])
    return [
        {"name": n, "fastppo": op, "ms": us / 1e3, "share": us / total_us if total_us else 0.0, "calls": c}
        for (n, op), (us, c) in rows
    ]


def _peak_memory(trace, windows: dict, device: str) -> dict:
    """``{phase: peak MiB}`` from the ``[memory]`` events of the device (None without any)."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    kind = 1 if device == "cuda" else 0
    mem = sorted(
        (e["ts"], e["args"]["Total Allocated"])
        for e in events
        if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == kind
    )
    if not mem:
        return {}
    times = [t for t, _ in mem]
    out = {}
    for name, ranges in windows.items():
        best = None
        for start, end in ranges:
            i, j = bisect.bisect_left(times, start), bisect.bisect_right(times, end)
            values = [v for _, v in mem[max(i - 1, 0) : j]] if j > 0 else []
            if values:
                best = max(values) if best is None else max(best, *values)
        out[name] = None if best is None else best / 2**20
    return out


def summarize(trace, facts: RunFacts) -> dict:
    """The summary (a JSON-able dict) of a profiler ``trace`` (the loaded ``trace.json``) and ``facts``."""
    spans = _spans(trace)
    windows = {p: [] for p in PHASES}
    for e in spans:
        if e.get("cat") == "user_annotation" and e.get("name") in windows:
            windows[e["name"]].append((e["ts"], e["ts"] + e["dur"]))
    steps = _Windows([(a, b, "step") for a, b in windows["step"]])
    inner = _Windows([(a, b, p) for p in SUBPHASES for a, b in windows[p]])

    def phase_at(ts):
        return (inner.at(ts) or "other") if steps.at(ts) else None

    self_us, tag = _host_tree(spans, facts.fastppo_backward)
    kernels = _kernels(spans, phase_at, self_us, tag, facts.device)
    total_us = sum(k[3] for k in kernels)
    by_phase = collections.Counter()
    for _, _, where, us in kernels:
        by_phase[where] += us
    peaks = _peak_memory(trace, windows, facts.device)

    host_us = {p: sum(b - a for a, b in windows[p]) for p in PHASES}
    step_us = host_us["step"]
    n = max(facts.steps, 1)
    phases = {}
    for p in PHASES:
        if not windows[p]:
            phases[p] = {"ran": False, "note": facts.not_run.get(p, "did not run in the profiled steps")}
            continue
        flops = facts.flops.get(p)
        seconds = host_us[p] / 1e6
        tflops = flops / seconds / 1e12 if flops and seconds > 0 else None
        phases[p] = {
            "ran": True,
            "ranges": len(windows[p]),
            "host_ms": host_us[p] / 1e3,
            "ms_per_step": host_us[p] / 1e3 / n,
            "share": host_us[p] / step_us if step_us else 0.0,
            "kernel_ms": by_phase.get(p, 0.0) / 1e3 if p != "step" else total_us / 1e3,
            "peak_mem_mib": peaks.get(p),
            "tflops": tflops,
            "mfu": tflops / facts.peak_tflops if tflops and facts.peak_tflops else None,
        }
    other_us = step_us - sum(host_us[p] for p in SUBPHASES)
    other = {
        "host_ms": other_us / 1e3,
        "ms_per_step": other_us / 1e3 / n,
        "share": other_us / step_us if step_us else 0.0,
        "kernel_ms": by_phase.get("other", 0.0) / 1e3,
    }

    ops = collections.Counter()
    for _, op, _, us in kernels:
        if op is not None:
            ops[op] += us
    rows = _rows(kernels, total_us)
    gen = _Windows([(a, b, "gen") for a, b in windows["gen"]])
    if facts.device == "cuda":
        calls = [e for e in spans if e.get("cat") in ("cuda_runtime", "cuda_driver") and e["name"] in SYNC_CALLS]
        what = f"CUDA runtime calls that block the host ({', '.join(SYNC_CALLS[:4])}, ...) inside gen"
    else:
        calls = [e for e in spans if e.get("cat") == "cpu_op" and e["name"] in HOST_READS]
        what = (
            "CPU run: host reads of tensor values inside gen (aten::_local_scalar_dense, behind .item()/int()/bool(), "
            "and aten::nonzero), each of which synchronizes on CUDA; a CPU has no device to wait for"
        )
    syncs = sum(1 for e in calls if gen.at(e["ts"]))
    total_flops = sum(facts.flops.values())
    achieved = total_flops / (step_us / 1e6) / 1e12 if step_us else None
    return {
        "setup": facts.setup,
        "device": facts.device,
        "profiled_steps": facts.steps,
        "step_ms": step_us / 1e3 / n,
        "phases": phases,
        "other": other,
        "tokens": {
            "generated": facts.generated_tokens,
            "prompt": facts.prompt_tokens,
            "per_s": facts.generated_tokens / (step_us / 1e6) if step_us else None,
            "gen_per_s": facts.generated_tokens / (host_us["gen"] / 1e6) if host_us["gen"] else None,
        },
        "kernel_time": "CUDA kernels and copies, device time" if facts.device == "cuda" else "CPU ops, self time",
        "kernel_ms": total_us / 1e3,
        "top_kernels": rows[:TOP],
        "top_fastppo_kernels": [r for r in rows if r["fastppo"]][:TOP],
        "fastppo_share": sum(ops.values()) / total_us if total_us else 0.0,
        "fastppo_ops": {op: {"ms": us / 1e3, "share": us / total_us} for op, us in ops.most_common()},
        "host_syncs": {
            "per_decode_step": syncs / facts.decode_steps if facts.decode_steps else None,
            "count": syncs,
            "decode_steps": facts.decode_steps,
            "what": what,
        },
        "mfu": {
            "model_tflop": total_flops / 1e12,
            "achieved_tflops": achieved,
            "peak_tflops": facts.peak_tflops,
            "peak": facts.peak_name,
            "mfu": achieved / facts.peak_tflops if achieved and facts.peak_tflops else None,
            "formula": FLOPS_FORMULA,
        },
    }


def _num(x, fmt="{:.1f}", none="-"):
    return none if x is None else fmt.format(x)


def _kernel_rows(rows) -> list:
    out = []
    for i, r in enumerate(rows, 1):
        name = r["name"] if len(r["name"]) <= 90 else r["name"][:87] + "..."
        out.append(f"| {i} | `{name}` | {r['fastppo'] or ''} | {r['ms']:.1f} | {r['share']:.1%} | {r['calls']} |")
    return out


def markdown(s: dict) -> str:
    """``summary.md``: the summary of :func:`summarize` as tables."""
    setup = s["setup"]
    lines = [
        "# fastppo profile",
        "",
        f"{setup.get('what', '')}. Device: {setup.get('device_name', s['device'])}; torch {setup.get('torch', '?')}"
        f"{'; CPU threads ' + str(setup['threads']) if 'threads' in setup else ''}. {s['profiled_steps']} profiled "
        f"step(s) after {setup.get('warmup_steps', 1)} unprofiled warm-up step; times are under the profiler "
        "(its cost per op is large next to a tiny model's ops on a CPU).",
        "",
        f"Mean step: {s['step_ms']:.1f} ms. Completion tokens: {s['tokens']['generated']} "
        f"({_num(s['tokens']['per_s'])} tokens/s over the steps, {_num(s['tokens']['gen_per_s'])} tokens/s in gen).",
        "",
        "## Phases",
        "",
        f"Kernel time: {s['kernel_time']}. Peak memory: largest allocated in the phase"
        + (
            " (CUDA caching allocator)."
            if s["device"] == "cuda"
            else " (CPU: above what was allocated before profiling)."
        ),
        "",
        "| phase | ms/step | share of step | kernel ms/step | peak mem MiB | TFLOP/s | MFU |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    n = max(s["profiled_steps"], 1)
    for name, p in s["phases"].items():
        if not p["ran"]:
            lines.append(f"| {name} | - | - | - | - | - | did not run: {p['note']} |")
            continue
        lines.append(
            f"| {name} | {p['ms_per_step']:.1f} | {p['share']:.1%} | {p['kernel_ms'] / n:.1f} | "
            f"{_num(p['peak_mem_mib'])} | {_num(p['tflops'], '{:.3g}')} | {_num(p['mfu'], '{:.2%}')} |"
        )
    o = s["other"]
    lines.append(f"| (other) | {o['ms_per_step']:.1f} | {o['share']:.1%} | {o['kernel_ms'] / n:.1f} | | | |")
    lines += [
        "",
        f"## Top kernels ({s['kernel_time']})",
        "",
        f"fastppo's ops: {s['fastppo_share']:.1%} of the kernel time"
        + "".join(f"; {op} {v['share']:.1%}" for op, v in list(s["fastppo_ops"].items())[:6])
        + ".",
        "",
        "| # | kernel | fastppo | ms | share | calls |",
        "|---:|---|---|---:|---:|---:|",
    ]
    lines += _kernel_rows(s["top_kernels"])
    if s["top_fastppo_kernels"]:
        lines += [
            "",
            "fastppo's own, by time:",
            "",
            "| # | kernel | fastppo | ms | share | calls |",
            "|---:|---|---|---:|---:|---:|",
        ]
        lines += _kernel_rows(s["top_fastppo_kernels"][:5])
    h, m = s["host_syncs"], s["mfu"]
    lines += [
        "",
        "## Host syncs in generation",
        "",
        f"{_num(h['per_decode_step'], '{:.2f}')} per decode step ({h['count']} over {h['decode_steps']} decode steps): "
        f"{h['what']}.",
        "",
        "## Model FLOP utilization",
        "",
        f"{m['model_tflop']:.4g} TFLOP in the profiled steps, {_num(m['achieved_tflops'], '{:.3g}')} TFLOP/s; "
        f"peak {m['peak']} {m['peak_tflops']:.3g} TFLOP/s (measured in this run): MFU {_num(m['mfu'], '{:.2%}')}.",
        "",
        m["formula"],
        "",
    ]
    return "\n".join(lines)
