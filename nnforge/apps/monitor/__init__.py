"""The financial-news sentiment monitor: score a stream of dated headlines, tag topics, alert on surges and drifts.

    nnforge app monitor --example                 # the Guardian's 2020 business headlines, replayed in time order
    nnforge app monitor --model RUN --stream news.csv|news/|-|http --topics topics.yaml --window 1h
    nnforge app monitor dashboard runs/monitor/example/state.db

Files: streams.py (file replay, watched folder, stdin), topics.py (keywords and embedding similarity), detect.py
(z-scores and CUSUM), state.py (SQLite), alerts.py (stdout, JSONL, webhook), monitor.py (the pipeline),
dashboard.py (the page), server.py (the HTTP endpoint), cli.py.
"""

from pathlib import Path

EXAMPLE = Path(__file__).parent / "example"  # topics.yaml and sentiment.csv (business headlines written for nnforge)
