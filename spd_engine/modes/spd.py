"""Speculative Pipeline Decoding as a mode: the target's layers split into n stages that each work on a
different in-flight token every cycle, fed by a parallel draft module (PDM). The cycle itself is
:class:`spd_engine.spd.SPDState`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..sampling import SamplingParams
from ..spd import SPDState, resolve_pdm, spd_decoder
from ..stages import stage_layers_arg
from .base import DecodeStats, DecodingMode


def accept_length_meaning(stages: int) -> str:
    """What the equivalent accept length is worth, in the words every summary uses."""
    return (f"the speedup over vanilla that {stages} devices (one stage each) or the graphed GPU path would give at "
            "this acceptance, before draft and link costs")


# Why the eager run's own wall clock says nothing about SPD's speed.
EAGER_WALL_CLOCK = ("this eager single-process run executes the stages one after another, so its wall clock checks "
                    "correctness, not speed; SPD is fast only when the stages run at the same time")


@dataclass
class SPDStats(DecodeStats):
    """``tokens_per_target_pass`` and ``theoretical_speedup`` are both the equivalent accept length."""

    title: ClassVar[str] = "SPD"
    stages: int
    stage_layers: list[int]
    anchors: list[int]
    tower_layers: int
    cycles: int  # up to the one that committed the last kept token
    accepted_drafts: int
    rejected_drafts: int
    tokens_per_cycle: float
    equivalent_accept_length: float  # n x new tokens / cycles
    cycles_run: int  # every cycle executed: graph warm-up, and those a readback batch ran past the last token

    def to_json(self) -> dict:
        # wall_seconds and cycle_seconds: the names SPD's reports and scripts have always read.
        return {**super().to_json(), "wall_seconds": self.seconds, "cycle_seconds": self.step_seconds}

    def comparison_heading(self) -> str:
        return f"SPD, n={self.stages}"

    def comparison_notes(self) -> list[str]:
        verified = self.accepted_drafts + self.rejected_drafts
        return [f"acceptance: {self.acceptance_rate:.3f} ({self.accepted_drafts} of {verified} drafts accepted)",
                f"equivalent accept length: {self.equivalent_accept_length:.2f}, "
                f"{accept_length_meaning(self.stages)}",
                f"note: {EAGER_WALL_CLOCK}"]


def describe_pdm(spec, pdm) -> dict:
    """The draft module and pipeline split a report was made with."""
    config = pdm.config
    return {"pdm": str(spec) if spec else "default", "stages": config.stages,
            "stage_layers": [b - a for a, b in config.stage_bounds], "anchors": config.anchors,
            "tower_layers": config.tower_layers, "draft_vocab": config.draft_vocab_size}


def spd_totals(prompts: list[dict], stages: int) -> dict:
    """A dataset's cycles and equivalent accept length (a ratio of sums), from prompts run or teacher-forced."""
    new_tokens, cycles = sum(p["new_tokens"] for p in prompts), sum(p["cycles"] for p in prompts)
    return {"cycles": cycles, "equivalent_accept_length": stages * new_tokens / cycles if cycles else 0.0}


class SPDMode(DecodingMode):
    name = "spd"
    summary = "Speculative Pipeline Decoding: n pipelined stages of the target, fed by a parallel draft module"
    options = {"stages": "--stages", "stage_layers": "--stage-layers", "pdm": "--pdm"}
    capturable = True

    @classmethod
    def add_arguments(cls, parser) -> None:
        parser.add_argument("--stages", type=int, default=None, help="spd: number of pipeline stages n (1..L)")
        parser.add_argument("--stage-layers", type=stage_layers_arg, default=None,
                            help="spd: explicit layers per stage, e.g. 8,8,7,7")
        parser.add_argument("--pdm", default=None, help="spd: draft module checkpoint directory, or 'untrained'")

    def __init__(self, engine, stages: int | None = None, stage_layers: list[int] | None = None, pdm=None):
        super().__init__(engine)
        self.pdm_spec = pdm
        self.pdm = resolve_pdm(engine, pdm, stages=stages, stage_layers=stage_layers)

    def decoder(self, prompt_len: int, max_new_tokens: int, params: SamplingParams, readback: int) -> SPDState:
        return spd_decoder(self.engine.model, self.pdm, prompt_len, max_new_tokens, params, readback)

    def describe(self) -> dict:
        return describe_pdm(self.pdm_spec, self.pdm)

    def eval_row(self, stats: SPDStats) -> dict:
        return {"cycles": stats.cycles}

    def eval_totals(self, prompts: list[dict]) -> dict:
        return spd_totals(prompts, self.pdm.config.stages)

    @classmethod
    def predict(cls, settings: dict, per_prompt: list[dict], times, link) -> dict:
        """n stages on n devices plus one for the PDM and controller (simulate.py's dedicated layout)."""
        from ..simulate import Traces, simulate

        traces = Traces([p["trace"] for p in per_prompt], source="eval", recorded_stages=settings["stages"])
        sim = simulate(traces, times, link, [settings["stages"]])
        prediction = sim.predictions[0]
        return {"devices": prediction.devices, "tokens_per_s": prediction.tokens_per_s,
                "vanilla_tokens_per_s": sim.vanilla_tokens_per_s, "speedup": prediction.speedup}
