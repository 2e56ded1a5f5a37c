"""Applications built on nnforge's public API (nnforge.api) only: a customer-service bot and a news monitor.

    nnforge app bot train --example && nnforge app bot chat runs/bot/example
    nnforge app monitor --example

Each app is a thin layer: it trains and loads ordinary nnforge runs through nnforge.api (train, load, evaluate) and
adds what the application needs around them (dialogue state, retrieval, stream reading, detection, pages). The apps
never import a task module or the training engine, so they use nnforge exactly as a user's own program would.
"""
