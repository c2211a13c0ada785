"""Reading checkpoints into eager components, writing synthetic ones, and (later) tracing."""
