"""Process runtime: the platform's parts, the supervisor, HTTP serving, signals."""
