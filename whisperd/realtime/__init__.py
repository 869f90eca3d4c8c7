"""Live transcription over OpenAI's Realtime transcription protocol (docs/realtime.md).

protocol.py  client events in, server events out, session settings (GA and beta shapes)
audio.py     base64 pcm16 24 kHz / G.711 to 16 kHz pcm16, resampled once per chunk
turns.py     server VAD: speech probabilities (Silero, on the engine's live lane) to turns
agreement.py LocalAgreement: deltas only of text two consecutive passes agree on
session.py   one session: buffer, turns, partial and final passes, lag, limits
registry.py  the open sessions of this process: limits, revocation, graceful stop
metrics.py   the lag histogram and counters in /metrics
"""
