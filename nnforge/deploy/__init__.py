"""Deployment: ONNX export with a parity check, and the HTTP server.

    nnforge export runs/image/exp1 --format onnx [--quantize int8]    # export.export_onnx
    nnforge serve runs/image/exp1 [--host H --token T --workers N]     # server.serve(ServeSettings(...))

export.py (needs PyTorch) writes RUN/model.onnx and RUN/model.json; everything else here serves them, and
serving an export imports no PyTorch: artifacts.py (the files), engine.py (a loaded model, ONNX Runtime or
PyTorch), batching.py (micro-batching), asgi.py (body limit, token, metrics), prom.py (Prometheus text),
settings.py and server.py; capture.py (the inputs a server keeps for labelling, bounded) and drift.py (the
window of recent answers a server compares with its run's reference). Nothing is imported here, so
`import nnforge.deploy.settings` stays light.
"""
