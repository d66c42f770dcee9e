"""localhub: a small Hugging Face Hub-compatible HTTP server for offline tests and demos.

The real huggingface_hub / transformers / peft / datasets clients talk to it through HF_ENDPOINT
(with HF_HUB_DISABLE_XET=1). Entry points:

- `localhub.server.LocalHub(root).start(port=0)`: in-process server in a daemon thread;
- `localhub.seed.seed(root)`: deterministic users and demo repos;
- `python -m localhub serve|seed --root DIR`: the same from a shell.
"""
