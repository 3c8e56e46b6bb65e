"""The labeling job, top to bottom: model → output → plan → connect → stages → commit → finish.

    the model resolved and its licence checked (``plan``); the output's state checked and made
    ready under its lease (``lifecycle``, ``lease``)
    → enumeration and the to-do lists in the output's scratch space (``plan``)
    → Ray: read + decode (CPU tasks) → Segmenter (one actor per GPU, one model load each, two
      batches in it at once) → encode + write PNGs (CPU tasks) (``stages``)
    → metadata parts committed by the driver (``commit``) → ``_SUCCESS`` (``lifecycle``)
    → the run's :class:`~seglabel.job.summary.Summary`, made once at the end

Ray Data streams blocks between the stages with backpressure, so a slow stage holds the others
back instead of filling memory; the driver holds one part's rows at a time and commits them as
one Parquet file. Ray is wired here and in ``stages`` (the stages' Ray halves); the stages'
work lives in modules of its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ..core.config import EngineConfig, JobConfig, default_dtype
from ..core.errors import ConfigError, SeglabelError
from ..core.redaction import get_logger, redact_url
from ..engine.resolve import ResolvedCheckpoint
from ..outputs.store import OutputStore, RowCounts
from .cluster import connect
from .commit import Committed, commit_rows
from .lease import Lease, hold
from .ledger import AttemptLedger
from .lifecycle import OutputLife
from .plan import Work, absolute_paths, announce, input_refs, plan_work, resolve_model
from .stages import SEGMENT_CALLS, STAGES, DecodeStage, EncodeStage, SegmentStage, TodoReader
from .summary import Summary, stage_cpu

log = get_logger(__name__)

# At most a whole core for a decode or encode task (_task_cpus): at a quarter core each, four
# tasks shared a core and each spent 3x the CPU time per image on the same work (36.7 against
# 11.7 ms an image to encode; bench/README.md, "Plumbing").
TASK_CPUS = 1
# The stand-in model (--stand-in) costs nothing but its actor's host work: a whole core
# reserved for it would sit idle and hide the pipeline's own cost.
STAND_IN_CPUS = 0.25
# Rows per block between the stages (fewer on a small job, never less than a model batch; see
# _block_rows): a decode or an encode task takes one block in one call. Each task pays a fixed
# hand-over of ~0.1 s (Ray Data's executor looks for finished tasks every 0.1 s), which a
# 32-row encode task (0.17 s of work on the 2-core bench machine) could not hide: 128 rows ran
# 1.2-1.5x faster steady there, and the driver spent a third to a half less CPU
# (bench/README.md, "Plumbing").
# Ray Data still hands the Segmenter calls of a model batch; the decode stage cuts its blocks
# at DECODE_HELD_BYTES of pixels, and the encode stage reads its block where it lies.
BLOCK_ROWS = 128
# Start the model only once every Segmenter actor has loaded it (so that the first one does not
# take all the early work), and fail with a clear error when the cluster cannot place them.
ACTOR_START_TIMEOUT_S = 1800
# Ray Data's operator names (a part of them) -> the stages' names in the per-stage CPU report.
CPU_NAMES = {"Repartition": "repartition", **{stage.__name__: stage.work for stage in STAGES}}


def run(config: JobConfig) -> Summary:
    """Run a labeling job as the config says; returns its summary.

    Raises ConfigError, SourceError, CheckpointError or OutputError (one readable line each)
    before any model runs when the settings, input, checkpoint or output are unusable.
    """
    config = absolute_paths(config)
    checkpoint = resolve_model(config)
    refs = input_refs(config)  # a missing input fails here, before anything is written
    announce(checkpoint)
    store = OutputStore(config.output, config.output_storage_options)
    output = OutputLife(store, config, checkpoint)
    output.check()
    with hold(store, config.dry_run) as lease:  # one run at a time on an output
        output.prepare()
        work = plan_work(store, config, refs, resuming=output.resuming)
        if config.dry_run:
            return _summary(config, checkpoint, work)
        try:
            if work.todo == 0:
                totals = output.finish_idle(work.found, work.held_back)
                return _summary(config, checkpoint, work, totals=totals)
            # Every Segmenter loads the commit the driver resolved (a Hub branch may move meanwhile).
            config = config.replace(engine=config.engine.replace(revision=checkpoint.revision))
            started, seen = time.perf_counter(), RowCounts()
            try:
                labeled = _label(config, store, checkpoint, work, output, lease, seen)
            except SeglabelError:
                output.abandon(rows_seen=seen.total)
                raise
            seconds = time.perf_counter() - started
            totals = output.finish(work.todo, labeled.committed.processed, work.held_back,
                                   labeled.committed.actors)
        finally:
            store.remove(work.scratch)
    return _summary(config, checkpoint, work, labeled, seconds, totals)


@dataclass(frozen=True)
class Labeled:
    """What the stages did: the rows committed, and each stage's CPU seconds."""

    committed: Committed
    stage_cpu_s: dict[str, float]


def _summary(config: JobConfig, checkpoint: ResolvedCheckpoint, work: Work, labeled: Labeled | None = None,
             seconds: float = 0.0, totals: dict[str, Any] | None = None) -> Summary:
    """The run's summary, made once it is over."""
    committed = labeled.committed if labeled is not None else Committed()
    return Summary(
        output=redact_url(config.output), task=checkpoint.task, model=config.engine.model,
        found=work.found, already_done=work.already_done, held_back=work.held_back,
        processed=committed.processed, ok=committed.ok, error=committed.error, seconds=seconds,
        dry_run=config.dry_run, actors=committed.actors, totals=totals or {},
        stage_cpu_s=labeled.stage_cpu_s if labeled is not None else {}, license=checkpoint.license,
    )


@dataclass(frozen=True)
class Sizing:
    """How a job is laid out on the cluster: its Segmenter actors and what each asks for, the
    CPUs of one decode or encode task, and the rows of a block between the stages."""

    actors: int
    resources: dict[str, float]
    task_cpus: float
    block_rows: int

    def on_gpu(self, engine: EngineConfig) -> bool:
        return "num_gpus" in self.resources and (engine.device or "cuda").startswith("cuda")


# The job as planned (config, store, checkpoint, work), the output's life, the lease, and the
# counts of rows seen, which the caller reads should the job fail.
def _label(config: JobConfig, store: OutputStore, checkpoint: ResolvedCheckpoint, work: Work,
           output: OutputLife, lease: Lease, seen: RowCounts) -> Labeled:
    """Connect to Ray, record the Segmenters' dtype once their device is known (before any
    image is read), build the pipeline (todo files -> decode -> Segmenters -> encode) and commit
    its rows (counted into ``seen``) while ``lease`` is this run's."""
    import ray
    from ray.data import DataContext

    with connect(config.address) as connection:
        context = DataContext.get_current()
        context.enable_progress_bars = False
        context.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
        sizing = _sizing(config, work.todo, connection.embedded)
        dtype = config.engine.dtype or default_dtype("cuda" if sizing.on_gpu(config.engine) else "cpu")
        output.settle(dtype)
        config = config.replace(engine=config.engine.replace(dtype=dtype))  # every actor the same
        ledger = _start_ledger()
        ds = _dataset(config, store, checkpoint, work, sizing, ledger)
        cpu = time.process_time()
        try:
            rows = ds.iter_batches(batch_size=None, batch_format="pyarrow")
            committed = commit_rows(rows, store, work.run_id, work.todo, config.rows_per_part,
                                    config.max_errors, guard=lease.check, counts=seen)
        except Exception as exc:
            if isinstance(exc, SeglabelError):
                raise
            # A Segmenter that refused its checkpoint (weights that are not the model's) ends
            # the job with its own line, not with Ray's wrapping of it.
            refusal = ray.get(ledger.refusal.remote())
            if refusal is None:
                raise
            raise refusal from None
        return Labeled(committed, {**stage_cpu(ds, CPU_NAMES), "driver": time.process_time() - cpu})


def _start_ledger() -> Any:
    """The attempt ledger (``ledger.py``): no CPU, since it only counts and must not wait for a
    core the stages hold; on the driver's node (a worker node may go); restarted, it starts
    again from zero."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return ray.remote(AttemptLedger).options(
        num_cpus=0, max_restarts=-1, max_task_retries=-1, scheduling_strategy=here
    ).remote()


def _dataset(config: JobConfig, store: OutputStore, checkpoint: ResolvedCheckpoint, work: Work,
             sizing: Sizing, ledger: Any) -> Any:
    """The stages chained as one Ray Dataset: CPU tasks around the Segmenters' actor pool."""
    import ray

    def tasks(ds: Any, stage: Any, batch_size: int) -> Any:
        return ds.map_batches(stage, batch_size=batch_size, batch_format=stage.batch_format,
                              num_cpus=sizing.task_cpus)

    ds = ray.data.from_items([{"path": p} for p in work.todo_paths])
    ds = tasks(ds, TodoReader(store), 1).repartition(target_num_rows_per_block=sizing.block_rows)
    decode = DecodeStage(config.manifest or config.input, config.input_storage_options, config.max_pixels,
                         config.max_bytes, ledger)
    ds = tasks(ds, decode, sizing.block_rows)
    ds = ds.map_batches(
        SegmentStage,
        fn_constructor_kwargs={"engine": config.engine, "checkpoint": checkpoint, "ledger": ledger},
        batch_size=config.engine.batch_size,
        batch_format=SegmentStage.batch_format,
        # A Segmenter that dies (its process, its node) is replaced and its batches retried:
        # Ray Data's actor pools default to max_restarts=-1 and max_task_retries=-1.
        compute=_actor_pool(sizing.actors),
        **sizing.resources,
    )
    encode = EncodeStage(store, checkpoint, redact_url(config.engine.model))
    return tasks(ds, encode, sizing.block_rows)


def _actor_pool(actors: int) -> Any:
    """Ray Data's pool of ``actors`` Segmenters, each running ``SEGMENT_CALLS`` calls at once
    (one at a time on an older Ray whose pool has no such settings)."""
    import inspect

    from ray.data import ActorPoolStrategy

    settings = inspect.signature(ActorPoolStrategy).parameters
    if not {"enable_true_multi_threading", "max_concurrent_calls_per_actor"} <= set(settings):
        log.debug("this Ray runs one call per Segmenter at a time")
        return ActorPoolStrategy(size=actors)
    return ActorPoolStrategy(size=actors, max_concurrent_calls_per_actor=SEGMENT_CALLS,
                             enable_true_multi_threading=True)


def _sizing(config: JobConfig, todo: int, local: bool) -> Sizing:
    """The job's layout on the cluster Ray is connected to."""
    import ray

    actors, resources = _actor_resources(config, local)
    spare = ray.cluster_resources().get("CPU", 0) - actors * resources["num_cpus"]
    return Sizing(actors, resources, _task_cpus(spare), _block_rows(todo, actors, config.engine.batch_size))


def _block_rows(todo: int, actors: int, batch_size: int) -> int:
    """Rows per block: BLOCK_ROWS, fewer when the job has too few images to give every call of
    every Segmenter a block (a block goes to one task or actor call: 30 images in one block would
    leave a second GPU idle), never less than a model batch."""
    share = -(-todo // max(1, actors * SEGMENT_CALLS))
    return max(batch_size, min(BLOCK_ROWS, share))


def _task_cpus(spare: float) -> float:
    """CPUs of one decode or encode task, given the CPUs the Segmenters leave: a whole core at
    most (more tasks, not bigger ones, use more cores), and a third of the spare CPUs, so that
    three tasks of either stage fit at once.

    A decode and an encode task must fit together: Ray Data runs the upstream stage first, and
    otherwise no mask would be encoded before every image was decoded (measured: the first
    Parquet part after 38 s of 55). One size for both lets encode (twice decode's work) run two
    tasks while decode waits: with encode the larger (⅔ of the spare CPUs, decode ⅓), one
    encode task at a time set the pace on 2 cores (3,000 photos in 22.7–23.9 s against
    20.0–21.3 s in alternating runs; bench/README.md, "Plumbing").
    """
    if spare <= 0:  # a one-CPU node whose core a CPU Segmenter holds
        return 0.25
    return min(TASK_CPUS, spare / 3)


def _actor_resources(config: JobConfig, local: bool) -> tuple[int, dict[str, float]]:
    """How many Segmenter actors, and what each asks for: one GPU each, or a CPU fallback.

    On a cluster that has fewer GPUs than asked for, the GPUs are requested from the
    autoscaler and the job waits for them (up to ACTOR_START_TIMEOUT_S); an embedded local
    Ray cannot grow, so there it is an error at once.
    """
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if config.engine.stand_in is not None:  # as many as there would be Segmenters, on no GPU
        return max(1, gpus if config.num_gpus is None else config.num_gpus), {"num_cpus": STAND_IN_CPUS}
    wanted = gpus if config.num_gpus is None else config.num_gpus
    if wanted > gpus:
        if local:
            raise ConfigError(f"--num-gpus {wanted} asks for more GPUs than this machine has ({gpus})")
        from ray.autoscaler.sdk import request_resources

        log.info("the cluster has %d GPUs; asking the autoscaler for %d", gpus, wanted)
        request_resources(bundles=[{"GPU": 1}] * wanted)
    if wanted > 0:
        return wanted, {"num_gpus": 1, "num_cpus": 1}
    log.warning("no GPUs in the Ray cluster: running one Segmenter on the CPU")
    # A whole core, unless that is all there is: the decode and encode tasks need some too.
    cpus = resources.get("CPU", 1)
    return 1, {"num_cpus": 1 if cpus >= 2 else max(0.25, cpus / 2)}


def label(input: str | None = None, output: str | None = None, **settings: Any) -> Summary:
    """Label every image under ``input`` (or listed in ``manifest=``) into ``output``.

    ``settings`` are the job's and engine's settings by name (``model``, ``task``,
    ``batch_size``, ``score_threshold``, ``num_gpus``, ``address``, …), as in a YAML job spec.
    """
    values = dict(settings)
    if input is not None:
        values["input"] = input
    if output is not None:
        values["output"] = output
    return run(JobConfig.from_mapping(values))
