"""Teacher-forced SPD evaluation: a run's acceptance trace without running the pipeline.

    spd-engine eval --method teacher-forced --pdm DIR --data mt_bench.jsonl gsm8k.jsonl humaneval.jsonl

Why it is exact. A draft is verified only when every token in flight at the time it was made gets committed:
a wrong token in flight is verified first, and its rejection flushes every draft made behind it. So the draft
verified at position u was computed from committed tokens only, at the fill the schedule gives it,
``f(u) = min(u - r, n)`` with r the last position the pipeline restarted from (the first generated token, or
the last rejected one, which the target's own token replaced). Over the committed sequence that draft is the
training staircase's output for position u - 1 at fill f(u) (:meth:`train.Distiller.draft_logits`, tested
against the engine's own drafts). And the committed sequence is the target's own output, whatever the PDM
does. Hence, per prompt:

1. the target's answer, batched over prompts (:func:`decode.generate_batch`);
2. one teacher pass over prompt + answer: the anchors of every PDM and the target's logits;
3. per PDM, one staircase pass per fill; then the outcomes in order:

   * T = 0: accept iff the draft's argmax equals the committed token. Same trace as a real run, up to the
     rounding of batched vs incremental matmuls (a near-tie can flip an argmax).
   * T > 0: a real run draws x ~ q and accepts with probability min(1, p(x)/q(x)); given that the committed
     token is x, that is an accept with probability min(1, q(x)/p(x)), as P(accept, x) = min(p(x), q(x)) and
     P(x) = p(x). Drawing the answer from the target and then each outcome from that conditional gives the
     engine's joint distribution of (output, trace), not its random stream.

Cycles follow from the trace by the engine's schedule (:func:`simulate.count_cycles`). Losslessness is a
property of the real pipeline and is not checked here (``lossless`` is null): ``--method spd`` checks it.
Cost: a batched vanilla generation plus one forward per prompt, instead of n stage passes per cycle.
"""
from __future__ import annotations

import sys

import torch
from tqdm import tqdm

from .decode import generate_batch
from .model import AnchorCapture
from .pdm import PDM
from .sampling import SamplingParams, target_probs
from .simulate import count_cycles
from .train import Distiller

ANSWER_BATCH = 64  # prompts answered together: CPU throughput stops growing around here


def teacher_pass(target, ids: list[int], anchor_layers: list[int], first: int | None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One forward over ``ids``: hidden states (1, T, len(anchor_layers), H) at ``anchor_layers`` and, unless
    ``first`` is None, the target's float32 logits (T - first, V) of positions first.. (verified next)."""
    L = target.config.num_layers
    cache = target.new_cache(len(ids))
    embedded = target.embed(torch.tensor([ids], device=target.device))
    anchors = torch.empty(1, len(ids), len(anchor_layers), target.config.hidden_size, dtype=target.dtype,
                          device=target.device)
    if 0 in anchor_layers:  # the embedding; forward_layers fills the layer outputs
        anchors[0, :, anchor_layers.index(0)] = embedded[0]
    hidden = target.forward_layers(embedded, 0, L, cache, anchors=AnchorCapture(tuple(anchor_layers), anchors[0]))
    return anchors, None if first is None else target.logits(hidden[0, first:]).float()


def draft_outcomes(distiller: Distiller, anchors: torch.Tensor, answer: list[int], prompt_len: int,
                   target_logits: torch.Tensor | None, params: SamplingParams, generator: torch.Generator | None
                   ) -> str:
    """The verification trace ('A'/'R' per answer token after the first) of this PDM on one committed answer.

    ``anchors`` (1, T, m, H) are the PDM's anchors over prompt + answer; ``target_logits`` row i is the target
    at position prompt_len + i (sampling only). A fill's staircase pass runs only once the walk needs it:
    at low acceptance the deep fills are never reached."""
    pdm = distiller.pdm
    n, verified = pdm.config.stages, len(answer) - 1
    if verified <= 0:
        return ""
    rows = torch.arange(prompt_len, prompt_len + verified, device=anchors.device)  # u - 1 for u = P+1..
    committed = torch.tensor(answer[1:], device=anchors.device)
    if not params.greedy:
        p_token = target_probs(target_logits[:verified], params).gather(1, committed[:, None])[:, 0]
        in_vocab = distiller.vocab_row[committed]
    chances: dict[int, torch.Tensor] = {}

    def chance(fill: int) -> torch.Tensor:
        """Per verified position: 1/0 for a greedy match, else the accept probability min(1, q(x)/p(x))."""
        if fill not in chances:
            logits = distiller.draft_logits(anchors, None if fill == n else fill, rows)[0]
            if params.greedy:
                result = (pdm.draft_vocab[logits.argmax(-1)] == committed).float()
            else:
                q = torch.softmax(logits.float() / params.temperature, dim=-1)
                q_token = torch.where(in_vocab >= 0, q.gather(1, in_vocab.clamp(min=0)[:, None])[:, 0], 0.0)
                result = (q_token / p_token.clamp(min=1e-30)).clamp(max=1.0)
            chances[fill] = result.cpu()
        return chances[fill]

    draws = None if params.greedy else torch.rand(verified, generator=generator, device=generator.device).cpu()
    trace, since_restart = [], 1  # the first answer token restarts the pipeline: fill 1 for the next draft
    for i in range(verified):
        p_accept = float(chance(min(since_restart, n))[i])
        accepted = p_accept > 0.5 if params.greedy else float(draws[i]) < p_accept
        trace.append("A" if accepted else "R")
        since_restart = since_restart + 1 if accepted else 1
    return "".join(trace)


def target_answers(engine, prompt_sets: dict[str, list[list[int]]], max_new_tokens: int, params: SamplingParams,
                   generator: torch.Generator | None = None, progress: bool = True) -> dict[str, list[list[int]]]:
    """The target's own answers (what SPD commits), ``ANSWER_BATCH`` prompts at a time."""
    answers: dict[str, list[list[int]]] = {}
    total = sum(len(prompts) for prompts in prompt_sets.values())
    with tqdm(total=total, desc="target answers", unit="prompt", disable=not progress, file=sys.stderr) as bar:
        for name, prompts in prompt_sets.items():
            answers[name] = []
            for start in range(0, len(prompts), ANSWER_BATCH):
                batch = prompts[start: start + ANSWER_BATCH]
                answers[name] += generate_batch(engine.model, batch, max_new_tokens, engine.eos_ids, params, generator)
                bar.update(len(batch))
    return answers


def evaluate_teacher_forced(engine, prompt_sets: dict[str, list[list[int]]], pdms: list[PDM],
                            max_new_tokens: int, params: SamplingParams, progress: bool = True,
                            answers: dict[str, list[list[int]]] | None = None) -> list[dict]:
    """Per PDM, ``{dataset: [per-prompt result]}`` over ``prompt_sets`` ({dataset: [prompt ids]}); every PDM
    sees the same answers (generated once, or given) and the same teacher pass (union of their anchors)."""
    if not pdms:  # nothing to score: skip generating answers too
        return []
    target = engine.model
    generator = params.generator(target.device)
    if answers is None:
        answers = target_answers(engine, prompt_sets, max_new_tokens, params, generator, progress)
    anchor_layers = sorted({a for pdm in pdms for a in pdm.config.anchors})
    columns = [[anchor_layers.index(a) for a in pdm.config.anchors] for pdm in pdms]
    distillers = [Distiller(target, pdm) for pdm in pdms]
    results: list[dict] = [{name: [] for name in prompt_sets} for _ in pdms]
    total = sum(len(prompts) for prompts in prompt_sets.values())
    with torch.inference_mode(), tqdm(total=total, desc="teacher-forced eval", unit="prompt",
                                      disable=not progress, file=sys.stderr) as bar:
        for name, prompts in prompt_sets.items():
            for ids, answer in zip(prompts, answers[name]):
                anchors, logits = teacher_pass(target, ids + answer, anchor_layers,
                                               None if params.greedy else len(ids))
                for pdm_results, distiller, cols in zip(results, distillers, columns):
                    trace = draft_outcomes(distiller, anchors[:, :, cols], answer, len(ids), logits, params,
                                           generator)
                    n = distiller.pdm.config.stages
                    pdm_results[name].append({
                        "prompt_tokens": len(ids), "new_tokens": len(answer), "cycles": count_cycles(trace, n),
                        "accepted": trace.count("A"), "rejected": trace.count("R"), "lossless": None,
                        "first_mismatch": None, "trace": trace})
                bar.update(1)
    return results
