"""The ``spd-engine`` command line. User mistakes print one line and exit 2; never a traceback."""
from __future__ import annotations

import argparse
import importlib
import json
import sys

from .errors import UserError
from .stages import stage_layers_arg

EXIT_USER_ERROR = 2


class Parser(argparse.ArgumentParser):
    """argparse with the project's error format: a bad flag is one ``spd-engine: error: ...`` line (exit 2),
    like every other user mistake, instead of a usage block."""

    def error(self, message: str):
        raise UserError(message)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct), a HF directory or a .gguf file")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--backend", choices=["auto", "torch", "triton", "cuda"], default="auto")


def _add_spd_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stages", type=int, default=None, help="number of pipeline stages n (1..L)")
    p.add_argument("--stage-layers", type=stage_layers_arg, default=None,
                   help="explicit layers per stage, e.g. 8,8,7,7")
    p.add_argument("--pdm", default=None, help="draft module checkpoint directory, or 'untrained'")
    p.add_argument("--graph", choices=["auto", "on", "off"], default="auto",
                   help="replay each decode step / SPD cycle as a CUDA graph, with a stream per stage "
                        "(auto: on a CUDA device)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="spd-engine", description="Speculative Pipeline Decoding engine")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text (vanilla or SPD)")
    _add_model_args(gen)
    _add_spd_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as one user turn in the chat template")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--mode", choices=["vanilla", "spd"], default="vanilla")
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    gen.add_argument("--distributed", action="store_true", help="run under torchrun, one rank per stage")
    importlib.import_module("spd_engine.runtime.distributed").add_arguments(gen)
    gen.set_defaults(func=cmd_generate)

    conv = sub.add_parser("convert-gguf", help="convert a Llama-family GGUF file to a HF safetensors directory")
    conv.add_argument("file")
    conv.add_argument("outdir")
    conv.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    conv.set_defaults(func=cmd_convert)

    # Subcommands owned by their modules: each defines add_arguments(parser) and run(args) -> exit code.
    for name, module, text in (("train-pdm", "train", "train a draft module (PDM) by distillation"),
                               ("eval", "evaluate", "acceptance and losslessness over a prompt set"),
                               ("simulate", "simulate", "predict multi-device SPD speed from measurements"),
                               ("build-data", "distill_data", "self-distilled training data and its feature cache")):
        owner = importlib.import_module(f"spd_engine.{module}")
        command = sub.add_parser(name, help=text)
        owner.add_arguments(command)
        command.set_defaults(func=owner.run)

    info = sub.add_parser("info", help="print a model summary")
    _add_model_args(info)
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_info)
    return parser


def cmd_generate(args) -> int:
    from .engine import Engine
    if args.distributed:
        from .runtime.distributed import run_distributed_generate

        return run_distributed_generate(args)
    engine = Engine.load(args.model, device=args.device, dtype=args.dtype, backend=args.backend)
    stream = None if args.json else (lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    out = engine.generate(args.prompt, chat=args.chat, max_new_tokens=args.max_new_tokens, mode=args.mode,
                          stages=args.stages, stage_layers=args.stage_layers, pdm=args.pdm,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                          stream=stream, graph=args.graph)
    if args.json:
        print(json.dumps({"text": out.text, "token_ids": out.token_ids, "prompt_ids": out.prompt_ids,
                          "stats": out.stats}))
    else:
        stats = out.stats
        summary = f"[{stats['mode']}] {stats['new_tokens']} tokens in {stats['seconds']:.2f}s " \
                  f"({stats['tokens_per_s']:.1f} tok/s)"
        if stats["mode"] == "spd":
            summary += (f" | stages {stats['stages']} | acceptance {stats['acceptance_rate']:.3f} | "
                        f"equivalent accept length {stats['equivalent_accept_length']:.2f}")
        print("\n" + summary, file=sys.stderr)
    return 0


def cmd_convert(args) -> int:
    from pathlib import Path

    import torch

    from .gguf_convert import convert_gguf

    src = Path(args.file)
    if not src.is_file():
        raise UserError(f"GGUF file '{args.file}' does not exist")
    out = convert_gguf(src, Path(args.outdir), dtype=getattr(torch, args.dtype))
    print(f"wrote {out}", file=sys.stderr)
    return 0


def cmd_info(args) -> int:
    from dataclasses import asdict

    from .engine import Engine

    engine = Engine.load(args.model, device=args.device, dtype=args.dtype, backend=args.backend)
    model = engine.model
    params = sum(t.numel() for t in [model.embed_weight, model.norm_weight] +
                 [w for layer in model.layers for w in vars(layer).values() if w is not None])
    if not model.config.tie_word_embeddings:
        params += model.lm_head_weight.numel()
    summary = {"path": str(engine.model_dir), "parameters": params, "device": str(model.device),
               "dtype": str(model.dtype).replace("torch.", ""), "chat_template": engine.tokenizer.chat_template is not None,
               "eos_ids": sorted(engine.eos_ids), "config": asdict(model.config)}
    if args.json:
        print(json.dumps(summary))
    else:
        cfg = model.config
        print(f"{cfg.model_type} at {summary['path']}\n  {params / 1e6:.1f}M parameters, {cfg.num_layers} layers, "
              f"hidden {cfg.hidden_size}, FFN {cfg.intermediate_size}, heads {cfg.num_heads}/{cfg.num_kv_heads} "
              f"(q/kv), head dim {cfg.head_dim}\n  vocab {cfg.vocab_size}, rope theta {cfg.rope_theta:g}, "
              f"tied embeddings {cfg.tie_word_embeddings}, context {cfg.max_position_embeddings}\n"
              f"  loaded as {summary['dtype']} on {summary['device']}, eos ids {summary['eos_ids']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except UserError as exc:
        print(f"spd-engine: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("spd-engine: interrupted", file=sys.stderr)
        return 130
