"""Chat with a model in the terminal: streamed replies over the paged engine, history kept within the context.

Type a message and press Enter. A line ending in a backslash continues on the next line; a line that is
just \"\"\" opens (and a second one closes) a block of several lines. Commands:

    /reset              forget the conversation (the system prompt stays)
    /system [TEXT]      set the system prompt (no TEXT: remove it); the conversation starts over
    /temperature X      sampling temperature (0 = greedy)
    /help, /quit        (Ctrl-D quits too; Ctrl-C stops a reply)

The conversation is rendered by the one chat renderer (muse.tokenizer.render_prompt), as `muse serve` and
`muse eval` render it. When it no longer fits the context with room for a reply, the oldest exchanges
are dropped (the system prompt is kept), and a line on stderr says so.
"""

from __future__ import annotations

import argparse
import sys

EXAMPLES = """examples:
  muse chat runs/demo                       # the stage trained last (sft after `muse sft`)
  muse chat runs/demo --stage sft --temperature 0 --system "Answer briefly."
  printf 'What is 2 plus 3?\\n' | muse chat runs/demo --temperature 0
"""

HELP = ("commands: /reset, /system [TEXT], /temperature X, /help, /quit. End a line with \\ to continue it, "
        'or wrap several lines in """.')


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="run directory, stage directory or checkpoint directory")
    p.add_argument("--stage", help="stage to take from a run directory (default: the one trained last)")
    p.add_argument("--system", default="", help="system prompt")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    p.add_argument("--top-k", type=int, default=50, help="0 = off (default 50)")
    p.add_argument("--max-tokens", type=int, default=256, help="longest reply in tokens (default 256)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, mps, auto, ...")


class ChatSession:
    """One conversation over a synchronous engine: history, settings, context trimming, streamed replies."""

    def __init__(self, engine, tok, *, system: str = "", temperature: float = 0.7, top_k: int = 50,
                 max_tokens: int = 256, seed: int | None = None):
        self.engine, self.tok = engine, tok
        self.system, self.temperature, self.top_k = system, temperature, top_k
        self.max_tokens = min(max_tokens, engine.max_model_len - 2)
        self.seed = seed
        self.history: list[dict] = []
        self.turn = 0

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def prompt_ids(self) -> tuple[list[int], int]:
        """(ids of the conversation ending where the assistant speaks, exchanges dropped to make it fit)."""
        from muse.tokenizer import render_prompt

        dropped = 0
        while True:
            ids = render_prompt(self.tok, self.messages())
            # The oldest exchange: the first turn up to the next user turn (a question and its answer).
            cut = next((i for i, m in enumerate(self.history) if i > 0 and m["role"] == "user"), None)
            if len(ids) + self.max_tokens <= self.engine.max_model_len or cut is None:
                return ids, dropped  # fits, or only the newest question is left (reply() shortens the answer)
            del self.history[:cut]
            dropped += 1

    def command(self, line: str, err) -> bool:
        """Run a /command; False when the session should end."""
        name, _, arg = line.strip().partition(" ")
        if name in ("/quit", "/exit"):
            return False
        if name == "/reset":
            self.history.clear()
            print("(conversation reset)", file=err)
        elif name == "/system":
            self.system = arg.strip()
            self.history.clear()
            print(f"(system prompt {'set' if self.system else 'removed'}; conversation reset)", file=err)
        elif name == "/temperature":
            try:
                value = float(arg)
                if value < 0:
                    raise ValueError
            except ValueError:
                print("(usage: /temperature X with X >= 0)", file=err)
            else:
                self.temperature = value
                print(f"(temperature {value})", file=err)
        elif name == "/help":
            print(HELP, file=err)
        else:
            print(f"(unknown command {name}; {HELP})", file=err)
        return True

    def reply(self, user: str, out, err) -> str:
        """Add `user`, stream the assistant's reply to `out`, keep it in the history and return it."""
        from muse.infer.sampling_params import SamplingParams
        from muse.tokenizer import END_ID
        from muse.tokenizer.text import TextStream

        self.history.append({"role": "user", "content": user})
        ids, dropped = self.prompt_ids()
        if dropped:
            print(f"(the conversation outgrew the context: the {dropped} oldest exchange(s) were dropped)", file=err)
        budget = self.engine.max_model_len - len(ids)
        if budget < 1:
            self.history.pop()
            print(f"(that message is {len(ids)} tokens with the system prompt; the context holds "
                  f"{self.engine.max_model_len}: shorten it)", file=err)
            return ""
        seed = None if self.seed is None else self.seed + self.turn
        params = SamplingParams(max_tokens=min(self.max_tokens, budget), temperature=self.temperature,
                                top_k=self.top_k, seed=seed, stop_token_ids=(END_ID,))
        rid = f"chat-{self.turn}"
        self.turn += 1
        stream = TextStream(self.tok)
        self.engine.add_request(rid, ids, params)
        try:
            while self.engine.has_request(rid):
                for o in self.engine.step():
                    if o.request_id == rid:
                        out.write(stream.push(o.outputs[0].new_token_ids))
                        out.flush()
        except KeyboardInterrupt:  # stop this reply, keep the session
            self.engine.abort(rid)
            while self.engine.has_request(rid):
                self.engine.step()
            print("\n(reply stopped)", file=err)
        out.write(stream.finish() + "\n")
        out.flush()
        self.history.append({"role": "assistant", "content": stream.text})
        return stream.text


def read_message(lines, prompt) -> str | None:
    """The next message from an iterator of input lines (multi-line rules above); None at the end."""
    first = next(lines, None) if prompt is None else prompt("you> ")
    if first is None:
        return None
    if first.strip() == '"""':
        block = []
        for line in lines:
            if line.strip() == '"""':
                break
            block.append(line)
        return "\n".join(block)
    parts = [first]
    while parts[-1].endswith("\\"):
        parts[-1] = parts[-1][:-1]
        more = next(lines, None)
        if more is None:
            break
        parts.append(more)
    return "\n".join(parts)


def chat_loop(session: ChatSession, lines, out, err, interactive: bool = False) -> None:
    """Read messages and commands from `lines` until they end or /quit."""

    def prompt(text):
        err.write(text)
        err.flush()
        return next(lines, None)

    while True:
        msg = read_message(lines, prompt if interactive else None)
        if msg is None:
            break
        if not msg.strip():
            continue
        if msg.startswith("/"):
            if not session.command(msg, err):
                break
            continue
        if interactive:
            err.write("muse> ")
            err.flush()
        session.reply(msg, out, err)


def run(args) -> int:
    from muse.checkpoint import get_stage, load
    from muse.common.device import pick_device
    from muse.common.errors import UsageError
    from muse.infer.engine import Engine, EngineConfig

    if args.max_tokens <= 0 or args.temperature < 0 or args.top_k < 0:
        raise UsageError("--max-tokens must be positive, --temperature and --top-k >= 0")
    model, tok, meta = load(args.checkpoint, device=pick_device(args.device),
                            stages=None if args.stage is None else (get_stage(args.stage).name,))
    # One conversation at a time: a pool for one full-length sequence is all the KV cache it needs.
    engine = Engine(model, EngineConfig(max_num_seqs=1, seed=args.seed or 0), tokenizer=tok)
    session = ChatSession(engine, tok, system=args.system, temperature=args.temperature, top_k=args.top_k,
                          max_tokens=args.max_tokens, seed=args.seed)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"muse chat: {meta['path']} (context {engine.max_model_len} tokens). {HELP}", file=sys.stderr)
    lines = _tty_lines() if interactive else (line.rstrip("\n") for line in sys.stdin)
    chat_loop(session, lines, sys.stdout, sys.stderr, interactive=interactive)
    return 0


def _tty_lines():
    """Lines typed at a terminal, with line editing and history (readline) where Python has it."""
    try:
        import readline  # noqa: F401 - importing it is what turns editing on for input()
    except ImportError:
        pass
    while True:
        try:
            yield input()
        except EOFError:
            return
