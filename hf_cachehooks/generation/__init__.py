"""The generation cache in the layout sweeps already use, its backends (a local model, OpenAI-compatible
servers), and a small completion server."""
