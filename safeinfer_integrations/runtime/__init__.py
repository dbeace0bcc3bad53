"""The runtime: `SafeInferEngine` and what one call needs (settings, prompt rendering, the decode loop, KV-cache
forking, streams, tool-call text, incremental detokenisation). This is the API the adapters build on; it imports
nothing from training, evaluation, the command line or the adapters."""
