"""The ``spd-engine`` command line. User mistakes print one line and exit 2; never a traceback."""
from __future__ import annotations

import argparse
import importlib
import json
import sys

from .errors import UserError
from .modes import MODE_NAMES, REFERENCE_MODE, all_modes

EXIT_USER_ERROR = 2


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless there is none worth showing (None, or False for a switch)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """The parser of every (sub)command: ``--help`` shows defaults, and a bad flag is a UserError (one line,
    exit 2), like every other user mistake."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        # The formatter only prints a default inside help text, so an option without any gets a bare one.
        default = kwargs.get("default")
        if kwargs.get("help") is None and default is not None and default is not False:
            kwargs["help"] = "(default: %(default)s)"
        return super().add_argument(*args, **kwargs)

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")  # main() prints it as the usual one line


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help="'default' (SmolLM2-135M-Instruct), a HF directory, a .gguf file, or a Hub id such as "
                        "HuggingFaceTB/SmolLM2-135M-Instruct already in the local Hugging Face cache")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--backend", choices=["auto", "torch", "triton", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's own choice)")


class _FirstDefinition:
    """The parser as a mode's ``add_arguments`` sees it: a flag another mode has defined already (modes may
    share one, such as a draft checkpoint) keeps its first definition."""

    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser

    def add_argument(self, *flags, **kwargs):
        if not any(flag in self.parser._option_string_actions for flag in flags):
            self.parser.add_argument(*flags, **kwargs)


def add_decoding_args(p: argparse.ArgumentParser, default_mode: str) -> None:
    """--mode, --graph and every mode's own flags (each mode checks that it was given only its own)."""
    p.add_argument("--mode", choices=MODE_NAMES, default=default_mode,
                   help="; ".join(f"{mode.name}: {mode.summary}" for mode in all_modes()))
    p.add_argument("--graph", choices=["auto", "on", "off"], default="auto",
                   help="replay each decode step / cycle as a CUDA graph, with a stream per pipeline stage "
                        "(auto: on a CUDA device, for the modes whose cycle can be captured)")
    for mode in all_modes():
        mode.add_arguments(_FirstDefinition(p))


def mode_options(args) -> dict:
    """Every mode's options as parsed (None: not given); Engine.generate rejects those of another mode."""
    return {keyword: getattr(args, keyword) for mode in all_modes() for keyword in mode.options}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="spd-engine", description="Speculative Pipeline Decoding engine")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text in any decoding mode")
    _add_model_args(gen)
    add_decoding_args(gen, default_mode=REFERENCE_MODE)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as one user turn in the chat template")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    gen.add_argument("--no-compare", dest="compare", action="store_false",
                     help="a --mode other than vanilla, without --json, also runs vanilla decoding and prints "
                          "both side by side; this skips that run")
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
                               ("build-data", "distill_data", "self-distilled training data and its feature cache"),
                               ("train-exit-adapter", "exit_adapter", "train PPSD's early-exit adapter from a feature cache")):
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
    settings = dict(chat=args.chat, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, seed=args.seed, graph=args.graph)
    out = engine.generate(args.prompt, mode=args.mode, stream=stream, **settings, **mode_options(args))
    if args.json:
        print(json.dumps({"text": out.text, "token_ids": out.token_ids, "prompt_ids": out.prompt_ids,
                          "stats": out.stats.to_json()}))
        return 0
    if not out.text.endswith("\n"):
        print(flush=True)  # the streamed text ends with a newline
    if args.mode == REFERENCE_MODE or not args.compare:
        print(_run_line(out.stats), file=sys.stderr)
        return 0
    print(f"spd-engine: running {REFERENCE_MODE} decoding on the same prompt to compare (--no-compare skips this)",
          file=sys.stderr, flush=True)
    vanilla = engine.generate(args.prompt, mode=REFERENCE_MODE, **settings)
    print(compare_with_vanilla(out, vanilla, args.temperature), file=sys.stderr)
    return 1 if args.temperature == 0 and vanilla.token_ids != out.token_ids else 0


def _run_line(stats) -> str:
    return f"[{stats.mode}] {stats.new_tokens} tokens in {stats.seconds:.2f}s ({stats.tokens_per_s:.1f} tok/s)"


def compare_with_vanilla(out, vanilla, temperature: float) -> str:
    """The main job's summary: a mode's run beside vanilla decoding's, and what its numbers mean (the mode's
    stats say, e.g. for SPD what the acceptance is worth and what this eager run's wall clock does not say)."""
    s, v = out.stats, vanilla.stats
    name = s.title or s.mode
    if temperature == 0:
        same = f"yes (greedy {name} is lossless)" if out.token_ids == vanilla.token_ids else \
            f"NO (greedy {name} must equal vanilla decoding: a bug, please report it)"
    else:
        same = f"not compared at T={temperature:g}: sampling {name} has vanilla's distribution, not its draws"
    rows = [("", "vanilla", s.comparison_heading()),
            ("new tokens", str(v.new_tokens), str(s.new_tokens)),
            ("wall clock", f"{v.seconds:.2f} s", f"{s.seconds:.2f} s"),
            ("tokens/s", f"{v.tokens_per_s:.1f}", f"{s.tokens_per_s:.1f}")]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    table = [f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}" for a, b, c in rows]
    return "\n".join(table + [f"same tokens as vanilla: {same}", *s.comparison_notes()])


def cmd_convert(args) -> int:
    from pathlib import Path

    import torch

    from .gguf_convert import convert_gguf

    out = convert_gguf(Path(args.file), Path(args.outdir), dtype=getattr(torch, args.dtype))
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
        if getattr(args, "threads", None) is not None:
            if args.threads < 1:
                raise UserError(f"--threads must be >= 1, got {args.threads}")
            import torch

            torch.set_num_threads(args.threads)
        return args.func(args)
    except UserError as exc:
        one_line = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())  # the contract: one line
        print(f"spd-engine: error: {one_line}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:  # the file system refused: a path that is a directory, no permission, a full disk
        where = f": '{exc.filename}'" if exc.filename else ""
        print(f"spd-engine: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("spd-engine: interrupted", file=sys.stderr)
        return 130
