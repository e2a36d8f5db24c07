"""mokernels benchmarks: `python -m benchmarks [--quick] [--out DIR] [--only FAMILY ...]`.

Plugin interface: a module ``benchmarks/bench_<family>.py`` defines

    def workloads(device: torch.device, quick: bool) -> list[Workload]

where :class:`benchmarks._harness.Workload` names our implementation (``ours``) and its peers
(``impls``: label -> zero-argument callable). The runner discovers the modules, times every impl
(CUDA events + L2 flush on a GPU; ``time.perf_counter`` on CPU, where results describe reference /
emulated paths, not GPU performance), prints a table per family and writes JSON + one PNG per
family. See ``_harness.py``.
"""
from ._harness import Measurement, Workload, discover, time_cpu, time_cuda_events

__all__ = ["Workload", "Measurement", "discover", "time_cuda_events", "time_cpu"]
