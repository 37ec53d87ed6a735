"""What crosses the wire: event envelopes, SSE frames, API errors, submissions."""
