"""Sweeps: a YAML grid of runs, each run in its own process, recorded in a SQLite store.

A sweep file::

    name: my-study                 # optional: shown in the report
    calibration: my-study.json     # optional: measured run times per row (`peftlab sweep --calibrate`), used by
                                   #   the estimates while the sweep folder has no calibration.json of its own
    base:                          # RunConfig fields shared by every run
      model: smollm2-135m
      train_subset: 64
    grid:                          # axes; the runs are the cartesian product of the axes, in this order
      task: [clm]                  # a plain axis: a config field and a list of values
      shape:                       # a coupled axis: any other name and a list of mappings; each mapping sets
        - {id: full, method: full} #   several fields together (an optional `id` names it in the run ids)
        - {method: lora, r: 8, alpha: 16}
      seed: [1, 2]

expands to ``clm-full-seed1``, ``clm-full-seed2``, ``clm-lora-r8-a16-seed1``, ... Instead of ``grid:`` a file may
give ``grids:``, a list of parts ``{id, base, grid}``: the runs are the union of each part's runs, a part's ``base``
is merged over the top-level one, and its ``id`` starts its run ids (YAML anchors share a list between parts).

Method fields (r, alpha, dropout, target_modules...) set in a ``base`` apply only to runs whose method takes them,
so ``full`` runs can share a base with LoRA runs; set in the grid, they must apply. The sweep owns ``output_dir``
(``DIR/runs/<id>``), ``overwrite`` and ``resume``.

Every run is expanded and validated before anything starts. Re-running a sweep skips done runs, redoes runs that
were queued or interrupted, and redoes failed runs only with ``retry_failed`` (a failure is usually the same on the
next try: fix the cause, then pass ``--retry-failed``). A store written by a different sweep definition is refused.

A run may also set ``processes: N`` (a base field or an axis: ``peftlab train --processes N``, taking N slots), and
the file may give a ``slurm:`` block (``partition``, ``time`` in minutes, ``gpus_per_task``, ``cpus_per_task``,
``array_parallelism``, ``cluster``) for ``--executor slurm``.

The package: :mod:`~peftlab.sweep.spec` (the file -> validated runs), :mod:`~peftlab.sweep.store` (the SQLite
store), :mod:`~peftlab.sweep.runner` (the driver: running, the ``--dry-run`` preview, estimates, progress),
:mod:`~peftlab.sweep.jobs` (one run as a job a worker starts), :mod:`~peftlab.sweep.executor` (where runs start:
``local``, ``ray``, ``slurm``) and :mod:`~peftlab.sweep.calibrate` (``--calibrate``: one short run per row,
projected to the full runs).
"""

from peftlab.sweep.runner import (
    ProgressBar,
    SweepOutcome,
    SweepPreview,
    format_preview,
    format_progress,
    preview_sweep,
    run_sweep,
)
from peftlab.sweep.spec import SweepRun, SweepSpec, load_sweep
from peftlab.sweep.store import SweepStore

__all__ = ["ProgressBar", "SweepOutcome", "SweepPreview", "SweepRun", "SweepSpec", "SweepStore", "format_preview",
           "format_progress", "load_sweep", "preview_sweep", "run_sweep"]
