"""Serving: OpenAI-compatible LLM endpoints on Ray Serve (`fmray serve`, `fmray.serve.app`)."""
