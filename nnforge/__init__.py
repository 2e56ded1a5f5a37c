"""nnforge: from data to a deployed, continuously improving model, on PyTorch.

    import nnforge
    run = nnforge.train("image", data="data/fashion-mnist", epochs=3)
    print(nnforge.load(run).predict(["shoe.png"]))
"""

__version__ = "0.1.0"

__all__ = ["__version__", "add_items", "compare", "doctor", "evaluate", "export", "generate", "load", "play", "predict",
           "recommend", "serve", "train", "tune"]


def __getattr__(name):
    # The public verbs live in nnforge.api; importing them lazily keeps `import nnforge.models` light.
    if name in __all__:
        from nnforge import api

        return getattr(api, name)
    raise AttributeError(f"module 'nnforge' has no attribute '{name}'")
