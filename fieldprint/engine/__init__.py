"""Engine: verify -> promote -> cache -> generate, and the asynchronous committer."""
