"""`deltawatch demo`: a tiny Qwen3 post-trained three ways (OPD, SFT, RLVR) from one anchor.

Files: ``task.py`` (the arithmetic task and its character tokenizer), ``model.py`` (the tiny Qwen3,
its weights), ``losses.py`` (the pure loss and advantage functions), ``regimes.py`` (the training
loops), ``report.py`` (the table and the JSON), ``cli.py`` (``add_arguments`` / ``run``); the sidecar
subprocess and its HTTP API are ``deltawatch.sidecar.process.SidecarProcess``.
"""
