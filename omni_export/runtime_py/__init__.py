"""The reference runtime: what goes onto a device. Imports nothing from tracing, quantize or targets."""
