"""LocalAgreement (whisper_streaming's policy): only words two consecutive passes agree on are sent.

Each partial pass transcribes the open utterance from its start. The words on which this pass and
the one before agree, beyond those already sent, are confirmed and sent as a delta. Confirmed words
are never taken back: the next passes and the final one decode with them as a forced prefix, so
the completed transcript begins with exactly the text the deltas spelled.
"""

from __future__ import annotations


def words(text: str) -> list[str]:
    return text.split()


class Agreement:
    def __init__(self) -> None:
        self.confirmed: list[str] = []
        self._previous: list[str] | None = None

    @property
    def text(self) -> str:
        return " ".join(self.confirmed)

    def update(self, text: str) -> str:
        """Take one pass's text; return the delta to send ("" when nothing new is agreed)."""
        current = words(text)
        if current[:len(self.confirmed)] != self.confirmed:
            # A pass that does not begin with the confirmed words (the decoder ignored the prefix):
            # nothing can be agreed against it.
            self._previous = None
            return ""
        previous, self._previous = self._previous, current
        if previous is None:
            return ""
        agreed = len(self.confirmed)
        while agreed < min(len(previous), len(current)) and previous[agreed] == current[agreed]:
            agreed += 1
        new = current[len(self.confirmed):agreed]
        if not new:
            return ""
        delta = (" " if self.confirmed else "") + " ".join(new)
        self.confirmed.extend(new)
        return delta

    def final(self, text: str) -> str:
        """The completed transcript: the final pass's text, which must begin with what was sent."""
        final = words(text)
        if final[:len(self.confirmed)] != self.confirmed:
            final = self.confirmed + final[len(self.confirmed):] if len(final) > len(self.confirmed) else self.confirmed
        return " ".join(final)
