"""The customer-service bot: intents understood by an nnforge text classifier, an FAQ to fall back on, a hand-off.

    nnforge app bot train --example            # the shipped online-shop intents and FAQ -> runs/bot/example
    nnforge app bot chat runs/bot/example      # talk to it in the terminal
    nnforge app bot serve runs/bot/example     # POST /v1/chat and a chat page on http://127.0.0.1:8000/

Files: intents.py (the intents file and its checks), calibrate.py (the out-of-scope threshold), faq.py (passages,
BM25 and embedding retrieval), dialogue.py (sessions, slots, routing), records.py (tickets, conversation logs),
train.py, evaluate.py, server.py and page.py (HTTP and the chat page), cli.py.
"""

from pathlib import Path

EXAMPLE = Path(__file__).parent / "example"  # the shipped online shop: intents.yaml, faq/, test.csv
