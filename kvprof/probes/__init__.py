"""Probes: OpenTelemetry spans for every KV hand-off phase of an unmodified vLLM engine."""
