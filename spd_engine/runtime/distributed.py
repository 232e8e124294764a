"""Distributed SPD on torch.distributed: one rank per pipeline stage (gloo on CPU, NCCL on GPU).

    torchrun --standalone --nproc-per-node 5 -m spd_engine generate --distributed --mode spd --stages 4 ...

The layout follows from the world size W for n stages:

* W = n + 1, dedicated: rank 0 is the controller (PDM, embedding, final norm, LM head, verification and the
  accept/flush decision); rank s runs stage s.
* W = n, hosted: rank 0 also runs stage 1; rank s runs stage s + 1.

Rank 0 drives an ordinary :class:`~spd_engine.spd.SPDState` with other stage executors
(:mod:`spd_engine.runtime.executor`): a :class:`RemoteStage` for each stage on another rank (and a
``LocalStage`` for a hosted stage 1), and :class:`DistributedLanes`. Draft, verify and resolve (positions,
predicated accept/flush, sampling) are the single-process code; only where the stages run differs. Every
rank holds only its own weights and KV cache, and runs its stage with a ``LocalStage``. One cycle:

1. rank 0 broadcasts the control message [CYCLE, cut, fill], the previous resolve's outcome. Each stage rank
   rolls its own cache back to ``cut`` (O(1); ``cut`` = capacity means no flush) and is active when
   ``fill`` exceeds its depth, exactly like the stages of a single-process cycle.
2. stage 1 receives the newest token's embedding; every later stage receives the previous cycle's output of
   the stage before it (that token is now one stage deeper).
3. the PDM drafts on rank 0 while the stages run (rank 0 has only posted its receives).
4. each stage sends its anchor snapshots to rank 0, and stage n its output; rank 0 joins those receives,
   then verifies and resolves.

Prefill is pipelined the same way ([PREFILL, prompt length, capacity]: the prompt's hidden states go rank to
rank, anchors to rank 0), and [STOP] ends the stage ranks' loop.

Faults: every wait is bounded by ``--dist-timeout``. A dead peer closes its connections at once and a stalled
one times out; either way each surviving rank prints one line and exits 1, and a watchdog ends any wait that
outlives the timeout anyway, so a run never hangs. The configuration is agreed before any work starts: rank
0 checks the launch, the prompt and the PDM, every rank its own model, and all ranks refuse together.
"""
from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .. import ops
from ..config import ModelConfig
from ..decode import cache_capacity
from ..engine import Engine, pick_device, pick_dtype
from ..errors import UserError
from ..model import Model
from ..pdm import PDM, target_identity
from ..modes.base import run_decoder
from ..modes.spd import SPDStats
from ..sampling import SamplingParams
from ..spd import SPDState, resolve_pdm, stage_anchor_layers
from .executor import Lanes, LocalStage, StageExecutor
from ..stages import partition_layers
from ..tokenizer import StreamDecoder, Tokenizer
from ..weights import resolve_model_path

CONTROLLER = 0
EXIT_PIPELINE_BROKEN = 1
DEFAULT_TIMEOUT_S = 60.0
PREFILL, CYCLE, STOP = 0, 1, 2  # control commands
TAG_HIDDEN, TAG_ANCHORS, TAG_OUTPUT = 1, 2, 3  # down the pipeline | anchors to rank 0 | stage n's output


def add_arguments(parser) -> None:
    """The ``generate`` options that only the distributed runtime reads."""
    parser.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                        help="with --distributed: a rank that waits this long on another exits with an error "
                             f"(default {DEFAULT_TIMEOUT_S:g})")


class PipelineBroken(RuntimeError):
    """Another rank died or stalled, so this one cannot go on."""


@dataclass(frozen=True)
class Layout:
    """Which rank runs which stage (stages are 0-based here: stage i runs the in-flight token at depth i)."""
    stages: int
    world_size: int

    @classmethod
    def for_launch(cls, stages: int, world_size: int) -> "Layout":
        if world_size not in (stages, stages + 1):
            raise UserError(f"{stages} stages run on {stages + 1} ranks (rank 0 only controls) or {stages} "
                            f"(rank 0 also runs stage 1), but {world_size} were launched; "
                            f"use torchrun --nproc-per-node {stages + 1}")
        return cls(stages, world_size)

    @property
    def hosted(self) -> bool:
        return self.world_size == self.stages

    @property
    def first_remote(self) -> int:
        """The first stage that does not run on rank 0 (== stages when all run there)."""
        return 1 if self.hosted else 0

    def rank_of(self, stage: int) -> int:
        return stage if self.hosted else stage + 1

    def stage_of(self, rank: int) -> int:
        return rank if self.hosted else rank - 1

    def source_of(self, stage: int) -> int:
        """Where a stage's input comes from: rank 0 embeds the newest token for stage 1."""
        return CONTROLLER if stage == 0 else self.rank_of(stage - 1)

    @property
    def name(self) -> str:
        return "hosted" if self.hosted else "dedicated"


class Watchdog:
    """Ends the process when one wait on other ranks outlives the timeout by a grace period.

    torch.distributed raises first in every case seen (a dead peer at once, a silent one at the timeout);
    this covers waits its timeout may not reach, such as a backend that ignores it, so a rank never hangs.
    """
    GRACE_S = 5.0

    def __init__(self, rank: int, timeout_s: float):
        self.rank, self.limit = rank, timeout_s + self.GRACE_S
        self._since: float | None = None
        self._what = ""
        threading.Thread(target=self._watch, name="spd-engine-watchdog", daemon=True).start()

    @contextmanager
    def waiting(self, what: str):
        self._what, self._since = what, time.monotonic()
        try:
            yield
        finally:
            self._since = None

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.limit / 10))
            since = self._since
            if since is not None and time.monotonic() - since > self.limit:
                print(f"spd-engine: error: rank {self.rank}: no progress for {self.limit:g}s while {self._what}; "
                      f"another rank died or stalled", file=sys.stderr, flush=True)
                os._exit(EXIT_PIPELINE_BROKEN)


def _reason(exc: BaseException) -> str:
    """gloo and NCCL messages open with a source location and run on for lines; keep the cause."""
    lines = str(exc).strip().splitlines()
    first = re.sub(r"^\[[^\]]*\]\s*", "", lines[0]) if lines else type(exc).__name__
    return first.split(". ")[0]


class Peer:
    """This process's place in torchrun's process group: rank, world size, device, and waits on the other ranks
    that are bounded by the timeout and watched; a lost or silent peer becomes :class:`PipelineBroken`."""

    def __init__(self, rank: int, world_size: int, device: torch.device, timeout_s: float):
        self.rank, self.world_size, self.device = rank, world_size, device
        self.watchdog = Watchdog(rank, timeout_s)

    @contextmanager
    def waiting(self, what: str):
        with self.watchdog.waiting(what):
            try:
                yield
            except RuntimeError as exc:  # gloo and NCCL report a lost or silent peer as RuntimeError
                raise PipelineBroken(f"rank {self.rank}: {what} failed: {_reason(exc)}; "
                                     f"another rank died or stalled") from exc


class Links:
    """This rank's traffic: the control broadcast and point-to-point tensors, every wait bounded and watched."""

    def __init__(self, peer: Peer):
        self.rank, self.waiting = peer.rank, peer.waiting
        self.control = torch.zeros(3, dtype=torch.long, device=peer.device)
        self._sends: list = []  # (work, tensor): the tensor must stay alive until the send completes
        self._receives: list = []  # (work, what): posted receives, completed by finish_receives

    def send(self, tensor: torch.Tensor, dst: int, tag: int, what: str) -> None:
        with self.waiting(what):
            self._sends.append((dist.isend(tensor, dst, tag=tag), tensor))

    def recv(self, tensor: torch.Tensor, src: int, tag: int, what: str) -> torch.Tensor:
        with self.waiting(what):
            dist.recv(tensor, src, tag=tag)
        return tensor

    def post_recv(self, tensor: torch.Tensor, src: int, tag: int, what: str) -> torch.Tensor:
        """Start receiving into ``tensor``; it holds the data once :meth:`finish_receives` returns."""
        with self.waiting(what):
            self._receives.append((dist.irecv(tensor, src, tag=tag), what))
        return tensor

    def finish_receives(self) -> None:
        for work, what in self._receives:
            with self.waiting(what):
                work.wait()
        self._receives.clear()

    def settle(self) -> None:
        """Wait for this rank's earlier sends; by the next command their receivers have taken them."""
        with self.waiting("finishing earlier sends"):
            for work, _ in self._sends:
                work.wait()
        self._sends.clear()

    def broadcast_control(self, command: int, first=0, second=0) -> None:
        """Rank 0: one small message to every rank (ints or (1,) device tensors, never read on the host)."""
        for index, value in enumerate((command, first, second)):
            self.control[index] = value
        with self.waiting("broadcasting the next command"):
            dist.broadcast(self.control, src=CONTROLLER)

    def receive_control(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        """Stage ranks: (command, first, second); the operands stay (1,) device tensors."""
        with self.waiting("waiting for rank 0's next command"):
            dist.broadcast(self.control, src=CONTROLLER)
            command = int(self.control[0])  # on a GPU this host read is where the wait really happens
        return command, self.control[1:2], self.control[2:3]


class RemoteStage(StageExecutor):
    """Rank 0's executor for a stage that runs on another rank.

    Hidden states travel rank to rank down the pipeline, so rank 0 sends only the first remote stage's input
    (and, with it, the control message that starts every stage rank), and receives each remote stage's
    anchors and the last stage's output. ``step`` only posts those receives; :class:`DistributedLanes` joins
    them. The output of a stage before the last stays on the ranks: ``out`` is then a placeholder.
    """

    def __init__(self, target: Model, stage: int, layout: Layout, links: Links, anchor_count: int, capacity: int):
        self.stage, self.layout, self.links, self.capacity = stage, layout, links, capacity
        self.first = stage == layout.first_remote
        self.last = stage == layout.stages - 1
        self.rank = layout.rank_of(stage)
        self.name = f"stage {stage + 1} (rank {self.rank})"
        hidden_size = target.config.hidden_size
        self.out = torch.zeros(1, 1, hidden_size, dtype=target.dtype, device=target.device)
        self.anchors = torch.zeros(1, anchor_count, hidden_size, dtype=target.dtype, device=target.device)

    def _receive(self, anchors: torch.Tensor, wait: bool) -> tuple[torch.Tensor, torch.Tensor]:
        receive = self.links.recv if wait else self.links.post_recv
        if anchors.shape[1]:
            receive(anchors, self.rank, TAG_ANCHORS, f"receiving anchors from {self.name}")
        if self.last:
            receive(self.out, self.rank, TAG_OUTPUT, f"receiving the output of {self.name}")
        return self.out, anchors

    def prefill(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.first:
            self.links.broadcast_control(PREFILL, hidden.shape[1], self.capacity)
            self.links.send(hidden, self.rank, TAG_HIDDEN, "sending the prompt down the pipeline")
        anchors = torch.zeros(hidden.shape[1], *self.anchors.shape[1:], dtype=hidden.dtype, device=hidden.device)
        out, anchors = self._receive(anchors, wait=True)
        return (out if self.last else hidden), anchors

    def step(self, stage_in: torch.Tensor, fill: torch.Tensor, cut: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.first:
            self.links.settle()
            self.links.broadcast_control(CYCLE, cut, fill)
            # A copy: resolve overwrites stage_in before this send is known to be complete.
            self.links.send(stage_in.clone(), self.rank, TAG_HIDDEN, f"sending the next input to {self.name}")
        return self._receive(self.anchors, wait=False)


class DistributedLanes(Lanes):
    """Rank 0's lanes: local pieces run at once; remote stages' results arrive by the join."""

    def __init__(self, links: Links):
        self.links = links

    def join(self) -> None:
        self.links.finish_receives()


def serve_stage(target: Model, layout: Layout, stage: int, bounds: tuple[int, int], anchor_layers,
                links: Links) -> None:
    """A stage rank's loop: follow rank 0's commands until STOP."""
    hidden_size = target.config.hidden_size
    last = stage == layout.stages - 1
    me = f"stage {stage + 1}"
    source, after = layout.source_of(stage), (CONTROLLER if last else layout.rank_of(stage + 1))

    def empty(rows: int) -> torch.Tensor:
        return torch.empty(1, rows, hidden_size, dtype=target.dtype, device=target.device)

    def send_results(out: torch.Tensor, anchors: torch.Tensor) -> None:
        if anchor_layers:
            links.send(anchors, CONTROLLER, TAG_ANCHORS, f"{me} sending its anchors to rank 0")
        if last:
            links.send(out[:, -1:].contiguous(), CONTROLLER, TAG_OUTPUT, f"{me} sending its output to rank 0")

    runner, held = None, None  # held: this stage's previous output, the next stage's input this cycle
    while True:
        command, first, second = links.receive_control()
        links.settle()
        if command == STOP:
            return
        if command == PREFILL:
            cache = target.new_cache(int(second), num_layers=bounds[1] - bounds[0])  # this stage's layers only
            runner = LocalStage(target, stage, bounds, anchor_layers, cache, cache_offset=bounds[0])
            prompt = links.recv(empty(int(first)), source, TAG_HIDDEN, f"{me} receiving the prompt from rank {source}")
            out, anchors = runner.prefill(prompt)
            send_results(out, anchors)
            if not last:
                links.send(out, after, TAG_HIDDEN, f"{me} sending the prompt on to rank {after}")
            held = torch.zeros_like(empty(1))  # SPDState's stage_out before the first cycle
            continue
        if not last:
            links.send(held, after, TAG_HIDDEN, f"{me} sending its last output on to rank {after}")
        hidden = links.recv(empty(1), source, TAG_HIDDEN, f"{me} receiving its input from rank {source}")
        out, anchors = runner.step(hidden, fill=second, cut=first)
        held = out.clone()  # the executor's buffer is overwritten next cycle, maybe before this send completes
        send_results(held, anchors.clone())


# ---------------------------------------------------------------------------------------------- the session
@dataclass
class DistributedSPDStats(SPDStats):
    """SPD's statistics, and where the stages ran."""

    runtime: str  # "distributed"
    layout: str  # Layout.name: dedicated (rank 0 runs the draft only) or hosted (and stage 1)
    world_size: int
    dist_backend: str


@dataclass(frozen=True)
class Plan:
    """What rank 0 decided from the command line, before any weights are read."""
    identity: dict  # the target model's identity, checked on every rank
    bounds: list[tuple[int, int]]


def plan_launch(args, world_size: int) -> Plan:
    if args.mode != "spd":
        raise UserError("--distributed runs SPD: add --mode spd")
    if args.stages is None and not args.stage_layers:
        raise UserError("--distributed needs --stages N or --stage-layers to lay the stages out on ranks")
    cfg = ModelConfig.from_dir(resolve_model_path(args.model))
    bounds = partition_layers(cfg.num_layers, args.stages, args.stage_layers)
    Layout.for_launch(len(bounds), world_size)
    return Plan(target_identity(cfg), bounds)


def check_backend(backend: str, device: torch.device) -> None:
    reason = ops.usable_reason(backend, device)  # the same up-front check as Engine.load
    if reason:
        raise UserError(reason)


@dataclass
class ControllerSetup:
    engine: Engine
    pdm: PDM
    prompt_ids: list[int]
    params: SamplingParams


def load_controller(args, plan: Plan, layout: Layout, device: torch.device) -> ControllerSetup:
    """Rank 0: embedding, final norm, head, tokenizer, the PDM (+ stage 1's layers when hosted); checks the
    prompt, the sampling flags and the PDM against the split."""
    check_backend(args.backend, device)
    params = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    model_dir = resolve_model_path(args.model)
    num_layers = plan.identity["num_layers"]
    local_layers = set(range(*plan.bounds[0])) if layout.hosted else set()
    # The PDM constructors read target layers: an untrained PDM copies the last one as its tower's warm start,
    # loading a trained one takes the layer layout from layer 0. They are dropped again once it is built.
    builder_layers = {num_layers - 1} if args.pdm == "untrained" else {0}
    model = Model.from_pretrained(model_dir, dtype=pick_dtype(args.dtype, device), device=device,
                                  backend=args.backend, layers=local_layers | builder_layers)
    engine = Engine(model, Tokenizer(model_dir), model_dir, model_spec=args.model)
    pdm = resolve_pdm(engine, args.pdm, stages=args.stages, stage_layers=args.stage_layers)
    model.layers = [layer if index in local_layers else None for index, layer in enumerate(model.layers)]
    prompt_ids = engine.encode_prompt(args.prompt, args.chat)
    engine.check_length(len(prompt_ids), args.max_new_tokens)
    return ControllerSetup(engine, pdm, prompt_ids, params)


def load_stage(args, plan: Plan, stage: int, device: torch.device) -> Model:
    """A stage rank: only its own layers, from a model that must be the one rank 0 plans for."""
    check_backend(args.backend, device)
    model_dir = resolve_model_path(args.model)
    identity = target_identity(ModelConfig.from_dir(model_dir))
    if identity != plan.identity:
        raise UserError(f"this rank's --model is {identity}, but rank 0's is {plan.identity}")
    return Model.from_pretrained(model_dir, dtype=pick_dtype(args.dtype, device), device=device,
                                 backend=args.backend, layers=range(*plan.bounds[stage]), embeddings_and_head=False)


def agree(links: Links | Peer, rank: int, mine: dict) -> list[dict]:
    """Every rank's setup outcome ({"error": message or None, ...}); a single error refuses the run on all.
    ``links``: anything whose ``waiting`` bounds the wait (the pipeline's links, or a data-parallel peer)."""
    gathered: list = [None] * dist.get_world_size()
    with links.waiting("agreeing on the configuration"):
        dist.all_gather_object(gathered, mine)
    for other, outcome in enumerate(gathered):
        if outcome["error"]:
            prefix = "" if other == rank else f"rank {other} refused the run: "
            raise UserError(prefix + outcome["error"])
    return gathered


def run_distributed_generate(args) -> int:
    """``generate --distributed`` on this rank: agree on the configuration, then drive (rank 0) or serve a
    stage (see :func:`run_in_process_group` for how it ends)."""
    return run_in_process_group(
        args, "torchrun --standalone --nproc-per-node 5 -m spd_engine generate --distributed --mode spd --stages 4 ...",
        lambda peer: _run_rank(args, Links(peer), peer.rank, peer.world_size, peer.device))


def run_in_process_group(args, example: str, body) -> int:
    """Join torchrun's process group (gloo on CPU; NCCL on GPU, one GPU per rank) and run ``body(peer)`` on
    this rank. User mistakes raise UserError. A lost peer prints one line and ends the process with status 1 at
    once: a broken process group cannot be torn down, its threads abort the interpreter's exit.

    ``args`` carries ``device`` and ``dist_timeout`` (registered by :func:`add_arguments`; DEFAULT_TIMEOUT_S
    when the caller's parser does not define it); ``example`` is the launch shown when torchrun is missing."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise UserError(f"--distributed runs under torchrun, e.g. {example}")
    timeout_s = getattr(args, "dist_timeout", DEFAULT_TIMEOUT_S)
    if not timeout_s > 0:
        raise UserError(f"--dist-timeout must be a positive number of seconds, got {timeout_s}")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = pick_device(args.device)
    if device.type == "cuda":
        ranks_here, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", 1)), torch.cuda.device_count()
        if ranks_here > gpus:  # NCCL needs one GPU per rank
            raise UserError(f"{ranks_here} ranks on this machine need {ranks_here} GPUs, but it has {gpus}")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    peer = Peer(rank, world_size, device, timeout_s)
    try:
        with peer.waiting("meeting the other ranks"):
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
        with joined_group():
            result = body(peer)
    except PipelineBroken as exc:
        print(f"spd-engine: error: {exc}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_PIPELINE_BROKEN)
    return 0 if result is None else result


@contextmanager
def joined_group():
    """Leave the process group at the end, unless a peer broke: leaving would then wait on the lost rank."""
    broken = False
    try:
        yield
    except PipelineBroken:
        broken = True
        raise
    finally:
        if not broken:
            dist.destroy_process_group()


def _run_rank(args, links: Links, rank: int, world_size: int, device: torch.device) -> None:
    # 1. Rank 0 plans from the command line alone, so a bad launch is refused before any weights are read.
    proposal: list = [None]
    if rank == CONTROLLER:
        try:
            proposal[0] = plan_launch(args, world_size)
        except UserError as exc:
            proposal[0] = str(exc)
    with links.waiting("receiving rank 0's plan"):
        dist.broadcast_object_list(proposal, src=CONTROLLER)
    if isinstance(proposal[0], str):
        raise UserError(proposal[0] if rank == CONTROLLER else f"rank 0 refused the run: {proposal[0]}")
    plan: Plan = proposal[0]
    layout = Layout.for_launch(len(plan.bounds), world_size)

    # 2. Every rank loads its own part; rank 0 also checks the PDM and the prompt. All refuse together.
    setup, target, outcome = None, None, {"error": None}
    try:
        if rank == CONTROLLER:
            setup = load_controller(args, plan, layout, device)
            outcome["anchors"] = setup.pdm.config.anchors
        else:
            target = load_stage(args, plan, layout.stage_of(rank), device)
    except UserError as exc:
        outcome["error"] = str(exc)
    anchors = agree(links, rank, outcome)[CONTROLLER]["anchors"]
    anchor_layers = stage_anchor_layers(anchors, plan.bounds)

    # 3. Generate.
    with torch.inference_mode():
        if rank == CONTROLLER:
            _drive(args, links, layout, plan, setup, anchor_layers)
        else:
            stage = layout.stage_of(rank)
            serve_stage(target, layout, stage, plan.bounds[stage], anchor_layers[stage], links)


def _drive(args, links: Links, layout: Layout, plan: Plan, setup: ControllerSetup, anchor_layers) -> None:
    engine, n, target = setup.engine, layout.stages, setup.engine.model
    capacity = cache_capacity(len(setup.prompt_ids), args.max_new_tokens, extra=n + 2)
    stages: list[StageExecutor] = [RemoteStage(target, s, layout, links, len(anchor_layers[s]), capacity)
                                   for s in range(layout.first_remote, n)]
    if layout.hosted:  # stage 1 on this rank, with a cache of its own layers
        a, b = plan.bounds[0]
        stages.insert(0, LocalStage(target, 0, (a, b), anchor_layers[0], target.new_cache(capacity, num_layers=b - a),
                                    cache_offset=a))
    state = SPDState(target, setup.pdm, capacity, setup.params, stages=stages, lanes=DistributedLanes(links))
    on_tokens = None if args.json else _text_stream(engine.tokenizer)
    result = run_decoder(state, "spd", setup.prompt_ids, args.max_new_tokens, setup.params, engine.eos_ids,
                         on_tokens)
    links.settle()
    links.broadcast_control(STOP)
    stats = DistributedSPDStats(**vars(result.stats), runtime="distributed", layout=layout.name,
                                world_size=layout.world_size, dist_backend=dist.get_backend())
    _print_result(args, engine.tokenizer.decode(result.token_ids), result.token_ids, result.prompt_ids, stats)


def _text_stream(tokenizer):
    """Rank 0 prints the text as tokens are committed, as single-process ``generate`` does."""
    decoder = StreamDecoder(tokenizer)

    def on_tokens(ids: list[int]) -> None:
        sys.stdout.write(decoder.push(ids))
        sys.stdout.flush()

    return on_tokens


def _print_result(args, text: str, token_ids: list[int], prompt_ids: list[int], stats: DistributedSPDStats) -> None:
    """The single-process ``generate`` output: one JSON object, or the streamed text plus a summary line."""
    if args.json:
        print(json.dumps({"text": text, "token_ids": token_ids, "prompt_ids": prompt_ids,
                          "stats": stats.to_json()}))
        return
    print(f"\n[spd, {stats.layout} on {stats.world_size} ranks] {stats.new_tokens} tokens in "
          f"{stats.seconds:.2f}s ({stats.tokens_per_s:.1f} tok/s) | stages {stats.stages} | acceptance "
          f"{stats.acceptance_rate:.3f} | equivalent accept length {stats.equivalent_accept_length:.2f}",
          file=sys.stderr)
