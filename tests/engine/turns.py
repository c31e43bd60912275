"""A session turn recorded straight into an engine's memory, without a model (the memory tests)."""


def record_turn(mem, session: str, text: str):
    """The user's `text` and a stand-in answer become the session's next turn (no generation, no K/V commit)."""
    return mem.record_turn(session, text, f"noted: {text}", {"generation": {"entry": "-"}}, None)
