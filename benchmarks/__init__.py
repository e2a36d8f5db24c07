"""mokernels benchmarks: `python -m benchmarks [--quick] [--out DIR] [--only FAMILY ...]`.

Plugin interface: a module ``benchmarks/bench_<family>.py`` (discovered automatically) defines

    def workloads(device: torch.device, quick: bool) -> list[Workload]

where :class:`benchmarks._harness.Workload` names our implementation (``ours``) and its peers
(``impls``: label -> zero-argument callable that runs the whole operation once), e.g.::

    from ._harness import Workload

    def workloads(device, quick):
        x = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
        return [Workload(family="my_op", name="T=4096 bf16",
                         impls={"mokernels": lambda: my_op(x), "torch": lambda: my_op_reference(x)},
                         ours="mokernels", bytes_moved=2 * x.numel() * x.element_size(),
                         params={"T": 4096, "dtype": "bf16"})]

Build the inputs in ``workloads()`` (or lazily on the first call, which is an untimed warm-up
call), never inside the timed callable. Return only what runs on ``device`` (on CPU: the
reference/emulated paths; an impl whose label contains ``(logic only)`` is shown but gets no speed
ratio). The runner times every impl (CUDA events + L2 flush on a GPU; ``time.perf_counter`` on
CPU, where results describe reference / emulated paths, not GPU performance), prints a table per
family and writes ``bench_results.json`` + ``bench_<family>.png`` under ``--out``. An impl that
raises is reported as an error (exit status 1) without stopping the run. See ``_harness.py``.
"""
from ._harness import Measurement, Workload, discover, time_cpu, time_cuda_events

__all__ = ["Workload", "Measurement", "discover", "time_cuda_events", "time_cpu"]
