"""`nnforge app bot|monitor ...`: the applications' command lines, added to nnforge's own (nnforge/cli.py).

    nnforge app bot train --example
    nnforge app monitor --example

Parsing only imports argparse; each app imports its heavy parts when its command runs.
"""

from __future__ import annotations


def add_app_parser(sub) -> None:
    from nnforge.apps.bot.cli import add_parser as bot
    from nnforge.apps.monitor.cli import add_parser as monitor

    app = sub.add_parser("app", help="applications on nnforge: a customer-service bot, a news sentiment monitor")
    apps = app.add_subparsers(dest="app", required=True)
    bot(apps)
    monitor(apps)
