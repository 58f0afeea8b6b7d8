"""Look at training runs in a browser: each stage's loss and val bpb curves from metrics.jsonl (every
run given overlaid), throughput and MFU, `muse eval`'s results with a per-sample viewer, and the
speedrun's report. Serves one page on loopback until Ctrl-C; the runs are read once at start.
"""

from __future__ import annotations

import argparse

EXAMPLES = """examples:
  muse dashboard runs/speedrun                       # then open http://127.0.0.1:8001/ui/
  muse dashboard runs/d12 runs/d16 --port 9000       # two runs overlaid
  muse dashboard runs/speedrun --json                # the data the page shows, as one JSON object
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (or stage directories) to show")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--json", action="store_true", help="print the runs' data as JSON instead of serving the page")


def run(args) -> int:
    import json
    import sys

    from muse.common.errors import UsageError
    from muse.server.rundata import read_runs

    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be 1..65535, got {args.port}")
    runs = read_runs(args.runs)
    if args.json:
        json.dump({"runs": runs}, sys.stdout)
        sys.stdout.write("\n")
        return 0

    import uvicorn

    from muse.server.ui import dashboard_app

    print(f"dashboard of {', '.join(r['name'] for r in runs)} at http://{args.host}:{args.port}/ui/ (Ctrl-C stops)",
          file=sys.stderr)
    uvicorn.run(dashboard_app(runs), host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0
