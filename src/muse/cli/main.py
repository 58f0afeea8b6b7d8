"""`muse <verb> ...`: finds the verb's module, builds its parser, runs it, turns errors into exit codes.

Verb modules are imported lazily so `muse --help` and bad flags answer without importing torch.
Each verb module defines `add_arguments(parser)` and `run(args) -> int | None`; its docstring's first
line is the one-line summary and an `EXAMPLES` string becomes the help epilog.

Exit codes: 0 success, 2 a user error (one line on stderr, no traceback), 1 a bug (traceback),
130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from muse import __version__
from muse.common.errors import MuseError, closest

# verb -> (module, summary). Summaries live here so `muse --help` needs no imports.
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("muse.cli.prepare", "corpus -> BPE tokenizer -> token shards in RUN/data"),
    "train": ("muse.cli.train", "pretrain a decoder on prepared shards (resumable)"),
    "sample": ("muse.cli.sample", "sample text from a checkpoint"),
    "generate": ("muse.cli.generate", "offline batch generation: prompts.jsonl -> out.jsonl"),
    "export": ("muse.cli.export", "export a checkpoint to the Hugging Face Llama format"),
    "import": ("muse.cli.hf_import", "import a Hugging Face Llama-architecture model as a Muse checkpoint"),
    "serve": ("muse.cli.serve", "serve checkpoints over an OpenAI-compatible API with keys and limits"),
    "keys": ("muse.cli.keys", "create, list, revoke and rotate API keys for `muse serve`"),
    "usage": ("muse.cli.usage", "the usage ledger of `muse serve`: per partner, or one row per request"),
    "sft": ("muse.cli.sft", "supervised fine-tuning on chat data (resumable)"),
    "rm": ("muse.cli.rm", "train a reward model on preference pairs (resumable)"),
    "dpo": ("muse.cli.dpo", "preference-optimise a policy: DPO, IPO or SimPO (resumable)"),
    "rlaif": ("muse.cli.rlaif", "constitution critique -> revision -> preference pairs -> DPO (resumable)"),
    "grpo": ("muse.cli.grpo", "GRPO: reinforcement learning on task rewards, rollouts on the engine (resumable)"),
    "chat": ("muse.cli.chat", "chat with a model in the terminal"),
    "eval": ("muse.cli.eval", "score checkpoints and OpenAI-compatible endpoints side by side on tasks"),
    "dashboard": ("muse.cli.dashboard", "web dashboard of training runs: loss curves, throughput, eval, report"),
    "speedrun": ("muse.cli.speedrun", "the whole pipeline on the embedded corpus, with a report"),
    "ladder": ("muse.cli.ladder", "scaling ladder: IsoFLOP runs, scaling-law fits, a predicted bigger run checked"),
}


def _top_parser() -> argparse.ArgumentParser:
    lines = [f"  {verb:<10} {summary}" for verb, (_, summary) in COMMANDS.items()]
    p = argparse.ArgumentParser(
        prog="muse",
        description="Muse: build your own language-model family.",
        epilog="commands:\n" + "\n".join(lines) + "\n\nRun `muse <command> --help` for its flags and an example.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"muse {__version__}")
    p.add_argument("command", nargs="?", help="one of: " + ", ".join(COMMANDS))
    return p


def build_parser(verb: str):
    """(parser, module) for one verb."""
    module = importlib.import_module(COMMANDS[verb][0])
    doc = (module.__doc__ or COMMANDS[verb][1]).strip()
    p = argparse.ArgumentParser(
        prog=f"muse {verb}",
        description=doc,
        epilog=getattr(module, "EXAMPLES", None),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(p)
    return p, module


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        top = _top_parser()
        top.parse_args(argv)  # handles --help / --version and exits
        top.print_help(sys.stderr)
        return 2
    verb, rest = argv[0], argv[1:]
    if verb not in COMMANDS:
        print(f"muse: error: unknown command '{verb}'.{closest(verb, COMMANDS)} Run `muse --help` for the list.", file=sys.stderr)
        return 2
    try:
        parser, module = build_parser(verb)
        args = parser.parse_args(rest)
        code = module.run(args)
        return int(code or 0)
    except MuseError as e:
        print(f"muse {verb}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"muse {verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
