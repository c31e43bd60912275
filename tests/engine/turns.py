"""The memory tests' helpers: an engine memory on a folder, and a session turn recorded into it without a model."""

from fieldprint.engine.memory import Memory
from fieldprint.memory.embed import HashingEmbedderForTests


def memory(folder) -> Memory:
    """The engine memory of `folder` with the hashing embedder (no model load); use it in a `with`."""
    return Memory.open(str(folder), embedder=HashingEmbedderForTests())


def record_turn(mem, session: str, text: str):
    """The user's `text` and a stand-in answer become the session's next turn (no generation, no K/V commit)."""
    return mem.record_turn(session, text, f"noted: {text}", {"generation": {"entry": "-"}}, None)
