"""Built-in gate models shipped with edgekeeper (``builtin:person``, ``builtin:sound``).

Data files only: each folder holds the .tflite models, ``manifest-*.json`` (docs/models.md),
``labels.txt``, ``metrics.json`` and ``MODEL_CARD.md``; ``frontends/`` holds the shared audio
front-end and ``samples/street/`` the bundled demo recording. They are rebuilt by
``python -m edgekeeper.cloud.training.recipe --out models/``.
"""
